"""Enhancer deltas: what each enhancer changes against no enhancer, and what it costs.

For every backbone, adapter setting and enhancer of a sweep, each metric's paired delta
``enhancer - none`` over identical (reference, prompt, seed, steps), clusters (reference,
prompt) resampled, with its verdict; and its cost: denoiser forwards per image on both sides,
and the median latency per image at the largest step count where both were timed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.analysis.confounds import window_never_opens
from adapterswap.sweep.analysis.deltas import enhancer_of
from adapterswap.sweep.analysis.facts import _direction
from adapterswap.sweep.analysis.labels import setting_label
from adapterswap.sweep.analysis.missing import worst_values
from adapterswap.sweep.analysis.paired import delta_verdict, paired_delta
from adapterswap.sweep.analysis.resampling import RESAMPLES, _finite


def _setting(row: Mapping[str, Any]) -> str:
    return setting_label(row["adapter"], row.get("scale"), row.get("start") or 0.0,
                         1.0 if row.get("end") is None else row["end"])


def _latency(latency_rows: Sequence[Mapping[str, Any]], row: Mapping[str, Any],
             enhancer: str, steps: int) -> float | None:
    """The newest batch-1 median latency of ``row``'s backbone and setting with ``enhancer``
    at ``steps``."""
    def same(a: Any, b: Any) -> bool:
        return (a is None and b is None) or (a is not None and b is not None
                                             and abs(float(a) - float(b)) < 1e-9)

    pool = [r for r in latency_rows
            if r.get("backbone") == row["backbone"] and r.get("adapter") == row["adapter"]
            and (r.get("enhancer") or "none") == enhancer and r.get("steps") == steps
            and same(r.get("start") or 0.0, row.get("start") or 0.0)
            and _finite(r.get("total_s"))]
    if not pool:
        return None
    best = max(pool, key=lambda r: ((r.get("batch") or 1) == 1, r.get("measured_at") or 0.0))
    return float(best["total_s"])


def enhancer_deltas(rows: Sequence[Mapping[str, Any]],
                    latency_rows: Sequence[Mapping[str, Any]] = (), *,
                    metric_info: Mapping[str, Mapping[str, Any]] | None = None,
                    missing: str = "drop", resamples: int = RESAMPLES,
                    seed: int = 0) -> list[dict[str, Any]]:
    """One entry per backbone, adapter setting and enhancer other than ``none`` whose cells
    have twins without it: ``metrics`` (each metric's paired delta with its CI and verdict),
    ``forwards`` (mean denoiser forwards per image, ``none`` and enhancer), ``latency_s`` (the
    median per image at ``latency_steps``, both sides) and ``latency_ratio`` (enhancer over
    none). Cells whose adapter window never opened are left out and counted."""
    metric_info = metric_info or {}
    done = [r for r in rows if r["status"] == "done" and r["adapter"] != "none"]
    fills = worst_values(done, metric_info) if missing == "worst" else {}
    base: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for r in done:
        if enhancer_of(r) == "none":
            base[(r["backbone"], _setting(r), r["reference"], r["prompt"], r["seed"],
                  r["steps"])] = r

    def value(row: Mapping[str, Any], metric: str) -> float | None:
        v = row["scores"].get(metric)
        return v if _finite(v) else fills.get(metric, (None, None))[0]

    out = []
    groups = sorted({(r["backbone"], _setting(r), enhancer_of(r)) for r in done
                     if enhancer_of(r) != "none"})
    for backbone, setting, enhancer in groups:
        members = [r for r in done if r["backbone"] == backbone and _setting(r) == setting
                   and enhancer_of(r) == enhancer]
        never = sum(1 for r in members if window_never_opens(r))
        pairs = []
        for r in members:
            if window_never_opens(r):
                continue
            twin = base.get((backbone, setting, r["reference"], r["prompt"], r["seed"],
                             r["steps"]))
            if twin is not None:
                pairs.append((twin, r))
        if not pairs:
            continue
        entry: dict[str, Any] = {"backbone": backbone, "setting": setting,
                                 "enhancer": enhancer, "n_pairs": len(pairs),
                                 "excluded_window_never_opens": never, "metrics": {}}
        counts = [(a.get("forwards"), b.get("forwards")) for a, b in pairs]
        counts = [(a, b) for a, b in counts if a and b]
        entry["forwards"] = {"none": sum(a for a, _ in counts) / len(counts),
                             enhancer: sum(b for _, b in counts) / len(counts)} \
            if counts else None
        top = max(r["steps"] for _, r in pairs)
        plain = _latency(latency_rows, pairs[0][1], "none", top)
        enhanced = _latency(latency_rows, pairs[0][1], enhancer, top)
        entry["latency_steps"] = top
        entry["latency_s"] = {"none": plain, enhancer: enhanced}
        entry["latency_ratio"] = enhanced / plain if plain and enhanced else None
        metrics = sorted({m for _, r in pairs for m in r["scores"]})
        for metric in metrics:
            if (metric_info.get(metric) or {}).get("kind") == "latency":
                continue
            a: dict[Any, float | None] = {}
            b: dict[Any, float | None] = {}
            for twin, r in pairs:
                if metric in twin["scores"] and metric in r["scores"]:
                    key = (r["reference"], r["prompt"], r["seed"], r["steps"])
                    a[key], b[key] = value(twin, metric), value(r, metric)
            delta = paired_delta(a, b, resamples=resamples, seed=seed)
            if delta["n"] == 0:
                continue
            higher = _direction(metric_info, metric)
            delta.update(higher_is_better=higher, verdict=delta_verdict(delta, higher))
            entry["metrics"][metric] = delta
        out.append(entry)
    return out
