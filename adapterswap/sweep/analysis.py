"""Metric-vs-steps curves with paired, clustered bootstrap intervals; the effective regime and
the knee with their bootstrap distributions; kind-matched fidelity and the recommendation;
missing-score rates; confounds; the latency-fidelity Pareto front; swap and ablation deltas.

Everything here is plain numpy over the rows of a :class:`~adapterswap.sweep.store.RunStore`,
so a report can be rebuilt from the store alone. Nothing is guessed from a metric's or an
adapter's name: directions and kinds are passed in (``metric_info``, ``adapter_kinds``).

The statistics, once (the report and ``analysis.json`` say the same):

- **Units and clusters.** A curve's unit is one seed of one (reference, prompt): its images at
  every step count. Units of one (reference, prompt) form a *cluster*: they share the
  conditioning, so they are not independent.
- **Resampling.** The bootstrap resamples *clusters* with replacement (cluster-only
  resampling, the one-stage cluster bootstrap of Davison & Hinkley 1997, sec. 3.8; it stays
  valid whatever the correlation of seeds inside a cluster, where a second stage that also
  resamples seeds would count the seed noise twice). A drawn cluster brings all its seeds at
  all step counts, so every statistic computed from one resample (means at two step counts,
  their difference, the regime, the knee) is paired. With a single cluster the seeds are the
  only replication there is, and they are resampled instead (``resampling: "seeds"``: the
  interval then covers seed noise only, not other references or prompts). With one unit, or
  fewer than two resampling units at a step, there is **no interval** (``None``; the report
  says "n too small"), never a zero-width one.
- **Intervals.** Percentile intervals, 95% for means and differences, 90% for the regime and
  the knee (percentiles of the step count across resamples, so both ends are step counts that
  were run). Means weight every image alike (a cluster with more scored images counts more).
- **Effective regime.** The fewest step count whose paired mean difference from the largest
  step count is within ``margin`` in the metric's better direction: ``d >= -margin`` for
  higher-is-better, ``d <= margin`` for lower-is-better (within the margin of the plateau, or
  better than it). The default margin is the metric's own seed-to-seed noise at the largest
  step count: the standard deviation of scored values across seeds inside a cluster, pooled
  over clusters (``sqrt(sum (y - mean_cluster)^2 / sum (n_cluster - 1))``). Without two seeds
  in any cluster that noise is unknown and so is the regime, unless ``margin`` is given. The
  margin is a fixed tolerance: it is not re-estimated per resample.
- **Missing scores.** ``None`` in ``row["scores"]`` is an attempted image the metric could not
  score (no face found); a metric absent from ``row["scores"]`` was not attempted. Every step
  carries ``scored / attempted``. ``missing="drop"`` leaves unscored images out;
  ``missing="worst"`` scores them as the metric's worst value (``metric_info["worst"]``, else
  the worst value observed for that metric anywhere in the sweep), which bounds the bias of
  dropping them.
- **Knee.** Kneedle on the mean curve, and on every resample's mean curve; a curve whose
  means span no more than the margin has no knee (it is flat within the noise).
- **Confounds.** A cell with an adapter whose window acted at no step
  (``adapter_active_steps == 0``) is an adapter-off cell under an adapter label: it is left
  out of the setting's curve, regime and ablation deltas, and counted in ``confounds``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Bootstrap resamples unless told otherwise.
RESAMPLES = 2000
#: Level of the intervals of means and differences.
CI_LEVEL = 0.95
#: Level of the intervals of the effective regime and the knee (over resamples).
REGIME_LEVEL = 0.90
#: What the report says instead of an interval that cannot be computed.
N_TOO_SMALL = "n too small"
#: The verdicts of a paired delta (:func:`delta_verdict`), in the report's words.
BETTER, WORSE = "better", "worse"
NO_DIFFERENCE = "no significant difference"
N_TOO_SMALL_TO_TELL = "n too small to tell"
#: The confound of a cell whose adapter window acted at no step.
WINDOW_NEVER_OPENS = "window_never_opens"
#: "Within the margin" is inclusive: differences that equal the margin up to float rounding
#: (a few ulps of values of order 1) count as within it.
_ROUNDING = 1e-12
#: Metric kinds that are never fidelity.
NON_FIDELITY_KINDS = frozenset({"diagnostic", "latency", "perceptual"})
#: The metric kind that measures fidelity for an adapter kind; ``None`` is no adapter (judged
#: on the prompt). Any other adapter kind is matched by a metric of the same kind.
FIDELITY_KIND: dict[str | None, str] = {"identity": "identity", "style": "style",
                                        "object": "object", None: "text"}
MISSING_POLICIES = ("drop", "worst")


# ------------------------------------------------------------------------ resampling core
@dataclass
class _Resampling:
    """How a set of units is resampled: ``weights[r, g]`` is how often group ``g`` (a cluster,
    or a unit when seeds are resampled) is drawn in resample ``r``; ``group_of[u]`` is unit
    ``u``'s group. Statistics are computed from per-group sums, so memory grows with the
    number of clusters, not of images."""

    weights: np.ndarray
    group_of: np.ndarray
    kind: str

    def means(self, values: np.ndarray) -> np.ndarray:
        """Means over units of ``values`` ``(units, k)`` (NaN: no value) in every resample:
        shape ``(resamples, k)``, NaN where a resample drew no value of a column."""
        present = np.isfinite(values)
        groups = self.weights.shape[1]
        total = np.zeros((groups, values.shape[1]))
        count = np.zeros((groups, values.shape[1]))
        np.add.at(total, self.group_of, np.where(present, values, 0.0))
        np.add.at(count, self.group_of, present.astype(float))
        total, count = self.weights @ total, self.weights @ count
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.where(count > 0, count, 1.0), np.nan)


def _resampling(cluster_of: np.ndarray, *, resamples: int,
                rng: np.random.Generator) -> _Resampling | None:
    """Clusters are resampled when there are two or more, else units (seeds); ``None`` when
    there is at most one unit (no interval)."""
    units = len(cluster_of)
    clusters = int(cluster_of.max()) + 1 if units else 0
    if clusters >= 2:
        counts = rng.multinomial(clusters, np.full(clusters, 1.0 / clusters), size=resamples)
        return _Resampling(counts.astype(float), cluster_of, "clusters")
    if units >= 2:
        counts = rng.multinomial(units, np.full(units, 1.0 / units), size=resamples)
        return _Resampling(counts.astype(float), np.arange(units), "seeds")
    return None


def _replicated(values: np.ndarray, cluster_of: np.ndarray, resampling: str | None) -> np.ndarray:
    """Per column: whether it has the two resampling units an interval needs (two clusters
    with a value when clusters are resampled, two units when seeds are)."""
    present = np.isfinite(values)
    if resampling == "clusters":
        clusters = int(cluster_of.max()) + 1
        per_cluster = np.zeros((clusters, values.shape[1]), dtype=bool)
        np.logical_or.at(per_cluster, cluster_of, present)
        return per_cluster.sum(axis=0) >= 2
    if resampling == "seeds":
        return present.sum(axis=0) >= 2
    return np.zeros(values.shape[1], dtype=bool)


def _percentiles(samples: np.ndarray, level: float) -> np.ndarray:
    """Percentile interval per column of ``samples`` ``(r, k)``, NaN resamples ignored (a
    resample that drew no value for that column): shape ``(2, k)``."""
    alpha = (1.0 - level) / 2
    out = np.full((2, samples.shape[1]), np.nan)
    for j in range(samples.shape[1]):
        column = samples[:, j]
        column = column[np.isfinite(column)]
        if column.size:
            out[:, j] = np.quantile(column, [alpha, 1.0 - alpha])
    return out


def _interval_lists(values: np.ndarray, cluster_of: np.ndarray, plan: _Resampling | None,
                    level: float
                    ) -> tuple[list[float | None], list[float | None], np.ndarray | None]:
    """Low and high ends per column (``None``: n too small) and the resampled means."""
    k = values.shape[1]
    if plan is None:
        return [None] * k, [None] * k, None
    samples = plan.means(values)
    bounds = _percentiles(samples, level)
    ok = _replicated(values, cluster_of, plan.kind) & np.isfinite(bounds).all(axis=0)
    low = [float(bounds[0, j]) if ok[j] else None for j in range(k)]
    high = [float(bounds[1, j]) if ok[j] else None for j in range(k)]
    return low, high, samples


def _cluster_index(keys: Sequence[Hashable]) -> np.ndarray:
    index: dict[Hashable, int] = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=int)


def bootstrap_ci(values: Sequence[float | None], *, clusters: Sequence[Hashable] | None = None,
                 level: float = CI_LEVEL, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (``None`` and non-finite values
    are left out).

    :param clusters: one label per value (e.g. ``(reference, prompt)``); with two or more
        clusters, clusters are resampled with replacement, each bringing all its values;
        otherwise the values themselves are resampled.
    :returns: ``(low, high)``, or ``None`` when there are fewer than two resampling units
        (one value, or one cluster holding one value): n too small for an interval.
    """
    labels = list(clusters) if clusters is not None else list(range(len(values)))
    if len(labels) != len(values):
        raise ValueError(f"clusters has {len(labels)} labels for {len(values)} values")
    kept = [(v, c) for v, c in zip(values, labels) if v is not None and math.isfinite(v)]
    if not kept:
        return None
    data = np.array([[v] for v, _ in kept], dtype=float)
    cluster_of = _cluster_index([c for _, c in kept])
    rng = np.random.default_rng(seed)
    plan = _resampling(cluster_of, resamples=resamples, rng=rng)
    low, high, _ = _interval_lists(data, cluster_of, plan, level)
    return None if low[0] is None else (low[0], high[0])  # type: ignore[return-value]


