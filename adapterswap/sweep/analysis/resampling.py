"""The bootstrap core: how units (seeds of one reference and prompt) are grouped into
clusters and resampled with replacement, and the percentile intervals drawn from the
resamples (the package doc states the statistics). Every interval of the analysis comes
from here, so a mean, a difference and a regime computed from one resample are paired."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Bootstrap resamples unless told otherwise.
RESAMPLES = 2000
#: Level of the intervals of means and differences.
CI_LEVEL = 0.95
#: What the report says instead of an interval that cannot be computed.
N_TOO_SMALL = "n too small"


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


def _finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)
