"""Along a run: the metric of the predicted clean image at every step (trajectory curves)
and the attention-stream probes per block and step, aggregated over cells."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapterswap.sweep.analysis.confounds import window_never_opens
from adapterswap.sweep.analysis.curves import Curve, Observation, curve_from_observations
from adapterswap.sweep.analysis.labels import row_label
from adapterswap.sweep.analysis.resampling import RESAMPLES


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
    """Blocks in natural order (``down.2`` before ``down.10``)."""
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