def _default_cluster(key: Hashable) -> Hashable:
    """``(reference, prompt, seed, ...)`` keys: the cluster is ``(reference, prompt)``."""
    return key[:2] if isinstance(key, tuple) and len(key) >= 3 else key


def paired_delta(a: Mapping[Any, float | None], b: Mapping[Any, float | None], *,
                 cluster_of: Callable[[Any], Hashable] | None = None,
                 resamples: int = RESAMPLES, seed: int = 0,
                 level: float = CI_LEVEL) -> dict[str, Any]:
    """Mean of ``b - a`` over the keys both score, with a paired, clustered bootstrap interval.

    Keys identify one image pair (e.g. ``(reference, prompt, seed)``); ``cluster_of(key)``
    gives its cluster (default: the first two fields of a tuple key of three or more, i.e.
    ``(reference, prompt)``). Clusters are resampled (each brings all its pairs); with one
    cluster, pairs are; with fewer than two, ``ci_low``/``ci_high`` are ``None``.

    :returns: ``n`` (pairs), ``clusters``, ``mean``, ``ci_low``, ``ci_high``, ``resampling``
        (``"clusters"``, ``"seeds"`` or ``None``) and ``ci_note`` (``"n too small"`` or None).
    """
    cluster_of = cluster_of or _default_cluster
    keys = sorted((k for k in a if k in b and _finite(a[k]) and _finite(b[k])), key=repr)
    if not keys:
        return {"n": 0, "clusters": 0, "mean": None, "ci_low": None, "ci_high": None,
                "resampling": None, "ci_note": N_TOO_SMALL}
    deltas = np.array([[b[k] - a[k]] for k in keys], dtype=float)  # type: ignore[operator]
    clusters = _cluster_index([cluster_of(k) for k in keys])
    plan = _resampling(clusters, resamples=resamples, rng=np.random.default_rng(seed))
    low, high, _ = _interval_lists(deltas, clusters, plan, level)
    return {"n": len(keys), "clusters": int(clusters.max()) + 1,
            "mean": float(deltas.mean()), "ci_low": low[0], "ci_high": high[0],
            "resampling": plan.kind if plan is not None and low[0] is not None else None,
            "ci_note": None if low[0] is not None else N_TOO_SMALL}


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def delta_verdict(delta: Mapping[str, Any], higher_is_better: bool | None) -> str:
    """A paired delta's verdict in words: ``"better"`` or ``"worse"`` when its interval
    excludes zero (in the metric's better direction), ``"no significant difference"`` when it
    includes zero, ``"n too small to tell"`` without an interval. With an unknown direction a
    significant delta is ``"higher (direction unknown)"`` or ``"lower (direction unknown)"``."""
    low, high = delta.get("ci_low"), delta.get("ci_high")
    if not (_finite(low) and _finite(high)):
        return N_TOO_SMALL_TO_TELL
    if low <= 0 <= high:
        return NO_DIFFERENCE
    up = low > 0
    if higher_is_better is None:
        return f"{'higher' if up else 'lower'} (direction unknown)"
    return BETTER if up == bool(higher_is_better) else WORSE


