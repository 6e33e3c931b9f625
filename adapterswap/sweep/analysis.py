"""Per-step aggregates with bootstrap CIs, effective regime, knee, Pareto front, swap deltas.

Everything here is plain numpy over the rows of a :class:`~adapterswap.sweep.store.RunStore`, so
a report can be rebuilt from the store alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Fidelity metric preferred for each adapter kind (first available wins).
FIDELITY_METRICS = {
    "identity": ["identity", "clip-i", "dino"],
    "style": ["style", "clip-i"],
    "object": ["clip-i", "dino"],
}


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (a single value gives a zero-width interval)."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    if data.size == 1:
        return (float(data[0]), float(data[0]))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def effective_regime(steps: Sequence[int], means: Sequence[float], *, higher_is_better: bool,
                     fraction: float = 0.95) -> int | None:
    """Smallest step count whose mean reaches ``fraction`` of the plateau (the mean at the
    largest step count).

    Higher-is-better with a positive plateau ``P``: ``m >= fraction * P``; lower-is-better with
    ``P > 0``: ``m <= P / fraction``. Otherwise (signs that make ratios meaningless) progress
    from the first step count to the plateau must reach ``fraction``.
    """
    pairs = [(s, m) for s, m in sorted(zip(steps, means)) if m is not None and math.isfinite(m)]
    if not pairs:
        return None
    plateau = pairs[-1][1]
    if higher_is_better and plateau > 0:
        return next(s for s, m in pairs if m >= fraction * plateau)
    if not higher_is_better and plateau > 0:
        return next(s for s, m in pairs if m <= plateau / fraction)
    first = pairs[0][1]
    span = plateau - first
    if span == 0:
        return pairs[0][0]
    return next(s for s, m in pairs if (m - first) / span >= fraction)


def knee(steps: Sequence[int], means: Sequence[float], *, higher_is_better: bool,
         sensitivity: float = 1.0) -> int | None:
    """The knee of a saturating metric-vs-steps curve by Kneedle (Satopaa et al., 2011).

    The curve is oriented so that improvement goes up (lower-is-better metrics are negated),
    both axes are normalised to [0, 1], and the knee is the first local maximum of
    ``y_n - x_n`` after which the difference falls below the Kneedle threshold (offline
    Kneedle, as the ``kneed`` package computes for concave increasing curves).
    """
    pairs = [(s, m) for s, m in sorted(zip(steps, means)) if m is not None and math.isfinite(m)]
    if len(pairs) < 3:
        return None
    x = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs], dtype=float)
    if not higher_is_better:
        y = -y
    if y.max() == y.min():
        return None
    xn = (x - x.min()) / (x.max() - x.min())
    yn = (y - y.min()) / (y.max() - y.min())
    diff = yn - xn
    maxima = [i for i in range(1, len(diff) - 1) if diff[i - 1] <= diff[i] >= diff[i + 1]
              and not diff[i - 1] == diff[i] == diff[i + 1]]
    if not maxima:
        return None
    step_mean = float(np.mean(np.diff(xn)))
    for n, i in enumerate(maxima):
        threshold = diff[i] - sensitivity * step_mean
        stop = maxima[n + 1] if n + 1 < len(maxima) else len(diff)
        if any(diff[j] < threshold for j in range(i + 1, stop)):
            return int(x[i])
    return None


def pareto_front(points: Sequence[tuple[float, float, int]], *,
                 higher_is_better: bool) -> list[tuple[float, float, int]]:
    """Non-dominated ``(latency, fidelity, steps)`` points: nothing is both faster and
    at least as good. Sorted by latency."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for lat, fid, steps in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * fid > sign * front[-1][1]:
            front.append((lat, fid, steps))
    return front


