"""Missing scores: an attempted image a metric could not score is dropped, or scored as the
metric's worst value (recorded, else the worst observed), which bounds the bias of
dropping it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.analysis.facts import _direction
from adapterswap.sweep.analysis.resampling import _finite

MISSING_POLICIES = ("drop", "worst")


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