# ------------------------------------------------------------------------ regime and knee
def _within_margin(differences: np.ndarray, *, higher_is_better: bool,
                   margin: float) -> np.ndarray:
    sign = 1.0 if higher_is_better else -1.0
    tolerance = margin + _ROUNDING * max(1.0, abs(margin))
    with np.errstate(invalid="ignore"):
        return np.isfinite(differences) & (sign * differences >= -tolerance)


def _regimes(steps: np.ndarray, differences: np.ndarray, *, higher_is_better: bool,
             margin: float) -> np.ndarray:
    """The regime of every row of ``differences`` ``(r, k)`` (the largest step count last,
    always within: it is the plateau)."""
    ok = _within_margin(differences, higher_is_better=higher_is_better, margin=margin)
    ok[:, -1] = True
    return steps[ok.argmax(axis=1)]


def effective_regime(steps: Sequence[int], differences: Sequence[float | None], *,
                     higher_is_better: bool, margin: float) -> int | None:
    """The fewest step count whose paired mean difference from the largest step count is
    within ``margin`` in the metric's better direction.

    :param differences: per step count, the mean over paired images of (value at that step
        count - value at the largest step count); ``None``/NaN where no image is paired.
    :param margin: how far below (higher-is-better) or above (lower-is-better) the plateau a
        step count may be; a step count better than the plateau is always within it.
    """
    pairs = sorted(zip(steps, differences))
    if not pairs:
        return None
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, not {margin!r}")
    x = np.array([p[0] for p in pairs])
    d = np.array([[np.nan if p[1] is None else p[1] for p in pairs]], dtype=float)
    return int(_regimes(x, d, higher_is_better=higher_is_better, margin=margin)[0])


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


def _knees(steps: Sequence[int], curves: np.ndarray, *, higher_is_better: bool,
           sensitivity: float = 1.0) -> np.ndarray:
    """:func:`knee` of every row of ``curves`` ``(r, k)`` at once (NaN: no knee). Rows with a
    missing mean go through :func:`knee` one by one."""
    x = np.asarray(steps, dtype=float)
    r, k = curves.shape
    out = np.full(r, np.nan)
    if k < 3:
        return out
    complete = np.isfinite(curves).all(axis=1)
    for i in np.flatnonzero(~complete):
        found = knee(steps, list(curves[i]), higher_is_better=higher_is_better,
                     sensitivity=sensitivity)
        out[i] = np.nan if found is None else found
    y = curves[complete] if higher_is_better else -curves[complete]
    low, high = y.min(axis=1, keepdims=True), y.max(axis=1, keepdims=True)
    span = high - low
    varies = span[:, 0] > 0
    xn = (x - x.min()) / (x.max() - x.min())
    diff = (y - low) / np.where(span > 0, span, 1.0) - xn
    left, mid, right = diff[:, :-2], diff[:, 1:-1], diff[:, 2:]
    maxima = np.zeros_like(diff, dtype=bool)
    maxima[:, 1:-1] = (left <= mid) & (mid >= right) & ~((left == mid) & (mid == right))
    # the next local maximum after each index (k: none), as the scalar loop's ``stop``
    stop = np.empty(diff.shape, dtype=int)
    following = np.full(diff.shape[0], k)
    for i in range(k - 1, -1, -1):
        stop[:, i] = following
        following = np.where(maxima[:, i], i, following)
    step_mean = float(np.mean(np.diff(xn)))
    found = np.full(diff.shape[0], -1)
    for i in range(1, k - 1):
        threshold = diff[:, i] - sensitivity * step_mean
        falls = np.zeros(diff.shape[0], dtype=bool)
        for j in range(i + 1, k):
            falls |= (j < stop[:, i]) & (diff[:, j] < threshold)
        found = np.where((found < 0) & maxima[:, i] & falls, i, found)
    out[complete] = np.where((found >= 0) & varies, x[np.clip(found, 0, None)], np.nan)
    return out


