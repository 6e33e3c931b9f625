"""Attention-stream norm probes: how much of each block's signal comes from the adapter.

Backbones and adapters that support probes measure, inside the blocks where the adapter's
stream meets the base stream, the norm of the adapter's contribution relative to the base:

* IP-Adapter (SDXL, SD1.5): ``||scale * IP-branch attention|| / ||text-branch attention||``
  inside the attention processor, before ``to_out``;
* InfuseNet (FLUX): ``||ControlNet residual|| / ||hidden state it is added to||`` for every
  double and single block it feeds;
* FLUX joint attention: the norm of the text-token stream against the image-token stream.

They report per-sample values to a :class:`ProbeRecorder`; the engine assigns them to cells
and steps and stores them in the ``probes`` table. Measuring must never change outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def relative_norm(numerator: Any, denominator: Any, eps: float = 1e-12) -> Any:
    """Per-sample ``||a|| / ||b||`` (Frobenius norm over all but the first dimension), in
    float32, detached."""
    a = numerator.detach().float().flatten(1).norm(dim=1)
    b = denominator.detach().float().flatten(1).norm(dim=1)
    return a / b.clamp_min(eps)


@dataclass
class ProbeRecorder:
    """Collects ``(block, quantity, per-sample values)`` during one denoiser call.

    A probe calls :meth:`record` with a tensor of one value per sample of the batch the
    backbone's ``predict`` received (for CFG, the conditional half only). The engine calls
    :meth:`drain` after each call and attributes row ``i`` to the ``i``-th sample.
    """

    enabled: bool = True
    _pending: list[tuple[str, str, list[float]]] = field(default_factory=list)

    def record(self, block: str, quantity: str, values: Any) -> None:
        """Record per-sample values (a tensor ``(B,)`` or a sequence) for ``block``."""
        if not self.enabled:
            return
        if hasattr(values, "detach"):
            values = values.detach().float().cpu().reshape(-1).tolist()
        self._pending.append((block, quantity, [float(v) for v in values]))

    def drain(self) -> list[tuple[str, str, list[float]]]:
        """The records since the last drain (and forget them)."""
        pending, self._pending = self._pending, []
        return pending


class Probed:
    """Mixin for backbones and adapters with probes: ``set_probe(recorder)`` turns them on,
    ``set_probe(None)`` off. ``probe`` is the active recorder or ``None``."""

    supports_probes: bool = False
    probe: ProbeRecorder | None = None
    #: the installed measuring hooks (anything with ``remove()``), or ``None``
    _probe_hooks: Any = None

    def set_probe(self, recorder: ProbeRecorder | None) -> None:
        """Install (or with ``None`` remove) the recorder. Implementations measure only
        while ``self.probe`` is set and never change outputs."""
        from adapterswap.errors import UsageError

        if recorder is not None and not self.supports_probes:
            raise UsageError(f"{type(self).__name__} {getattr(self, 'name', '')!r} has no "
                             "probes")
        self.probe = recorder

    def _install_probe_hooks(self, target: Any) -> None:
        """Remove the installed hooks, then, while a recorder is set and ``target`` (the
        backbone the hooks go on) is not ``None``, install :meth:`_make_probe_hooks`'s."""
        if self._probe_hooks is not None:
            self._probe_hooks.remove()
            self._probe_hooks = None
        if self.probe is not None and target is not None:
            self._probe_hooks = self._make_probe_hooks(target)

    def _make_probe_hooks(self, target: Any) -> Any:
        """Hooks on ``target``'s modules that feed ``self.probe`` (read-only); an object with
        ``remove()``. Implementations that use :meth:`_install_probe_hooks` override this."""
        raise NotImplementedError