def paired_delta(a: Mapping[Any, float], b: Mapping[Any, float], *, resamples: int = 2000,
                 seed: int = 0) -> dict[str, float]:
    """Mean of ``b - a`` over the keys both have (paired by reference, prompt and seed) with
    a bootstrap 95% CI."""
    keys = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None)
    if not keys:
        return {"n": 0, "mean": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    deltas = [b[k] - a[k] for k in keys]
    low, high = bootstrap_ci(deltas, resamples=resamples, seed=seed)
    return {"n": len(keys), "mean": float(np.mean(deltas)), "ci_low": low, "ci_high": high}


@dataclass
class Curve:
    """One metric against steps for one backbone and adapter."""

    backbone: str
    adapter: str
    metric: str
    higher_is_better: bool
    steps: list[int]
    n: list[int]
    mean: list[float]
    ci_low: list[float]
    ci_high: list[float]
    effective_regime: int | None = None
    knee: int | None = None


@dataclass
class Recommendation:
    backbone: str
    adapter: str
    metric: str
    steps: int | None
    target: float | None
    latency_s: float | None
    reason: str


@dataclass
class Analysis:
    curves: list[Curve] = field(default_factory=list)
    latency: dict[str, dict[int, float]] = field(default_factory=dict)
    pareto: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)
    recommendations: list[Recommendation] = field(default_factory=list)
    fidelity_metric: dict[str, str] = field(default_factory=dict)
    ablations: list[dict[str, Any]] = field(default_factory=list)
    trajectories: list[Curve] = field(default_factory=list)
    probes: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metric_direction(name: str) -> bool:
    try:
        from adapterswap.plugins import get_metric

        return bool(get_metric(name).higher_is_better)
    except Exception:
        return name not in ("lpips", "latency")


def _fidelity_metric(adapter_kind: str | None, available: Sequence[str]) -> str | None:
    for name in FIDELITY_METRICS.get(adapter_kind or "", []):
        if name in available:
            return name
    rest = [m for m in available if m not in ("latency",) and _metric_direction(m)]
    return rest[0] if rest else None


def _adapter_kind(adapter: str) -> str | None:
    if adapter == "none":
        return None
    try:
        from adapterswap.plugins import get_adapter

        return get_adapter(adapter).kind
    except Exception:
        return None


def setting_label(adapter: str, scale: float | None = None, start: float = 0.0,
                  end: float = 1.0) -> str:
    """A readable name of an adapter setting: ``infusenet``, ``none``,
    ``infusenet [scale 0.5, window 0-0.25]``."""
    if adapter == "none":
        return "none"
    parts = []
    if scale is not None:
        parts.append(f"scale {scale:g}")
    if (start, end) != (0.0, 1.0):
        parts.append(f"window {start:g}-{end:g}")
    return f"{adapter} [{', '.join(parts)}]" if parts else adapter


def row_label(row: Mapping[str, Any]) -> str:
    return setting_label(row["adapter"], row.get("scale"), row.get("start") or 0.0,
                         1.0 if row.get("end") is None else row["end"])


def analyse(rows: Sequence[Mapping[str, Any]], latency_rows: Sequence[Mapping[str, Any]] = (),
            *, fraction: float = 0.95, latency_budget: float | None = None,
            trajectory_rows: Sequence[Mapping[str, Any]] = (),
            probe_rows: Sequence[Mapping[str, Any]] = ()) -> Analysis:
    """Aggregate finished cells into curves, regimes, knees, Pareto fronts and
    recommendations. Cells are grouped by backbone and adapter setting (its label)."""
    done = [r for r in rows if r["status"] == "done"]
    result = Analysis()
    series: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    kinds: dict[str, str] = {}
    for row in done:
        label = row_label(row)
        kinds[label] = row["adapter"]
        for metric, value in row["scores"].items():
            if value is None:
                continue
            series.setdefault((row["backbone"], label, metric), {}).setdefault(
                row["steps"], []).append(value)
        for lat in latency_rows:
            if (lat["backbone"], lat["adapter"], lat.get("start", 0.0), lat.get("end", 1.0)) \
                    == (row["backbone"], row["adapter"], row.get("start") or 0.0,
                        1.0 if row.get("end") is None else row["end"]):
                result.latency.setdefault(f"{row['backbone']}|{label}", {})[lat["steps"]] = \
                    lat["total_s"]
    for (backbone, adapter, metric), by_steps in sorted(series.items()):
        higher = _metric_direction(metric)
        steps = sorted(by_steps)
        means = [float(np.mean(by_steps[s])) for s in steps]
        cis = [bootstrap_ci(by_steps[s]) for s in steps]
        curve = Curve(backbone, adapter, metric, higher, steps, [len(by_steps[s]) for s in steps],
                      means, [c[0] for c in cis], [c[1] for c in cis])
        if metric != "latency" and len(steps) > 1:
            curve.effective_regime = effective_regime(steps, means, higher_is_better=higher,
                                                      fraction=fraction)
            curve.knee = knee(steps, means, higher_is_better=higher)
        result.curves.append(curve)
    pairs = sorted({(c.backbone, c.adapter) for c in result.curves})
    for backbone, adapter in pairs:
        label = f"{backbone}|{adapter}"
        available = [c.metric for c in result.curves if (c.backbone, c.adapter) ==
                     (backbone, adapter)]
        fidelity = _fidelity_metric(_adapter_kind(kinds.get(adapter, adapter)), available)
        if fidelity is None:
            continue
        result.fidelity_metric[label] = fidelity
        curve = next(c for c in result.curves if (c.backbone, c.adapter, c.metric) ==
                     (backbone, adapter, fidelity))
        if len(curve.steps) < 2:
            continue  # one step count: nothing to recommend between
        latency = result.latency.get(label, {})
        points = [(latency[s], m, s) for s, m in zip(curve.steps, curve.mean) if s in latency]
        result.pareto[label] = pareto_front(points, higher_is_better=curve.higher_is_better)
        result.recommendations.append(
            recommend(curve, latency, fraction=fraction, latency_budget=latency_budget))
    result.ablations = ablation_deltas(rows)
    result.trajectories = trajectory_curves(rows, trajectory_rows, fraction=fraction)
    result.probes = probe_maps(rows, probe_rows)
    return result


