"""Which metrics judge the fidelity of an adapter setting, and why none does when none is
scored.

The metrics say so themselves: each declares the adapter kinds it measures fidelity for
(``Metric.kinds``), and the store records them as ``kinds`` in the metric's record
(:func:`~adapterswap.sweep.provenance.metric_record`); ``"none"`` is prompt fidelity, what a
run without an adapter is judged on. Adapter kinds are open strings: an adapter of a kind
this package has never heard of (``"image-prompt"``) is judged by the metrics that declare
that kind, and nothing here lists the kinds there are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The kind a metric declares to measure fidelity for runs without an adapter (the prompt).
NO_ADAPTER = "none"
#: The role (``kind``) under which stores written before ``kinds`` was recorded kept prompt
#: fidelity metrics; read only for those stores.
_LEGACY_PROMPT_KIND = "text"


def fidelity_kind(adapter_kind: str | None) -> str:
    """The kind a fidelity metric must declare for a setting with an adapter of
    ``adapter_kind`` (``None``: no adapter, so :data:`NO_ADAPTER`)."""
    return adapter_kind or NO_ADAPTER


def measures_fidelity_for(record: Mapping[str, Any] | None, kind: str) -> bool:
    """Whether the metric of this stored record measures fidelity for adapter kind ``kind``
    (:data:`NO_ADAPTER` for no adapter): its declared ``kinds`` contain ``kind``."""
    record = record or {}
    kinds = record.get("kinds")
    if kinds is not None:
        return kind in kinds
    # A store written before metric records carried ``kinds``: the rule of that time, the
    # metric's recorded role (``kind``) equal to the adapter kind, and "text" (prompt
    # fidelity) for no adapter.
    wanted = _LEGACY_PROMPT_KIND if kind == NO_ADAPTER else kind
    return record.get("kind") == wanted


def fidelity_metrics(kind: str, metrics: Sequence[str],
                     metric_info: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The metrics among ``metrics`` that measure fidelity for ``kind``, in their order."""
    return [m for m in metrics if measures_fidelity_for(metric_info.get(m), kind)]


def _missing_fidelity(kind: str, adapter: str, scored: Sequence[str],
                      metric_info: Mapping[str, Mapping[str, Any]]) -> str:
    """Why no metric measuring fidelity for ``kind`` judges this setting, and what would fix
    it: a known metric of that kind that was unavailable, else the metrics to add."""
    known = sorted(m for m, i in metric_info.items() if measures_fidelity_for(i, kind))
    broken = [m for m in known if (metric_info[m] or {}).get("available") is False]
    have = ", ".join(scored) or "none"
    what = "the prompt (no adapter)" if adapter == "none" else f"adapter {adapter!r}"
    name = "prompt-fidelity" if kind == NO_ADAPTER else kind
    if broken:
        m = broken[0]
        return (f"no {name} metric was scored for {what}: {m} was unavailable "
                f"({(metric_info[m] or {}).get('reason') or 'no reason recorded'}) "
                f"(scored: {have})")
    hint = ",".join(known) if known else f"<a metric whose kinds include {kind!r}>"
    return (f"no {name} metric was scored for {what} (scored: {have}; none of them measures "
            f"fidelity for kind {kind!r}); add --metrics {hint}")
