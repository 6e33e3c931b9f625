"""Curves: one metric against steps for one backbone and adapter setting, with per-step
means, intervals and scored shares, the paired difference from the largest step count,
and the regime and knee with their bootstrap distributions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapterswap.sweep.analysis.regime import (
    REGIME_LEVEL,
    _distribution,
    _flat,
    _knees,
    _regimes,
    _within_margin,
    knee,
    pooled_seed_sd,
)
from adapterswap.sweep.analysis.resampling import (
    CI_LEVEL,
    N_TOO_SMALL,
    RESAMPLES,
    _cluster_index,
    _finite,
    _interval_lists,
    _resampling,
)


@dataclass
class Curve:
    """One metric against steps for one backbone and adapter setting (``adapter``: the
    setting's label). Lists run over ``steps``; ``None`` in an interval: n too small."""

    backbone: str
    adapter: str
    metric: str
    higher_is_better: bool | None
    steps: list[int]
    n: list[int]
    mean: list[float | None]
    ci_low: list[float | None]
    ci_high: list[float | None]
    effective_regime: int | None = None
    knee: int | None = None
    label: str = ""
    adapter_name: str | None = None
    metric_kind: str | None = None
    direction: str = "unknown"
    attempted: list[int] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)
    scored_share: list[float | None] = field(default_factory=list)
    clusters: list[int] = field(default_factory=list)
    excluded_window_never_opens: list[int] = field(default_factory=list)
    resampling: str | None = None
    difference: list[float | None] = field(default_factory=list)
    difference_ci_low: list[float | None] = field(default_factory=list)
    difference_ci_high: list[float | None] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)
    margin: float | None = None
    margin_source: str | None = None
    within_margin: list[bool | None] = field(default_factory=list)
    regime_mode: int | None = None
    regime_interval: list[int] | None = None
    regime_distribution: list[list[float]] = field(default_factory=list)
    knee_mode: int | None = None
    knee_interval: list[int] | None = None
    knee_distribution: list[list[float]] = field(default_factory=list)
    knee_none_share: float | None = None
    missing: str = "drop"
    missing_fill: float | None = None
    missing_fill_source: str | None = None
    duplicates: int = 0
    regime_note: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def plateau(self) -> float | None:
        return self.mean[-1] if self.mean else None


#: One observation of a curve: unit (reference, prompt, seed), x (steps), value (None: the
#: metric was attempted and could not score the image).
Observation = tuple[tuple[Any, Any, Any], int, "float | None"]