def recommend(curve: Curve, latency: Mapping[int, float], *, fraction: float = 0.95,
              latency_budget: float | None = None) -> Recommendation:
    """The fewest steps whose mean fidelity reaches ``fraction`` of the plateau and whose
    latency fits the budget."""
    regime = effective_regime(curve.steps, curve.mean, higher_is_better=curve.higher_is_better,
                              fraction=fraction)
    plateau = curve.mean[-1]
    target = fraction * plateau if curve.higher_is_better else plateau / fraction
    candidates = [s for s in curve.steps if regime is not None and s >= regime]
    if latency_budget is not None:
        candidates = [s for s in candidates if s in latency and latency[s] <= latency_budget]
    if not candidates:
        why = (f"no step count reaches {fraction:.0%} of the plateau"
               + (f" within {latency_budget:.3g} s" if latency_budget is not None else ""))
        return Recommendation(curve.backbone, curve.adapter, curve.metric, None, target, None, why)
    steps = min(candidates)
    return Recommendation(
        curve.backbone, curve.adapter, curve.metric, steps, target, latency.get(steps),
        f"{steps} steps reach {fraction:.0%} of the {curve.metric} plateau "
        f"({curve.mean[curve.steps.index(steps)]:.4g} vs {plateau:.4g} at {curve.steps[-1]})")


def swap_comparison(rows: Sequence[Mapping[str, Any]],
                    latency_rows: Sequence[Mapping[str, Any]], *, source: str,
                    target: str) -> dict[str, Any]:
    """The swap's headline: latency ratio ``source / target`` at their default steps and each
    metric's paired delta ``target - source`` over identical (reference, prompt, seed)."""
    done = [r for r in rows if r["status"] == "done"]

    def by_key(backbone: str, metric: str) -> dict[tuple[str, str, int], float]:
        return {(r["reference"], r["prompt"], r["seed"]): r["scores"][metric]
                for r in done if r["backbone"] == backbone and r["scores"].get(metric)
                is not None}

    def latency_of(backbone: str) -> dict[str, Any] | None:
        matching = [r for r in latency_rows if r["backbone"] == backbone]
        return max(matching, key=lambda r: r["steps"]) if matching else None

    src_lat, dst_lat = latency_of(source), latency_of(target)
    steps = {b: sorted({r["steps"] for r in done if r["backbone"] == b}) for b in
             (source, target)}
    result: dict[str, Any] = {"from": source, "to": target, "steps": steps, "metrics": {}}
    if src_lat and dst_lat and dst_lat["total_s"] > 0:
        result["latency"] = {"from_s": src_lat["total_s"], "to_s": dst_lat["total_s"],
                             "speedup": src_lat["total_s"] / dst_lat["total_s"],
                             "from_denoise_s": src_lat["denoise_s"],
                             "to_denoise_s": dst_lat["denoise_s"]}
    metrics = sorted({m for r in done for m in r["scores"]} - {"latency"})
    for metric in metrics:
        a, b = by_key(source, metric), by_key(target, metric)
        delta = paired_delta(a, b)
        delta["from_mean"] = float(np.mean(list(a.values()))) if a else math.nan
        delta["to_mean"] = float(np.mean(list(b.values()))) if b else math.nan
        delta["higher_is_better"] = _metric_direction(metric)
        result["metrics"][metric] = delta
    return result


