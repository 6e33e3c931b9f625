"""The effective regime and the knee of a metric-vs-steps curve, once for the mean curve
and at once for every bootstrap resample, with the distribution of either over resamples
and the seed noise that is the regime's default margin."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from adapterswap.sweep.analysis.resampling import _finite

#: Level of the intervals of the effective regime and the knee (over resamples).
REGIME_LEVEL = 0.90
#: "Within the margin" is inclusive: differences that equal the margin up to float rounding
#: (a few ulps of values of order 1) count as within it.
_ROUNDING = 1e-12


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
