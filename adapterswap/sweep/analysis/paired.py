"""Paired deltas: the mean of ``b - a`` over the image pairs two conditions share, with a
clustered bootstrap interval, and its verdict in words (what the swap, ablation and exit
comparisons report)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np

from adapterswap.sweep.analysis.resampling import (
    CI_LEVEL,
    N_TOO_SMALL,
    RESAMPLES,
    _cluster_index,
    _finite,
    _interval_lists,
    _resampling,
)

#: The verdicts of a paired delta (:func:`delta_verdict`), in the report's words.
BETTER, WORSE = "better", "worse"
NO_DIFFERENCE = "no significant difference"
N_TOO_SMALL_TO_TELL = "n too small to tell"


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
