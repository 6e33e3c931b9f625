"""The fidelity cost of an approximation, measured on the same inputs.

Run a sweep twice into two output directories, once exact and once with an approximation
(``--fp8``, ``--cache ...``), then ``adapterswap compare EXACT APPROX``. Cells are paired by
what defines their inputs (backbone, adapter setting, reference, prompt, seed, steps, size,
guidance); per backbone, adapter and step count the comparison gives:

- the pixel distance of each pair: PSNR (dB; ``inf`` for identical images) and, where the
  ``lpips`` metric can load, LPIPS between the two images;
- the paired change of every metric both runs scored (approximate minus exact) with its
  bootstrap 95% CI over reference, prompt and seed (clusters: reference, prompt;
  "n too small" instead of an interval below two), directions from the stores' records;
- the measured latency of both runs (where they timed it) and the speed-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError, UsageError

#: Cell fields that define a cell's inputs (the key also hashes versions and approximations).
MATCH = ("backbone", "adapter", "scale", "start", "end", "reference", "prompt", "seed",
         "steps", "height", "width", "guidance_scale")
#: Within a group (backbone, adapter, steps), pairs are matched over these for the deltas.
_PAIR = ("reference", "prompt", "seed", "scale", "start", "end", "height", "width",
         "guidance_scale")


def load_run(directory: str | Path, argument: str, *, all_runs: bool = False) -> dict[str, Any]:
    """The finished cells (of the newest run's spec unless ``all_runs``), latency rows and
    approximation of one sweep directory."""
    from adapterswap.sweep.store import RunStore

    path = Path(directory)
    if not (path / "results.sqlite").is_file():
        raise InvalidArgumentError(argument, str(directory),
                                   "no sweep store (results.sqlite) in that directory")
    from adapterswap.sweep.analysis import resolve_metric_info

    with RunStore(path, lock=False) as store:
        keys = None if all_runs else store.current_keys()
        rows = [r for r in store.rows(keys) if r["status"] == "done"]
        latency = store.latency_rows(None if all_runs else rows)
        latest = store.latest_run()
        versions = (latest or {}).get("versions") or store.meta("versions") or {}
        info, source = resolve_metric_info(store, {m for r in rows for m in r["scores"]})
    return {"dir": str(path), "rows": rows, "latency": latency,
            "approximation": versions.get("approximation"), "metric_info": info,
            "metric_info_source": source}


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB between two 8-bit RGB images of one size (``inf`` when identical)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise UsageError(f"cannot compare images of sizes {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _lpips(options: Mapping[str, Any], device: str | None) -> tuple[Any, str | None]:
    """The LPIPS metric against baselines, or ``None`` and why it is missing."""
    from adapterswap.plugins import get_metric

    try:
        cls = get_metric("lpips")
    except Exception as exc:  # noqa: BLE001 - no metrics plugin: say so, compare without
        return None, f"no lpips metric registered ({exc})"
    metric = cls(device=device, **{**options, "against": "baseline"})
    try:
        metric.load()
    except MetricUnavailableError as exc:
        return None, str(exc)
    return metric, None


def compare_runs(exact_dir: str | Path, approx_dir: str | Path, *,
                 lpips_options: Mapping[str, Any] | None = None, lpips: bool = True,
                 device: str | None = None, all_runs: bool = False) -> dict[str, Any]:
    """Pair the cells of two runs and measure what the approximation costs (module doc)."""
    from PIL import Image

    from adapterswap.metrics.base import MetricBatch
    from adapterswap.sweep.analysis import paired_delta, window_never_opens

    exact = load_run(exact_dir, "EXACT", all_runs=all_runs)
    approx = load_run(approx_dir, "APPROX", all_runs=all_runs)
    if Path(exact["dir"]).resolve() == Path(approx["dir"]).resolve():
        raise InvalidArgumentError("APPROX", str(approx_dir), "is the EXACT run itself")
    metric_info = {**approx["metric_info"], **exact["metric_info"]}
    by_inputs = {tuple(r[f] for f in MATCH): r for r in exact["rows"]}
    pairs = [(by_inputs[k], r) for r in approx["rows"]
             if (k := tuple(r[f] for f in MATCH)) in by_inputs]
    if not pairs:
        raise UsageError(f"no finished cell of {approx['dir']} has the inputs of one in "
                         f"{exact['dir']}: run the same sweep (backbones, references, prompts, "
                         "seeds, steps, size) twice, once with the approximation")
    metric, lpips_missing = (None, "not asked for")
    if lpips:
        metric, lpips_missing = _lpips(lpips_options or {}, device)

    def image(run: dict[str, Any], row: Mapping[str, Any]) -> Any:
        if not row.get("image"):
            raise UsageError(f"cell {row['key']} of {run['dir']} has no saved image (the "
                             "sweep ran with save_images off); pixel distances need both images")
        with Image.open(Path(run["dir"]) / row["image"]) as im:
            return im.convert("RGB")

    groups: dict[tuple[str, str, int], list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for a, b in pairs:
        groups.setdefault((a["backbone"], a["adapter"], a["steps"]), []).append((a, b))
    out = []
    for (backbone, adapter, steps), members in sorted(groups.items()):
        images = [(image(exact, a), image(approx, b)) for a, b in members]
        psnrs = [psnr(x, y) for x, y in images]
        lpips_values: list[float | None] = []
        if metric is not None:
            batch = MetricBatch(images=[y for _, y in images],
                                references=[None] * len(images),
                                prompts=[b["prompt"] for _, b in members],
                                baselines=[x for x, _ in images], purpose="final")
            lpips_values = list(metric.score(batch))
        metrics = sorted({m for a, b in members for m in a["scores"] if m in b["scores"]})
        deltas = {}
        for name in metrics:
            # pairs whose adapter window never opened on either side are no adapter cells
            kept = [(a, b) for a, b in members
                    if not (window_never_opens(a) or window_never_opens(b))]
            before = {tuple(a[f] for f in _PAIR): a["scores"][name] for a, _ in kept}
            after = {tuple(a[f] for f in _PAIR): b["scores"][name] for a, b in kept}
            higher = (metric_info.get(name) or {}).get("higher_is_better")
            # clusters: (reference, prompt), the first two fields of _PAIR
            deltas[name] = {**paired_delta(before, after, cluster_of=lambda k: k[:2]),
                            "higher_is_better": None if higher is None else bool(higher)}
        first = members[0][0]
        latency = {label: _latency(run["latency"], first) for label, run in
                   (("exact", exact), ("approx", approx))}
        finite = [p for p in psnrs if math.isfinite(p)]
        scored = [v for v in lpips_values if v is not None]
        out.append({
            "backbone": backbone, "adapter": adapter, "steps": steps, "pairs": len(members),
            "identical": len(psnrs) - len(finite),
            "psnr_db_mean": float(np.mean(finite)) if finite else math.inf,
            "psnr_db_min": min(psnrs),
            "lpips_mean": float(np.mean(scored)) if scored else None,
            "lpips_max": max(scored) if scored else None,
            "latency_exact_s": latency["exact"], "latency_approx_s": latency["approx"],
            "speedup": (latency["exact"] / latency["approx"]
                        if latency["exact"] and latency["approx"] else None),
            "deltas": deltas,
        })
    return {"exact": {"dir": exact["dir"], "approximation": exact["approximation"]},
            "approx": {"dir": approx["dir"], "approximation": approx["approximation"]},
            "lpips": None if metric is not None else lpips_missing,
            "metric_info_source": exact["metric_info_source"],
            "unpaired_approx_cells": len(approx["rows"]) - len(pairs), "groups": out}


def _latency(rows: Sequence[Mapping[str, Any]], cell: Mapping[str, Any]) -> float | None:
    for r in rows:
        if all(r[f] == cell[f] for f in ("backbone", "adapter", "steps", "height", "width",
                                          "start", "end")):
            return r["total_s"]
    return None


def format_comparison(result: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`compare_runs`' result."""
    lines = [f"exact:  {result['exact']['dir']} "
             f"(approximation: {result['exact']['approximation'] or 'none'})",
             f"approx: {result['approx']['dir']} "
             f"(approximation: {result['approx']['approximation'] or 'none'})"]
    if result["lpips"]:
        lines.append(f"LPIPS not measured: {result['lpips']}")
    for g in result["groups"]:
        psnr_text = "identical" if g["identical"] == g["pairs"] else \
            f"PSNR {g['psnr_db_mean']:.1f} dB (min {g['psnr_db_min']:.1f})"
        parts = [f"{g['backbone']} / {g['adapter']} / {g['steps']} steps: {g['pairs']} pairs, "
                 f"{psnr_text}"]
        if g["lpips_mean"] is not None:
            parts.append(f"LPIPS {g['lpips_mean']:.4f} (max {g['lpips_max']:.4f})")
        if g["speedup"]:
            parts.append(f"latency {g['latency_exact_s']:.3f} -> {g['latency_approx_s']:.3f} s "
                         f"({g['speedup']:.2f}x)")
        lines.append(", ".join(parts))
        for name, d in g["deltas"].items():
            if d["n"]:
                interval = ("n too small" if d["ci_low"] is None else
                            f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]")
                better = {True: "higher is better", False: "lower is better"}.get(
                    d["higher_is_better"], "direction unknown")
                lines.append(f"    {name}: {d['mean']:+.4f} {interval} (n={d['n']}, "
                             f"{d['clusters']} clusters, {better})")
    if result["unpaired_approx_cells"]:
        lines.append(f"{result['unpaired_approx_cells']} approximate cells had no exact twin")
    return "\n".join(lines)