def curve_from_observations(observations: Iterable[Observation], *, backbone: str,
                            setting: str, metric: str, info: Mapping[str, Any] | None,
                            adapter_name: str | None = None, margin: float | None = None,
                            missing: str = "drop", fill: float | None = None,
                            fill_source: str | None = None,
                            excluded: Mapping[int, int] | None = None,
                            regime: bool = True, resamples: int = RESAMPLES,
                            seed: int = 0) -> Curve:
    """The curve of one metric: per step count the mean with its interval and the share of
    images scored, the paired difference from the largest step count, the effective regime
    and the knee with their bootstrap distributions (module doc)."""
    info = info or {}
    higher = info.get("higher_is_better")
    higher = bool(higher) if higher is not None else None
    units: dict[tuple[Any, Any, Any], int] = {}
    cells: dict[tuple[int, int], list[float | None]] = {}
    xs: set[int] = set()
    for unit, x, value in observations:
        u = units.setdefault(unit, len(units))
        cells.setdefault((u, x), []).append(value if _finite(value) else None)
        xs.add(x)
    steps = sorted(xs)
    col = {s: j for j, s in enumerate(steps)}
    raw = np.full((len(units), len(steps)), np.nan)   # scored values only
    used = np.full((len(units), len(steps)), np.nan)  # after the missing policy
    attempted = np.zeros(len(steps), dtype=int)
    scored = np.zeros(len(steps), dtype=int)
    duplicates = 0
    for (u, x), values in cells.items():
        j = col[x]
        duplicates += len(values) - 1
        attempted[j] += len(values)
        good = [v for v in values if v is not None]
        scored[j] += len(good)
        if good:
            raw[u, j] = float(np.mean(good))
        filled = [v if v is not None else fill for v in values]
        filled = [v for v in filled if v is not None]
        if filled:
            used[u, j] = float(np.mean(filled))
    cluster_of = _cluster_index([unit[:2] for unit in units])
    present = np.isfinite(used)
    n = present.sum(axis=0)
    means = [float(np.nanmean(used[:, j])) if n[j] else None for j in range(len(steps))]
    clusters = [len({int(cluster_of[u]) for u in np.flatnonzero(present[:, j])})
                for j in range(len(steps))]
    rng = np.random.default_rng(seed)
    plan = _resampling(cluster_of, resamples=resamples, rng=rng)
    low, high, samples = _interval_lists(used, cluster_of, plan, CI_LEVEL)
    differences = used - used[:, -1:]
    pairs = np.isfinite(differences).sum(axis=0)
    diff_mean = [float(np.nanmean(differences[:, j])) if pairs[j] else None
                 for j in range(len(steps))]
    d_low, d_high, d_samples = _interval_lists(differences, cluster_of, plan, CI_LEVEL)
    d_low[-1] = d_high[-1] = None  # the plateau against itself: no interval to give
    curve = Curve(
        backbone, setting, metric, higher, steps, [int(v) for v in n], means, low, high,
        label=f"{backbone}|{setting}", adapter_name=adapter_name,
        metric_kind=info.get("kind"),
        direction="unknown" if higher is None else ("higher" if higher else "lower"),
        attempted=[int(v) for v in attempted], scored=[int(v) for v in scored],
        scored_share=[float(s / a) if a else None for s, a in zip(scored, attempted)],
        clusters=clusters,
        excluded_window_never_opens=[int((excluded or {}).get(s, 0)) for s in steps],
        resampling=plan.kind if plan is not None and any(v is not None for v in low)
        else None,
        difference=diff_mean, difference_ci_low=d_low, difference_ci_high=d_high,
        pairs=[int(v) for v in pairs], missing=missing,
        missing_fill=fill if missing == "worst" else None,
        missing_fill_source=fill_source if missing == "worst" else None,
        duplicates=duplicates)
    if duplicates:
        curve.notes.append(f"{duplicates} images share a (reference, prompt, seed, steps) "
                           "with another cell of this setting (other runs or sizes); each "
                           "unit's duplicates are averaged")
    if missing == "worst" and fill is None and (scored < attempted).any():
        curve.notes.append("no worst value known for this metric: unscored images dropped")
    if plan is None:
        curve.notes.append(f"{N_TOO_SMALL} for intervals: one (reference, prompt, seed)")
    elif plan.kind == "seeds":
        curve.notes.append("one (reference, prompt): intervals resample seeds only and do "
                           "not cover other references or prompts")
    if not regime:
        return curve
    if higher is None:
        curve.regime_note = "direction unknown: no regime, knee, Pareto or recommendation"
        return curve
    if len(steps) < 2:
        curve.regime_note = f"only one step count ({steps[0]}): nothing to choose between"
        return curve
    if means[-1] is None:
        curve.regime_note = f"no image was scored at the largest step count ({steps[-1]})"
        return curve
    if margin is not None:
        curve.margin, curve.margin_source = float(margin), "option"
    else:
        at_plateau = [(raw[u, -1], cluster_of[u]) for u in range(len(units))]
        curve.margin = pooled_seed_sd([v for v, _ in at_plateau], [c for _, c in at_plateau])
        curve.margin_source = "seed noise" if curve.margin is not None else None
    if curve.margin is None:
        curve.regime_note = (f"margin unknown: no (reference, prompt) has two scored seeds at "
                             f"{steps[-1]} steps, so seed-to-seed noise cannot be estimated "
                             "(run two or more seeds, or give a margin)")
        return curve
    x = np.array(steps)
    point = np.array([[np.nan if d is None else d for d in diff_mean]], dtype=float)
    inside = _within_margin(point, higher_is_better=higher, margin=curve.margin)[0]
    inside[-1] = True
    curve.within_margin = [bool(v) if diff_mean[j] is not None or j == len(steps) - 1
                           else None for j, v in enumerate(inside)]
    curve.effective_regime = int(_regimes(x, point, higher_is_better=higher,
                                          margin=curve.margin)[0])
    point_means = np.array([np.nan if m is None else m for m in means], dtype=float)
    if _flat(point_means[None, :], curve.margin)[0]:
        curve.notes.append(f"the curve stays within the margin {curve.margin:.3g}: no knee")
    else:
        curve.knee = knee(steps, list(point_means), higher_is_better=higher)
    if plan is None or samples is None or d_samples is None:
        return curve
    regimes = _regimes(x, d_samples, higher_is_better=higher, margin=curve.margin)
    dist = _distribution(regimes.astype(float), REGIME_LEVEL)
    curve.regime_mode, curve.regime_interval = dist["mode"], dist["interval"]
    curve.regime_distribution = dist["distribution"]
    knees = _knees(steps, samples, higher_is_better=higher)
    knees[_flat(samples, curve.margin)] = np.nan
    dist = _distribution(knees, REGIME_LEVEL)
    curve.knee_mode, curve.knee_interval = dist["mode"], dist["interval"]
    curve.knee_distribution, curve.knee_none_share = dist["distribution"], dist["none_share"]
    return curve
