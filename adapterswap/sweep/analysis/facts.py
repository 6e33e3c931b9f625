"""Where the facts about metrics and adapters come from: directions, roles and declared
kinds as the store recorded them, else as the installed plugins declare them (marked), never
guessed from a name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def _direction(info: Mapping[str, Mapping[str, Any]], metric: str) -> bool | None:
    value = (info.get(metric) or {}).get("higher_is_better")
    return None if value is None else bool(value)


def resolve_metric_info(store: Any, names: Iterable[str]
                        ) -> tuple[dict[str, dict[str, Any]], str]:
    """Metric directions and kinds for ``names``: from the store (what the runs recorded);
    for names the store does not know, from the installed plugins' declarations, marked
    (``"plugins"`` or ``"store+plugins"``); a name neither knows stays unknown."""
    info = {k: dict(v) for k, v in store.metric_info().items()}
    gaps = [n for n in sorted(set(names)) if n not in info]
    found = _plugin_metric_info(gaps) if gaps else {}
    source = _info_source(bool(info), bool(found))
    info.update(found)
    return info, source


def _info_source(from_store: bool, from_plugins: bool) -> str:
    """Where recorded facts came from: ``store``, ``plugins``, ``store+plugins`` or
    ``none``."""
    if from_store and from_plugins:
        return "store+plugins"
    return "plugins" if from_plugins else ("store" if from_store else "none")


def _plugin_metric_info(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    try:
        from adapterswap.plugins import get_metric
        from adapterswap.sweep.provenance import metric_record
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for name in names:
        try:
            record = metric_record(get_metric(name))
        except Exception:  # noqa: BLE001 - not installed: direction unknown
            continue
        record["source"] = "plugins"
        out[name] = record
    return out


def resolve_adapter_kinds(store: Any, names: Iterable[str]) -> tuple[dict[str, str | None], str]:
    """Adapter kinds for ``names`` from the store, else from the installed plugins (marked)."""
    kinds: dict[str, str | None] = dict(store.adapter_kinds())
    from_store = any(k != "none" for k in kinds)
    kinds.setdefault("none", None)
    found: dict[str, str | None] = {}
    for name in sorted(set(names) - set(kinds)):
        try:
            from adapterswap.plugins import get_adapter

            found[name] = get_adapter(name).kind
        except Exception:  # noqa: BLE001 - not installed: kind unknown
            continue
    kinds.update(found)
    return kinds, _info_source(from_store, bool(found))