def _flat(curves: np.ndarray, margin: float) -> np.ndarray:
    """Rows whose means span no more than the margin: a knee there would be noise."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row: not flat, no knee
        span = np.nanmax(curves, axis=1) - np.nanmin(curves, axis=1)
    return span <= margin


def _distribution(samples: np.ndarray, level: float) -> dict[str, Any]:
    """Mode, percentile interval and shares of a step count across resamples (NaN: none)."""
    finite = samples[np.isfinite(samples)].astype(int)
    if finite.size == 0:
        return {"mode": None, "interval": None, "distribution": [], "none_share": 1.0}
    counts = Counter(finite.tolist())
    mode = min(counts, key=lambda s: (-counts[s], s))
    alpha = (1.0 - level) / 2
    low, high = np.quantile(finite, [alpha, 1.0 - alpha], method="inverted_cdf")
    return {"mode": int(mode), "interval": [int(low), int(high)],
            "distribution": [[int(s), counts[s] / samples.size] for s in sorted(counts)],
            "none_share": 1.0 - finite.size / samples.size}


def pooled_seed_sd(values: Sequence[float | None], clusters: Sequence[Hashable]) -> float | None:
    """Seed-to-seed standard deviation: the spread of values around their cluster's mean,
    pooled over clusters (``sqrt(sum (y - mean_c)^2 / sum (n_c - 1))``); ``None`` when no
    cluster has two values."""
    groups: dict[Hashable, list[float]] = {}
    for value, cluster in zip(values, clusters):
        if _finite(value):
            groups.setdefault(cluster, []).append(float(value))  # type: ignore[arg-type]
    dof = sum(len(g) - 1 for g in groups.values())
    if dof <= 0:
        return None
    squares = sum(float(np.sum((np.array(g) - np.mean(g)) ** 2)) for g in groups.values())
    return math.sqrt(squares / dof)


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


# ------------------------------------------------------------------------ curves
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


# ------------------------------------------------------------------------ labels and rows
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


def window_never_opens(row: Mapping[str, Any]) -> bool:
    """An adapter cell whose window acted at no step (an adapter-off cell in disguise)."""
    if row.get("adapter", "none") == "none":
        return False
    return row.get("adapter_active_steps") == 0 or \
        WINDOW_NEVER_OPENS in (row.get("confounds") or [])


def confound_counts(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (backbone, setting, steps, flag): how many finished cells carry the flag, of how
    many. ``window_never_opens`` is also derived from ``adapter_active_steps == 0``."""
    totals: Counter[tuple[str, str, int]] = Counter()
    flagged: Counter[tuple[str, str, int, str]] = Counter()
    for row in rows:
        if row["status"] != "done":
            continue
        key = (row["backbone"], row_label(row), row["steps"])
        totals[key] += 1
        flags = set(row.get("confounds") or [])
        if window_never_opens(row):
            flags.add(WINDOW_NEVER_OPENS)
        for flag in flags:
            flagged[(*key, flag)] += 1
    return [{"backbone": b, "setting": s, "label": f"{b}|{s}", "steps": n, "flag": f,
             "cells": count, "of_cells": totals[(b, s, n)]}
            for (b, s, n, f), count in sorted(flagged.items())]


def _direction(info: Mapping[str, Mapping[str, Any]], metric: str) -> bool | None:
    value = (info.get(metric) or {}).get("higher_is_better")
    return None if value is None else bool(value)


def worst_values(rows: Sequence[Mapping[str, Any]],
                 metric_info: Mapping[str, Mapping[str, Any]]
                 ) -> dict[str, tuple[float | None, str | None]]:
    """Per metric the value ``missing="worst"`` scores an unscored image as, and where it
    comes from: ``metric_info["worst"]`` (``"metric_info"``), else the worst value observed
    for the metric in these rows given its direction (``"observed"``), else ``None``."""
    observed: dict[str, list[float]] = {}
    for row in rows:
        if row["status"] == "done":
            for metric, value in row["scores"].items():
                if _finite(value):
                    observed.setdefault(metric, []).append(float(value))
    out: dict[str, tuple[float | None, str | None]] = {}
    for metric in set(observed) | set(metric_info):
        worst = (metric_info.get(metric) or {}).get("worst")
        higher = _direction(metric_info, metric)
        if _finite(worst):
            out[metric] = (float(worst), "metric_info")
        elif higher is not None and observed.get(metric):
            values = observed[metric]
            out[metric] = (min(values) if higher else max(values), "observed")
        else:
            out[metric] = (None, None)
    return out


# ------------------------------------------------------------------------ latency
def latency_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """A latency row as the report shows it: the median (``total_s``), its quartiles when
    there were two or more repeats, and the fit with this step count's residual if fitted."""
    repeats = int(row.get("repeats") or 0)
    q1, q3 = row.get("total_q1_s"), row.get("total_q3_s")
    spread = _finite(q1) and _finite(q3) and repeats >= 2
    fit = row.get("fit") or None
    residual = None
    if isinstance(fit, Mapping):
        residuals = fit.get("residuals_s") or {}
        residual = residuals.get(row.get("steps"), residuals.get(str(row.get("steps"))))
    return {"steps": row.get("steps"), "median_s": row.get("total_s"),
            "q1_s": q1 if spread else None, "q3_s": q3 if spread else None,
            "iqr_s": (q3 - q1) if spread else None,  # type: ignore[operator]
            "denoise_s": row.get("denoise_s"), "repeats": repeats,
            "method": row.get("method") or "measured",
            "fixed_s": fit.get("fixed_s") if isinstance(fit, Mapping) else None,
            "per_step_s": fit.get("per_step_s") if isinstance(fit, Mapping) else None,
            "residual_s": residual, "batch": row.get("batch"), "device": row.get("device"),
            "note": None if spread or fit else N_TOO_SMALL}


