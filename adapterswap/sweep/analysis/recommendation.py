"""The recommendation: the fewest steps whose fidelity is within the margin of the plateau
(and whose median latency fits a budget), and the latency-fidelity Pareto front."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapterswap.sweep.analysis.curves import Curve
from adapterswap.sweep.analysis.resampling import N_TOO_SMALL, _finite


def pareto_front(points: Sequence[tuple[float, float, int]], *,
                 higher_is_better: bool) -> list[tuple[float, float, int]]:
    """Non-dominated ``(latency, fidelity, steps)`` points: nothing is both faster and
    at least as good. Sorted by latency."""
    sign = 1.0 if higher_is_better else -1.0
    front: list[tuple[float, float, int]] = []
    for lat, fid, steps in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * fid > sign * front[-1][1]:
            front.append((lat, fid, steps))
    return front


@dataclass
class Recommendation:
    """The fewest steps whose kind-matched fidelity is within the margin of the plateau (and
    whose median latency fits the budget), with the regime's bootstrap interval."""

    backbone: str
    adapter: str  # setting label
    metric: str | None
    steps: int | None
    target: float | None
    latency_s: float | None
    reason: str
    label: str = ""
    adapter_name: str | None = None
    adapter_kind: str | None = None
    metric_kind: str | None = None
    regime: int | None = None
    regime_mode: int | None = None
    regime_interval: list[int] | None = None
    margin: float | None = None
    margin_source: str | None = None
    plateau: float | None = None
    plateau_steps: int | None = None
    mean: float | None = None
    difference: float | None = None
    difference_ci_low: float | None = None
    difference_ci_high: float | None = None
    latency_q1_s: float | None = None
    latency_q3_s: float | None = None
    latency_budget_s: float | None = None


def recommend(curve: Curve, latency: Mapping[int, Mapping[str, Any]], *,
              latency_budget: float | None = None, adapter_kind: str | None = None,
              fraction: float | None = None) -> Recommendation:
    """The fewest step counts within the margin of the plateau whose median latency fits the
    budget. ``fraction`` is accepted and ignored (the plateau-fraction rule is gone)."""
    del fraction
    base = dict(label=curve.label, adapter_name=curve.adapter_name, adapter_kind=adapter_kind,
                metric_kind=curve.metric_kind, regime=curve.effective_regime,
                regime_mode=curve.regime_mode, regime_interval=curve.regime_interval,
                margin=curve.margin, margin_source=curve.margin_source,
                plateau=curve.plateau, plateau_steps=curve.steps[-1] if curve.steps else None,
                latency_budget_s=latency_budget)
    target = None
    if curve.margin is not None and curve.plateau is not None and \
            curve.higher_is_better is not None:
        target = curve.plateau - curve.margin if curve.higher_is_better else \
            curve.plateau + curve.margin
    if curve.effective_regime is None:
        why = curve.regime_note or "no effective regime"
        return Recommendation(curve.backbone, curve.adapter, curve.metric, None, target, None,
                              f"{curve.metric}: {why}", **base)  # type: ignore[arg-type]
    candidates = [s for s, ok in zip(curve.steps, curve.within_margin)
                  if ok and s >= curve.effective_regime]
    if latency_budget is not None:
        candidates = [s for s in candidates if s in latency and
                      _finite(latency[s].get("median_s")) and
                      latency[s]["median_s"] <= latency_budget]
    if not candidates:
        why = (f"no step count within the margin of the {curve.metric} plateau has a measured "
               f"median latency within {latency_budget:.3g} s")
        return Recommendation(curve.backbone, curve.adapter, curve.metric, None, target, None,
                              why, **base)  # type: ignore[arg-type]
    steps = min(candidates)
    j = curve.steps.index(steps)
    lat = latency.get(steps) or {}
    interval = curve.regime_interval
    over = ("resampled (reference, prompt) clusters" if curve.resampling == "clusters" else
            "resampled seeds of the one (reference, prompt)")
    interval_text = (f"90% interval {interval[0]}-{interval[1]} steps over {over}"
                     if interval else f"regime interval: {N_TOO_SMALL}")
    reason = (f"{steps} step{'' if steps == 1 else 's'}: {curve.metric} {curve.mean[j]:.4g} "
              "is within the margin "
              f"{curve.margin:.3g} ({curve.margin_source}) of the plateau "
              f"{curve.plateau:.4g} at {curve.steps[-1]} steps (paired difference "
              f"{curve.difference[j]:+.4g}); effective regime {curve.effective_regime}, "
              f"{interval_text}")
    return Recommendation(
        curve.backbone, curve.adapter, curve.metric, steps, target, lat.get("median_s"),
        reason, mean=curve.mean[j], difference=curve.difference[j],
        difference_ci_low=curve.difference_ci_low[j],
        difference_ci_high=curve.difference_ci_high[j], latency_q1_s=lat.get("q1_s"),
        latency_q3_s=lat.get("q3_s"), **base)  # type: ignore[arg-type]
