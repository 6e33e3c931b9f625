"""Swap and ablation deltas: paired differences between two backbones (the swap) and between
each adapter setting and adapter off (the ablations), over identical references, prompts
and seeds, with their verdicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from adapterswap.sweep.analysis.confounds import window_never_opens
from adapterswap.sweep.analysis.facts import _direction
from adapterswap.sweep.analysis.labels import row_label
from adapterswap.sweep.analysis.latency import latency_summary
from adapterswap.sweep.analysis.missing import worst_values
from adapterswap.sweep.analysis.paired import delta_verdict, paired_delta
from adapterswap.sweep.analysis.resampling import RESAMPLES, _finite


def enhancer_of(row: Mapping[str, Any]) -> str:
    """A row's enhancer (``"none"`` also for rows stored before enhancers existed)."""
    return row.get("enhancer") or "none"


def swap_comparison(rows: Sequence[Mapping[str, Any]],
                    latency_rows: Sequence[Mapping[str, Any]], *, source: str, target: str,
                    metric_info: Mapping[str, Mapping[str, Any]] | None = None,
                    missing: str = "drop", resamples: int = RESAMPLES,
                    seed: int = 0, enhancer: str = "none") -> dict[str, Any]:
    """The swap's headline: the median-latency ratio ``source / target`` at each backbone's
    largest step count, and each metric's paired delta ``target - source`` over identical
    (reference, prompt, seed), clusters (reference, prompt) resampled, with its
    :func:`delta_verdict` (``verdict``). The source runs without an enhancer, the target with
    ``enhancer`` (its rows and latency only); ``forwards``: denoiser forwards per image on
    each side (the enhancer's cost). Cells whose adapter window never opened are left out and
    counted."""
    metric_info = metric_info or {}
    wanted = {source: "none", target: enhancer}
    done = [r for r in rows if r["status"] == "done" and r["backbone"] in wanted
            and enhancer_of(r) == wanted[r["backbone"]]]
    latency_rows = [r for r in latency_rows if r.get("backbone") in wanted
                    and (r.get("enhancer") or "none") == wanted[r["backbone"]]]
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
    result: dict[str, Any] = {"from": source, "to": target, "enhancer": enhancer,
                              "steps": steps, "metrics": {}, "forwards": {},
                              "excluded_window_never_opens": excluded, "missing": missing}
    for side, backbone in (("from", source), ("to", target)):
        counts = [r["forwards"] for r in done if r["backbone"] == backbone
                  and r.get("forwards") and steps[backbone] and r["steps"] == steps[backbone][-1]]
        result["forwards"][side] = float(np.mean(counts)) if counts else None
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


def swap_comparisons(rows: Sequence[Mapping[str, Any]],
                     latency_rows: Sequence[Mapping[str, Any]], *, source: str,
                     targets: Sequence[str], **options: Any) -> list[dict[str, Any]]:
    """:func:`swap_comparison` of ``source`` (no enhancer) against each target with each
    enhancer its cells ran, in target order then enhancer order (``none`` first)."""
    out = []
    for target in targets:
        enhancers = sorted({enhancer_of(r) for r in rows if r["backbone"] == target},
                           key=lambda e: (e != "none", e))
        for enhancer in enhancers or ["none"]:
            out.append(swap_comparison(rows, latency_rows, source=source, target=target,
                                       enhancer=enhancer, **options))
    return out


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