def _setting_of(members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first = members[0]
    sizes = Counter((r.get("height"), r.get("width")) for r in members)
    (height, width), _ = sizes.most_common(1)[0]
    return {"adapter": first["adapter"], "scale": first.get("scale"),
            "start": first.get("start") or 0.0,
            "end": 1.0 if first.get("end") is None else first["end"],
            "height": height, "width": width}


def match_latency(latency_rows: Sequence[Mapping[str, Any]], backbone: str,
                  setting: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Per step count, the latency row of this backbone and adapter setting (scale and image
    size where both sides record them; batch 1 and the newest measurement preferred)."""
    best: dict[int, Mapping[str, Any]] = {}

    def close(a: Any, b: Any) -> bool:
        return a is None or b is None or abs(float(a) - float(b)) < 1e-9

    def rank(r: Mapping[str, Any]) -> tuple[int, float]:
        return (int((r.get("batch") or 1) == 1), float(r.get("measured_at") or 0.0))

    for r in latency_rows:
        if r.get("backbone") != backbone or r.get("adapter") != setting["adapter"]:
            continue
        start = r.get("start") if r.get("start") is not None else 0.0
        end = r.get("end") if r.get("end") is not None else 1.0
        if setting["adapter"] != "none" and not (
                close(start, setting["start"]) and close(end, setting["end"])
                and close(r.get("scale"), setting["scale"])):
            continue
        if not (close(r.get("height"), setting["height"])
                and close(r.get("width"), setting["width"])):
            continue
        if not _finite(r.get("total_s")):
            continue
        steps = int(r["steps"])
        if steps not in best or rank(r) > rank(best[steps]):
            best[steps] = r
    return {s: latency_summary(r) for s, r in sorted(best.items())}


# ------------------------------------------------------------------------ recommendation
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


def _missing_fidelity(kind: str, adapter: str, scored: Sequence[str],
                      metric_info: Mapping[str, Mapping[str, Any]]) -> str:
    """Why no metric of ``kind`` judges this setting, and what would fix it."""
    known = sorted(m for m, i in metric_info.items() if (i or {}).get("kind") == kind)
    broken = [m for m in known if (metric_info[m] or {}).get("available") is False]
    have = ", ".join(scored) or "none"
    what = "the prompt (no adapter)" if adapter == "none" else f"adapter {adapter!r}"
    if broken:
        m = broken[0]
        return (f"no {kind} metric was scored for {what}: {m} was unavailable "
                f"({(metric_info[m] or {}).get('reason') or 'no reason recorded'}) "
                f"(scored: {have})")
    hint = ",".join(known) if known else f"<a metric of kind {kind!r}>"
    return f"no {kind} metric was scored for {what} (available: {have}); add --metrics {hint}"


# ------------------------------------------------------------------------ the analysis
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


@dataclass
class Analysis:
    """What ``analysis.json`` holds (:meth:`to_dict`; ``README`` and the module doc describe
    the fields)."""

    curves: list[Curve] = field(default_factory=list)
    latency: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    pareto: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)
    recommendations: list[Recommendation] = field(default_factory=list)
    recommendation: Any = None
    recommendation_reason: str = ""
    fidelity_metric: dict[str, str] = field(default_factory=dict)
    confounds: list[dict[str, Any]] = field(default_factory=list)
    ablations: list[dict[str, Any]] = field(default_factory=list)
    trajectories: list[Curve] = field(default_factory=list)
    probes: list[ProbeMap] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric_info_source: str = "store"
    adapter_kinds_source: str = "store"
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN and infinities become ``null``, step keys stay numbers in lists."""
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, Mapping):
        return {(str(k) if not isinstance(k, str) else k): _json_safe(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def analyse(rows: Sequence[Mapping[str, Any]], latency_rows: Sequence[Mapping[str, Any]] = (),
            *, metric_info: Mapping[str, Mapping[str, Any]] | None = None,
            adapter_kinds: Mapping[str, str | None] | None = None,
            fraction: float | None = None, latency_budget: float | None = None,
            margin: float | None = None, missing: str = "drop",
            trajectory_rows: Sequence[Mapping[str, Any]] = (),
            probe_rows: Sequence[Mapping[str, Any]] = (), resamples: int = RESAMPLES,
            seed: int = 0, metric_info_source: str = "store",
            adapter_kinds_source: str = "store") -> Analysis:
    """Aggregate finished cells into curves (per backbone, adapter setting and metric),
    regimes, knees, confounds, Pareto fronts and kind-matched recommendations (module doc).

    :param metric_info: per metric ``higher_is_better`` (``None``: unknown), ``kind``,
        ``worst``, ``available``, ``reason``. A metric missing here has an unknown direction:
        its mean and interval are shown, with no regime, knee, Pareto or recommendation.
    :param adapter_kinds: adapter name -> kind (``"none"`` -> ``None``).
    :param fraction: deprecated and ignored; the effective regime is the margin rule.
    :param margin: the regime's margin for every metric (default: each metric's own
        seed-to-seed noise at its largest step count).
    :param missing: ``"drop"`` or ``"worst"`` (module doc).
    :param seed: the bootstrap's seed; every curve draws from ``default_rng(seed)``, so curves
        over the same units resample the same clusters.
    """
    from adapterswap.errors import InvalidArgumentError

    if missing not in MISSING_POLICIES:
        raise InvalidArgumentError("missing", missing, f"choose one of "
                                   f"{', '.join(MISSING_POLICIES)}")
    if margin is not None and not (_finite(margin) and margin >= 0):
        raise InvalidArgumentError("margin", margin, "must be a finite number >= 0")
    if not (isinstance(resamples, int) and resamples >= 100):
        raise InvalidArgumentError("resamples", resamples, "must be an integer >= 100")
    metric_info = {k: dict(v or {}) for k, v in (metric_info or {}).items()}
    adapter_kinds = dict(adapter_kinds or {})
    done = [r for r in rows if r["status"] == "done"]
    result = Analysis(metric_info_source=metric_info_source,
                      adapter_kinds_source=adapter_kinds_source)
    result.options = {
        "missing": missing, "margin": margin, "resamples": resamples, "seed": seed,
        "ci_level": CI_LEVEL, "regime_level": REGIME_LEVEL,
        "resampling": "clusters (reference, prompt) with replacement, all seeds and step "
                      "counts of a drawn cluster together; seeds when there is one cluster",
        "regime_rule": "fewest steps whose paired mean difference from the largest step "
                       "count is within the margin in the metric's better direction",
        "latency_budget_s": latency_budget, "fraction": fraction,
    }
    if fraction is not None and fraction != 0.95:  # 0.95: the CLI's old default, always passed
        result.notes.append(f"fraction={fraction:g} is deprecated and ignored: the effective "
                            "regime is the margin rule")
    fills = worst_values(done, metric_info) if missing == "worst" else {}
    result.confounds = confound_counts(rows)

    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in done:
        groups.setdefault((row["backbone"], row_label(row)), []).append(row)
    scored_anywhere = sorted({m for r in done for m in r["scores"]})
    for name in scored_anywhere:
        info = metric_info.get(name) or {}
        result.metrics[name] = {
            "higher_is_better": info.get("higher_is_better"), "kind": info.get("kind"),
            "worst": info.get("worst"),
            "direction": {True: "higher", False: "lower"}.get(info.get("higher_is_better"),
                                                              "unknown"),
            "known": name in metric_info}
    for (backbone, label), members in sorted(groups.items()):
        kept = [r for r in members if not window_never_opens(r)]
        excluded = Counter(r["steps"] for r in members if window_never_opens(r))
        setting = _setting_of(members)
        latency = match_latency(latency_rows, backbone, setting)
        if latency:
            result.latency[f"{backbone}|{label}"] = latency
        metrics = sorted({m for r in kept for m in r["scores"]})
        if not kept:
            result.recommendations.append(Recommendation(
                backbone, label, None, None, None, None,
                f"the adapter window of all {len(members)} cells never opened (adapter-off "
                "cells under an adapter label): nothing to analyse", label=f"{backbone}|{label}",
                adapter_name=setting["adapter"], latency_budget_s=latency_budget))
            continue
        for metric in metrics:
            info = metric_info.get(metric)
            observations = [((r["reference"], r["prompt"], r["seed"]), r["steps"],
                             r["scores"][metric]) for r in kept if metric in r["scores"]]
            fill, source = fills.get(metric, (None, None))
            kind = (info or {}).get("kind")
            curve = curve_from_observations(
                observations, backbone=backbone, setting=label, metric=metric, info=info,
                adapter_name=setting["adapter"], margin=margin, missing=missing, fill=fill,
                fill_source=source, excluded=excluded, regime=kind != "latency",
                resamples=resamples, seed=seed)
            if kind == "latency":
                _no_intervals(curve, "a latency score is one timed measurement per "
                                     "configuration copied to its cells, not a sample per "
                                     "seed: no interval here (the latency table has the "
                                     "spread over repeats)")
            result.curves.append(curve)
        _recommend_for(result, backbone, label, setting["adapter"], metrics, metric_info,
                       adapter_kinds, latency_budget)
    _summarise_recommendations(result)
    result.ablations = ablation_deltas(rows, metric_info=metric_info, missing=missing,
                                       fills=fills, resamples=resamples, seed=seed)
    result.trajectories = trajectory_curves(rows, trajectory_rows, metric_info=metric_info,
                                            margin=margin, resamples=resamples, seed=seed)
    result.probes = probe_maps(rows, probe_rows)
    return result


def _no_intervals(curve: Curve, why: str) -> None:
    k = len(curve.steps)
    curve.ci_low, curve.ci_high = [None] * k, [None] * k
    curve.difference_ci_low, curve.difference_ci_high = [None] * k, [None] * k
    curve.resampling = None
    curve.notes = [n for n in curve.notes if "resample" not in n and N_TOO_SMALL not in n]
    curve.notes.append(why)


def _recommend_for(result: Analysis, backbone: str, label: str, adapter: str,
                   metrics: Sequence[str], metric_info: Mapping[str, Mapping[str, Any]],
                   adapter_kinds: Mapping[str, str | None],
                   latency_budget: float | None) -> None:
    """Choose the kind-matched fidelity metric of one (backbone, setting), its Pareto front
    and its recommendation (or the reason there is none)."""
    key = f"{backbone}|{label}"

    def nothing(reason: str, kind: str | None = None, metric: str | None = None) -> None:
        result.recommendations.append(Recommendation(
            backbone, label, metric, None, None, None, reason, label=key, adapter_name=adapter,
            adapter_kind=kind, latency_budget_s=latency_budget))

    if adapter != "none" and adapter not in adapter_kinds:
        nothing(f"the kind of adapter {adapter!r} is not recorded, so no fidelity metric "
                "can be matched to it")
        return
    adapter_kind = None if adapter == "none" else adapter_kinds.get(adapter)
    if adapter != "none" and adapter_kind is None:
        nothing(f"adapter {adapter!r} has no kind, so no fidelity metric can be matched to it")
        return
    wanted = FIDELITY_KIND.get(adapter_kind, adapter_kind)
    assert wanted is not None
    matched = [m for m in metrics if (metric_info.get(m) or {}).get("kind") == wanted
               and wanted not in NON_FIDELITY_KINDS]
    if not matched:
        nothing(_missing_fidelity(wanted, adapter, metrics, metric_info), adapter_kind)
        return
    curves = {c.metric: c for c in result.curves if c.label == key and c.metric in matched}
    known = [m for m in matched if curves[m].higher_is_better is not None]
    if not known:
        nothing(f"the direction of {', '.join(matched)} is unknown (not recorded in the "
                "store), so no step count can be recommended", adapter_kind, matched[0])
        return
    metric = known[0]  # several of the same kind: the first by name, stated in the report
    result.fidelity_metric[key] = metric
    curve = curves[metric]
    latency = result.latency.get(key, {})
    points = [(latency[s]["median_s"], m, s) for s, m in zip(curve.steps, curve.mean)
              if s in latency and m is not None]
    if len(curve.steps) >= 2 and points:
        result.pareto[key] = pareto_front(points, higher_is_better=bool(curve.higher_is_better))
    result.recommendations.append(recommend(curve, latency, latency_budget=latency_budget,
                                            adapter_kind=adapter_kind))


def _summarise_recommendations(result: Analysis) -> None:
    """``recommendation``: with one (backbone, setting), its recommendation or ``None``; with
    several, a mapping ``"backbone|setting"`` -> recommendation or ``None`` (``None`` overall
    when none has one). ``recommendation_reason``: the reason (one line per setting)."""
    recs = result.recommendations
    made = [r for r in recs if r.steps is not None]
    if len(recs) == 1:
        result.recommendation = asdict(recs[0]) if made else None
        result.recommendation_reason = recs[0].reason
    elif recs:
        result.recommendation = ({r.label: asdict(r) if r.steps is not None else None
                                  for r in recs} if made else None)
        result.recommendation_reason = "; ".join(f"{r.label}: {r.reason}" for r in recs)
    else:
        result.recommendation_reason = "no finished cells"


# ------------------------------------------------------------------------ swap and ablations
def swap_comparison(rows: Sequence[Mapping[str, Any]],
                    latency_rows: Sequence[Mapping[str, Any]], *, source: str, target: str,
                    metric_info: Mapping[str, Mapping[str, Any]] | None = None,
                    missing: str = "drop", resamples: int = RESAMPLES,
                    seed: int = 0) -> dict[str, Any]:
    """The swap's headline: the median-latency ratio ``source / target`` at each backbone's
    largest step count, and each metric's paired delta ``target - source`` over identical
    (reference, prompt, seed), clusters (reference, prompt) resampled, with its
    :func:`delta_verdict` (``verdict``). Cells whose adapter window never opened are left out
    and counted."""
    metric_info = metric_info or {}
    done = [r for r in rows if r["status"] == "done"]
    steps = {b: sorted({r["steps"] for r in done if r["backbone"] == b}) for b in
             (source, target)}
    fills = worst_values(done, metric_info) if missing == "worst" else {}
    excluded = {b: sum(1 for r in done if r["backbone"] == b and window_never_opens(r))
                for b in (source, target)}

    def by_key(backbone: str, metric: str) -> dict[tuple[str, str, int], float | None]:
        at = steps[backbone][-1] if steps[backbone] else None
        out = {}
        for r in done:
            if r["backbone"] != backbone or r["steps"] != at or window_never_opens(r) \
                    or metric not in r["scores"]:
                continue
            value = r["scores"][metric]
            out[(r["reference"], r["prompt"], r["seed"])] = \
                value if _finite(value) else fills.get(metric, (None, None))[0]
        return out

    def latency_of(backbone: str) -> Mapping[str, Any] | None:
        at = steps[backbone][-1] if steps[backbone] else None
        matching = [r for r in latency_rows if r["backbone"] == backbone
                    and _finite(r.get("total_s"))]
        exact = [r for r in matching if r["steps"] == at]
        pool = exact or matching
        return max(pool, key=lambda r: (r["steps"], (r.get("batch") or 1) == 1,
                                        r.get("measured_at") or 0.0)) if pool else None

    src_lat, dst_lat = latency_of(source), latency_of(target)
    result: dict[str, Any] = {"from": source, "to": target, "steps": steps, "metrics": {},
                              "excluded_window_never_opens": excluded, "missing": missing}
    if src_lat and dst_lat and dst_lat["total_s"] > 0:
        a, b = latency_summary(src_lat), latency_summary(dst_lat)
        result["latency"] = {"from_s": a["median_s"], "to_s": b["median_s"],
                             "speedup": a["median_s"] / b["median_s"],
                             "from_iqr": [a["q1_s"], a["q3_s"]] if a["iqr_s"] is not None
                             else None,
                             "to_iqr": [b["q1_s"], b["q3_s"]] if b["iqr_s"] is not None
                             else None,
                             "from_steps": src_lat["steps"], "to_steps": dst_lat["steps"],
                             "from_denoise_s": a["denoise_s"], "to_denoise_s": b["denoise_s"],
                             "statistic": "median"}
    metrics = sorted({m for r in done for m in r["scores"]})
    for metric in metrics:
        if (metric_info.get(metric) or {}).get("kind") == "latency":
            continue
        a, b = by_key(source, metric), by_key(target, metric)
        delta = paired_delta(a, b, resamples=resamples, seed=seed)
        a_vals = [v for v in a.values() if _finite(v)]
        b_vals = [v for v in b.values() if _finite(v)]
        delta["from_mean"] = float(np.mean(a_vals)) if a_vals else None
        delta["to_mean"] = float(np.mean(b_vals)) if b_vals else None
        delta["from_scored"] = [len(a_vals), len(a)]
        delta["to_scored"] = [len(b_vals), len(b)]
        delta["higher_is_better"] = _direction(metric_info, metric)
        delta["verdict"] = delta_verdict(delta, delta["higher_is_better"])
        result["metrics"][metric] = delta
    return result


def ablation_deltas(rows: Sequence[Mapping[str, Any]], *,
                    metric_info: Mapping[str, Mapping[str, Any]] | None = None,
                    missing: str = "drop",
                    fills: Mapping[str, tuple[float | None, str | None]] | None = None,
                    resamples: int = RESAMPLES, seed: int = 0) -> list[dict[str, Any]]:
    """For every adapter setting and metric: the paired delta against the adapter-off cells
    of the same backbone, reference, prompt, seed and steps, with a clustered bootstrap 95%
    interval (clusters: reference, prompt), and whether the interval excludes zero in the
    metric's better direction (``from_adapter``; ``None`` when the direction is unknown or
    there is no interval) and the :func:`delta_verdict` in words (``verdict``). Each entry
    also names its setting's ``adapter``, ``scale``, ``start``, ``end`` and the ``steps``
    its pairs ran (the report's scale x window heatmap). Cells whose window never opened are
    left out and counted."""
    metric_info = metric_info or {}
    done = [r for r in rows if r["status"] == "done"]
    if fills is None:
        fills = worst_values(done, metric_info) if missing == "worst" else {}
    off: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for r in done:
        if r["adapter"] == "none":
            off[(r["backbone"], r["reference"], r["prompt"], r["seed"], r["steps"])] = r
    if not off:
        return []

    def value(row: Mapping[str, Any], metric: str) -> float | None:
        v = row["scores"].get(metric)
        return v if _finite(v) else fills.get(metric, (None, None))[0]

    out = []
    settings = sorted({(r["backbone"], row_label(r)) for r in done if r["adapter"] != "none"})
    for backbone, label in settings:
        members = [r for r in done if r["backbone"] == backbone and row_label(r) == label]
        never = sum(1 for r in members if window_never_opens(r))
        members = [r for r in members if not window_never_opens(r)]
        metrics = sorted({m for r in members for m in r["scores"]})
        for metric in metrics:
            if (metric_info.get(metric) or {}).get("kind") == "latency":
                continue
            a: dict[Any, float | None] = {}
            b: dict[Any, float | None] = {}
            for r in members:
                key = (r["reference"], r["prompt"], r["seed"], r["steps"])
                twin = off.get((r["backbone"], *key))
                if twin is not None and metric in twin["scores"] and metric in r["scores"]:
                    a[key], b[key] = value(twin, metric), value(r, metric)
            delta = paired_delta(a, b, resamples=resamples, seed=seed)
            if delta["n"] == 0:
                continue
            higher = _direction(metric_info, metric)
            lo, hi = delta["ci_low"], delta["ci_high"]
            from_adapter = None if higher is None or lo is None else \
                bool((lo > 0) if higher else (hi < 0))
            first = members[0]
            delta.update(backbone=backbone, setting=label, metric=metric,
                         higher_is_better=higher, from_adapter=from_adapter,
                         excluded_window_never_opens=never, missing=missing,
                         verdict=delta_verdict(delta, higher), adapter=first["adapter"],
                         scale=first.get("scale"), start=first.get("start") or 0.0,
                         end=1.0 if first.get("end") is None else first["end"],
                         steps=sorted({k[3] for k in a}))
            out.append(delta)
    return out


def trajectory_curves(rows: Sequence[Mapping[str, Any]],
                      trajectory_rows: Sequence[Mapping[str, Any]], *,
                      metric_info: Mapping[str, Mapping[str, Any]] | None = None,
                      margin: float | None = None, resamples: int = RESAMPLES,
                      seed: int = 0, fraction: float | None = None) -> list[Curve]:
    """Metric of the predicted clean image against the step index (1-based) of a run, per
    backbone, adapter setting and run length; regime (against the run's last step) and knee
    as for step counts, paired by cell. ``fraction`` is ignored (deprecated)."""
    del fraction
    metric_info = metric_info or {}
    by_cell = {r["key"]: r for r in rows if r["status"] == "done" and not window_never_opens(r)}
    series: dict[tuple[str, str, int, str], list[Observation]] = {}
    adapters: dict[tuple[str, str, int, str], str] = {}
    for t in trajectory_rows:
        row = by_cell.get(t["cell"])
        if row is None:
            continue
        key = (row["backbone"], row_label(row), row["steps"], t["metric"])
        series.setdefault(key, []).append(((row["reference"], row["prompt"], row["seed"]),
                                           t["step"] + 1, t["value"]))
        adapters[key] = row["adapter"]
    curves = []
    for key, observations in sorted(series.items()):
        backbone, label, total, metric = key
        info = metric_info.get(metric)
        curves.append(curve_from_observations(
            observations, backbone=backbone, setting=f"{label} ({total} steps)", metric=metric,
            info=info, adapter_name=adapters[key], margin=margin,
            regime=(info or {}).get("kind") != "latency", resamples=resamples, seed=seed))
    return curves


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


# ------------------------------------------------------------------------ where facts come from
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