def ablation_deltas(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For every adapter setting and metric: the paired delta against the adapter-off cells
    of the same backbone, reference, prompt, seed and steps, with a bootstrap 95% CI, and
    whether the CI excludes zero in the metric's better direction (the effect comes from the
    adapter)."""
    done = [r for r in rows if r["status"] == "done"]
    off: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for r in done:
        if r["adapter"] == "none":
            off[(r["backbone"], r["reference"], r["prompt"], r["seed"], r["steps"])] = r
    if not off:
        return []
    out = []
    settings = sorted({(r["backbone"], row_label(r)) for r in done if r["adapter"] != "none"})
    for backbone, label in settings:
        members = [r for r in done if r["backbone"] == backbone and row_label(r) == label]
        metrics = sorted({m for r in members for m in r["scores"]} - {"latency"})
        for metric in metrics:
            a: dict[Any, float] = {}
            b: dict[Any, float] = {}
            for r in members:
                key = (r["backbone"], r["reference"], r["prompt"], r["seed"], r["steps"])
                if key in off and metric in off[key]["scores"]:
                    a[key] = off[key]["scores"][metric]
                    b[key] = r["scores"][metric]
            delta = paired_delta(a, b)
            if delta["n"] == 0:
                continue
            higher = _metric_direction(metric)
            lo, hi = delta["ci_low"], delta["ci_high"]
            delta.update(backbone=backbone, setting=label, metric=metric,
                         higher_is_better=higher,
                         from_adapter=bool((lo > 0) if higher else (hi < 0)))
            out.append(delta)
    return out


def trajectory_curves(rows: Sequence[Mapping[str, Any]],
                      trajectory_rows: Sequence[Mapping[str, Any]], *,
                      fraction: float = 0.95) -> list[Curve]:
    """Metric of the predicted clean image against the step index (1-based) of long runs,
    per backbone, adapter setting and step count; the effective regime is marked along the
    run."""
    by_cell = {r["key"]: r for r in rows if r["status"] == "done"}
    series: dict[tuple[str, str, int, str], dict[int, list[float]]] = {}
    for t in trajectory_rows:
        row = by_cell.get(t["cell"])
        if row is None or t["value"] is None:
            continue
        key = (row["backbone"], row_label(row), row["steps"], t["metric"])
        series.setdefault(key, {}).setdefault(t["step"] + 1, []).append(t["value"])
    curves = []
    for (backbone, label, total, metric), by_step in sorted(series.items()):
        higher = _metric_direction(metric)
        steps = sorted(by_step)
        means = [float(np.mean(by_step[s])) for s in steps]
        cis = [bootstrap_ci(by_step[s]) for s in steps]
        curve = Curve(backbone, f"{label} ({total} steps)", metric, higher, steps,
                      [len(by_step[s]) for s in steps], means, [c[0] for c in cis],
                      [c[1] for c in cis])
        curve.effective_regime = effective_regime(steps, means, higher_is_better=higher,
                                                  fraction=fraction)
        curve.knee = knee(steps, means, higher_is_better=higher)
        curves.append(curve)
    return curves


@dataclass
class ProbeMap:
    """Mean probe values over cells: a blocks x steps matrix for one run length."""

    backbone: str
    setting: str
    quantity: str
    num_steps: int
    blocks: list[str]
    matrix: list[list[float]]  # [block][step]
    mean_curve: list[float]  # mean over blocks, per step
    cells: int


def _block_order(name: str) -> tuple[Any, ...]:
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def probe_maps(rows: Sequence[Mapping[str, Any]],
               probe_rows: Sequence[Mapping[str, Any]]) -> list[ProbeMap]:
    """Aggregate stored probes per backbone, adapter setting, quantity and run length."""
    by_cell = {r["key"]: r for r in rows if r["status"] == "done"}
    acc: dict[tuple[str, str, str, int], dict[tuple[str, int], list[float]]] = {}
    cells: dict[tuple[str, str, str, int], set[str]] = {}
    for p in probe_rows:
        row = by_cell.get(p["cell"])
        if row is None or p["value"] is None:
            continue
        key = (row["backbone"], row_label(row), p["quantity"], row["steps"])
        acc.setdefault(key, {}).setdefault((p["block"], p["step"]), []).append(p["value"])
        cells.setdefault(key, set()).add(p["cell"])
    maps = []
    for key, values in sorted(acc.items()):
        backbone, setting, quantity, steps = key
        blocks = sorted({b for b, _ in values}, key=_block_order)
        matrix = [[float(np.mean(values[(b, s)])) if (b, s) in values else math.nan
                   for s in range(steps)] for b in blocks]
        mean_curve = []
        for s in range(steps):
            column = [matrix[i][s] for i in range(len(blocks)) if not math.isnan(matrix[i][s])]
            mean_curve.append(float(np.mean(column)) if column else math.nan)
        maps.append(ProbeMap(backbone, setting, quantity, steps, blocks, matrix, mean_curve,
                             len(cells[key])))
    return maps
