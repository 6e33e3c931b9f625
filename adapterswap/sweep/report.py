"""Reports a person can look at: ``report.html`` (self-contained), ``plots/*.png``,
``results.csv`` and ``analysis.json``, all rebuilt from the store alone."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adapterswap.sweep.analysis import Analysis, analyse, swap_comparison
from adapterswap.sweep.store import RunStore

CSV_COLUMNS = ["backbone", "adapter", "scale", "start", "end", "reference", "prompt", "seed",
               "steps", "height", "width", "guidance_scale", "status", "image"]


def safe_name(text: str, limit: int = 60) -> str:
    """A file-name fragment: letters, digits, '-', '_' only, bounded length."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:limit]
    return cleaned or "x"


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, metrics: Sequence[str]) -> None:
    """One row per cell: its settings and one column per metric."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS + list(metrics) + ["latency_total_s", "latency_denoise_s"])
        for row in rows:
            writer.writerow([row.get(c) for c in CSV_COLUMNS]
                            + [row["scores"].get(m) for m in metrics]
                            + [row["timings"].get("total_s"), row["timings"].get("denoise_s")])


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def plot_curves(analysis: Analysis) -> dict[str, bytes]:
    """PNGs: per metric, mean vs steps per backbone and setting (95% CI band, regime and knee
    marked); the latency-fidelity Pareto plot; per metric, the trajectory of the predicted
    clean image along long runs."""
    plots = _metric_plots(analysis.curves, prefix="metric", xlabel="denoising steps",
                          title="{metric} vs steps (mean, 95% bootstrap CI)")
    plots.update(_metric_plots(analysis.trajectories, prefix="trajectory",
                               xlabel="step of the run (predicted clean image)",
                               title="{metric} along the run (x0 preview, mean, 95% CI)"))
    plots.update(_pareto_plot(analysis))
    plots.update(_probe_plots(analysis))
    return plots


def _probe_plots(analysis: Analysis) -> dict[str, bytes]:
    """Per probe quantity: a step x block heatmap (longest run) and the mean over blocks
    against the fraction of the schedule for every run length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = {}
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for probe_map in analysis.probes:
        groups.setdefault((probe_map.backbone, probe_map.setting, probe_map.quantity),
                          []).append(probe_map)
    for i, ((backbone, setting, quantity), maps) in enumerate(sorted(groups.items())):
        longest = max(maps, key=lambda m: m.num_steps)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, max(3.0, 0.18 * len(longest.blocks)
                                                             + 1.5)))
        image = ax1.imshow(np.array(longest.matrix), aspect="auto", cmap="viridis",
                           interpolation="nearest")
        ax1.set_yticks(range(len(longest.blocks)))
        ax1.set_yticklabels(longest.blocks, fontsize=6)
        ax1.set_xlabel(f"step (of {longest.num_steps})")
        ax1.set_title(f"{quantity} per block", fontsize=9)
        fig.colorbar(image, ax=ax1)
        for probe_map in sorted(maps, key=lambda m: m.num_steps):
            x = [(s + 1) / probe_map.num_steps for s in range(probe_map.num_steps)]
            ax2.plot(x, probe_map.mean_curve, marker="o", label=f"{probe_map.num_steps} steps")
        ax2.set_xlabel("fraction of the schedule")
        ax2.set_ylabel(f"mean {quantity} over blocks")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
        fig.suptitle(f"{backbone} + {setting}: {quantity}", fontsize=10)
        plots[f"probes-{i:02d}-{safe_name(backbone)}-{safe_name(quantity)}"] = _png(fig)
        plt.close(fig)
    return plots


def _metric_plots(curves: Sequence[Any], *, prefix: str, xlabel: str,
                  title: str) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    for metric in sorted({c.metric for c in curves}):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for curve in [c for c in curves if c.metric == metric]:
            label = f"{curve.backbone} + {curve.adapter}"
            line = ax.plot(curve.steps, curve.mean, marker="o", label=label)[0]
            low = [v if math.isfinite(v) else m for v, m in zip(curve.ci_low, curve.mean)]
            high = [v if math.isfinite(v) else m for v, m in zip(curve.ci_high, curve.mean)]
            ax.fill_between(curve.steps, low, high, color=line.get_color(), alpha=0.2)
            if curve.effective_regime is not None:
                ax.axvline(curve.effective_regime, color=line.get_color(), linestyle="--",
                           alpha=0.8, label=f"effective regime ({curve.effective_regime})")
            if curve.knee is not None:
                y = curve.mean[curve.steps.index(curve.knee)]
                ax.plot([curve.knee], [y], marker="*", markersize=14, color=line.get_color(),
                        linestyle="none", label=f"knee ({curve.knee})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        higher = next(c for c in curves if c.metric == metric).higher_is_better
        ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(title.format(metric=metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        plots[f"{prefix}-{safe_name(metric)}"] = _png(fig)
        plt.close(fig)
    return plots


def _pareto_plot(analysis: Analysis) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    if analysis.pareto:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, front in analysis.pareto.items():
            metric = analysis.fidelity_metric.get(label, "fidelity")
            curve = next(c for c in analysis.curves if f"{c.backbone}|{c.adapter}" == label
                         and c.metric == metric)
            lat = analysis.latency.get(label, {})
            pts = [(lat[s], m, s) for s, m in zip(curve.steps, curve.mean) if s in lat]
            if not pts:
                continue
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", alpha=0.5,
                           label=f"{label.replace('|', ' + ')} ({metric})")[0]
            ax.plot([p[0] for p in front], [p[1] for p in front], "-",
                    color=line.get_color())
            for x, y, s in pts:
                ax.annotate(str(s), (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("latency per image (s, batch 1)")
        ax.set_ylabel("fidelity")
        ax.set_title("latency-fidelity Pareto front (labels: steps)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        plots["pareto"] = _png(fig)
        plt.close(fig)
    return plots


def _trajectory_strips(store: RunStore, rows: Sequence[Mapping[str, Any]]) -> list[
        tuple[str, bytes]]:
    """The x0 preview strips of trajectory cells (first seed of each group only)."""
    strips = []
    seen = set()
    for row in rows:
        path = store.out / "images" / f"{row['key']}-trajectory.png"
        group = (row["backbone"], row["adapter"], row["reference"], row["prompt"], row["steps"])
        if row["status"] != "done" or group in seen or not path.is_file():
            continue
        seen.add(group)
        title = (f"{row['backbone']} + {row['adapter']} | {row['steps']} steps | seed "
                 f"{row['seed']} | {row['prompt']}")
        strips.append((title, path.read_bytes()))
    return strips


def image_grids(store: RunStore, rows: Sequence[Mapping[str, Any]],
                thumb: int = 128) -> list[tuple[str, bytes]]:
    """Per backbone, reference and prompt: a steps x seeds grid of the generated images."""
    from PIL import Image, ImageDraw

    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done" and row.get("image"):
            groups.setdefault((row["backbone"], row["adapter"], row["reference"], row["prompt"]),
                              []).append(row)
    grids = []
    for (backbone, adapter, reference, prompt), members in sorted(groups.items()):
        steps = sorted({r["steps"] for r in members})
        seeds = sorted({r["seed"] for r in members})
        label_w = 56
        grid = Image.new("RGB", (label_w + thumb * len(seeds), 20 + thumb * len(steps)), "white")
        draw = ImageDraw.Draw(grid)
        for j, seed in enumerate(seeds):
            draw.text((label_w + j * thumb + 4, 4), f"seed {seed}", fill="black")
        for i, n in enumerate(steps):
            draw.text((4, 20 + i * thumb + thumb // 2 - 6), f"{n} steps", fill="black")
            for j, seed in enumerate(seeds):
                match = [r for r in members if r["steps"] == n and r["seed"] == seed]
                if not match:
                    continue
                path = store.out / match[0]["image"]
                if path.is_file():
                    with Image.open(path) as im:
                        tile = im.convert("RGB").resize((thumb, thumb))
                    grid.paste(tile, (label_w + j * thumb, 20 + i * thumb))
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        title = f"{backbone} + {adapter} | {Path(reference).name or 'no reference'} | {prompt}"
        grids.append((title, buffer.getvalue()))
    return grids


def _table(headers: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return "-" if not math.isfinite(value) else f"{value:.4g}"
        return html.escape("-" if value is None else str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.5em 1em}
img{max-width:100%} figure{margin:1em 0} figcaption{font-size:13px;color:#555}
"""


def build_report(out: str | Path, *, fraction: float = 0.95,
                 latency_budget: float | None = None) -> Path:
    """Rebuild ``report.html``, ``plots/``, ``results.csv`` and ``analysis.json`` from the
    store in ``out``; return the report's path."""
    out = Path(out)
    if not (out / "results.sqlite").is_file():
        from adapterswap.errors import InvalidArgumentError

        raise InvalidArgumentError("DIR", str(out), "has no results.sqlite (run a sweep first)")
    with RunStore(out, lock=False) as store:
        rows = store.rows()
        latency_rows = store.latency_rows()
        status = store.metric_status()
        spec = store.meta("spec", {})
        versions = store.meta("versions", {})
        notes = store.meta("metric_notes", [])
        swap_meta = store.meta("swap")
        exit_meta = store.meta("probe_exit")
        trajectory_rows = store.trajectory_rows()
        analysis = analyse(rows, latency_rows, fraction=fraction, latency_budget=latency_budget,
                           trajectory_rows=trajectory_rows, probe_rows=store.probe_rows())
        strips = _trajectory_strips(store, rows)
        exits = []
        if exit_meta:
            from adapterswap.sweep.exit import exit_comparison

            exits = exit_comparison(rows, latency_rows, exit_meta, analysis.fidelity_metric)
            (out / "probe_exit.json").write_text(json.dumps(
                {"plan": exit_meta, "comparison": exits}, indent=2, default=str))
        store_swap = None
        if swap_meta:
            store_swap = swap_comparison(rows, latency_rows, source=swap_meta["from"],
                                         target=swap_meta["to"])
            (out / "swap.json").write_text(json.dumps(store_swap, indent=2, default=str))
        metrics = sorted({m for r in rows for m in r["scores"]})
        write_csv(rows, out / "results.csv", metrics)
        (out / "analysis.json").write_text(json.dumps(analysis.to_dict(), indent=2,
                                                      default=str))
        plots = plot_curves(analysis)
        grids = image_grids(store, rows)
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    for name, png in plots.items():
        (plot_dir / f"{name}.png").write_bytes(png)
    for i, (_, png) in enumerate(grids):
        (plot_dir / f"grid-{i:03d}.png").write_bytes(png)
    for i, (_, png) in enumerate(strips):
        (plot_dir / f"trajectory-strip-{i:03d}.png").write_bytes(png)

    parts = [f"<h1>adapterswap sweep report</h1><p>{len(rows)} cells "
             f"({sum(r['status'] == 'done' for r in rows)} done, "
             f"{sum(r['status'] == 'failed' for r in rows)} failed) in "
             f"<code>{html.escape(str(out))}</code>.</p>"]
    unavailable = {m: r for m, (ok, r) in status.items() if not ok}
    for metric, reason in sorted(unavailable.items()):
        parts.append(f'<p class="warn">Metric <b>{html.escape(metric)}</b> is unavailable: '
                     f"{html.escape(reason or '')}</p>")
    for note in notes:
        parts.append(f'<p class="warn">{html.escape(note)}</p>')
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        parts.append(_table(["backbone", "prompt", "seed", "steps", "error"],
                            [[r["backbone"], r["prompt"], r["seed"], r["steps"], r["error"]]
                             for r in failed]))
    swap = store_swap
    if swap:
        parts.append(f"<h2>Swap: {html.escape(swap['from'])} &rarr; {html.escape(swap['to'])}"
                     "</h2>")
        lat = swap.get("latency")
        if lat:
            parts.append(f"<p>Latency per image (batch 1): {lat['from_s']:.4g} s &rarr; "
                         f"{lat['to_s']:.4g} s: <b>{lat['speedup']:.2f}x faster</b>.</p>")
        parts.append(_table(
            ["metric", "from (mean)", "to (mean)", "delta (to - from)", "95% CI low",
             "95% CI high", "pairs", "higher is better"],
            [[m, d["from_mean"], d["to_mean"], d["mean"], d["ci_low"], d["ci_high"], d["n"],
              d["higher_is_better"]] for m, d in swap["metrics"].items()]))
    done_rows = [r for r in rows if r["status"] == "done"]
    coverage = []
    for metric in metrics:
        values = [r["scores"].get(metric) for r in done_rows if metric in r["scores"]]
        missing = sum(v is None for v in values)
        coverage.append([metric, len(values) - missing, missing,
                         len(done_rows) - len(values)])
    if coverage:
        parts.append("<h2>Scores</h2>")
        parts.append(_table(["metric", "scored cells", "undefined (None)", "not scored"],
                            coverage))
    parts.append("<h2>Recommendations</h2>")
    parts.append(_table(
        ["backbone", "adapter", "fidelity metric", "steps", "target", "latency (s)", "why"],
        [[r.backbone, r.adapter, r.metric, r.steps, r.target, r.latency_s, r.reason]
         for r in analysis.recommendations]))
    parts.append("<h2>Effective regime and knee</h2>")
    parts.append(_table(
        ["backbone", "adapter", "metric", "effective regime (steps)", "knee (steps)",
         "plateau (mean at max steps)"],
        [[c.backbone, c.adapter, c.metric, c.effective_regime, c.knee, c.mean[-1]]
         for c in analysis.curves if c.metric != "latency"]))
    parts.append("<h2>Metrics vs steps</h2>")
    for name, png in plots.items():
        if name.startswith("metric-"):
            parts.append(f'<figure><img alt="{html.escape(name)}" src="{_data_uri(png)}">'
                         f"</figure>")
    if "pareto" in plots:
        parts.append("<h2>Latency-fidelity Pareto front</h2>")
        parts.append(f'<figure><img alt="pareto" src="{_data_uri(plots["pareto"])}"></figure>')
    if analysis.ablations:
        parts.append("<h2>Adapter ablation: setting minus adapter off</h2>")
        parts.append("<p>Paired over backbone, reference, prompt, seed and steps. "
                     "<b>from adapter</b>: the 95% CI excludes zero in the metric's better "
                     "direction.</p>")
        parts.append(_table(
            ["backbone", "setting", "metric", "delta", "95% CI low", "95% CI high", "pairs",
             "from adapter"],
            [[a["backbone"], a["setting"], a["metric"], a["mean"], a["ci_low"], a["ci_high"],
              a["n"], "yes" if a["from_adapter"] else "no"] for a in analysis.ablations]))
    if analysis.trajectories:
        parts.append("<h2>Trajectories: the predicted clean image at every step</h2>")
        parts.append(_table(
            ["backbone", "run", "metric", "effective regime (step)", "knee (step)"],
            [[c.backbone, c.adapter, c.metric, c.effective_regime, c.knee]
             for c in analysis.trajectories]))
        for name, png in plots.items():
            if name.startswith("trajectory-"):
                parts.append(f'<figure><img alt="{html.escape(name)}" src="{_data_uri(png)}">'
                             "</figure>")
        for title, png in strips:
            parts.append(f'<figure><img alt="x0 strip" src="{_data_uri(png)}"><figcaption>'
                         f"x0 previews, step 1 to the last: {html.escape(title)}</figcaption>"
                         "</figure>")
    if exit_meta:
        parts.append("<h2>Probe-guided adapter exit</h2>")
        parts.append(f"<p>The adapter's window ends at the first step where its relative "
                     f"contribution ({html.escape(exit_meta['quantity'])}, mean over blocks) "
                     f"falls below {exit_meta['threshold']:g}; the same cells ran with that "
                     "window. Deltas are exit minus full window, paired by reference, prompt "
                     "and seed.</p>")
        body = []
        for e in exits:
            for metric, d in e["deltas"].items():
                body.append([e["backbone"], e["steps"], e["exit_step"],
                             f"{e['adapter_compute_saved']:.0%}", e["latency_full_s"],
                             e["latency_exit_s"], metric, d["mean"], d["ci_low"], d["ci_high"],
                             d["n"]])
        parts.append(_table(["backbone", "steps", "exit at step", "adapter steps saved",
                             "latency full (s)", "latency exit (s)", "metric", "delta",
                             "95% CI low", "95% CI high", "pairs"], body))
        never = [p for p in exit_meta["plan"] if p["exit_step"] is None]
        for p in never:
            parts.append(f"<p>{html.escape(p['backbone'])}, {p['steps']} steps: the "
                         "contribution never fell below the threshold; full window kept.</p>")
    if analysis.probes:
        parts.append("<h2>Attention-stream probes</h2>")
        parts.append("<p>Norm of the adapter's (or text) stream relative to the base stream, "
                     "per block and step, averaged over cells.</p>")
        parts.append(_table(
            ["backbone", "setting", "quantity", "steps", "cells", "first step (mean)",
             "last step (mean)"],
            [[m.backbone, m.setting, m.quantity, m.num_steps, m.cells, m.mean_curve[0],
              m.mean_curve[-1]] for m in analysis.probes]))
        for name, png in plots.items():
            if name.startswith("probes-"):
                parts.append(f'<figure><img alt="{html.escape(name)}" src="{_data_uri(png)}">'
                             "</figure>")
    parts.append("<h2>Per-step tables</h2>")
    for curve in analysis.curves:
        parts.append(f"<h3>{html.escape(curve.backbone)} + {html.escape(curve.adapter)}: "
                     f"{html.escape(curve.metric)}</h3>")
        parts.append(_table(["steps", "n", "mean", "95% CI low", "95% CI high"],
                            list(zip(curve.steps, curve.n, curve.mean, curve.ci_low,
                                     curve.ci_high))))
    parts.append("<h2>Images (rows: steps, columns: seeds)</h2>")
    for title, png in grids:
        parts.append(f'<figure><img alt="grid" src="{_data_uri(png)}"><figcaption>'
                     f"{html.escape(title)}</figcaption></figure>")
    parts.append("<h2>Run</h2>")
    parts.append(_table(["setting", "value"],
                        [[k, json.dumps(v)] for k, v in sorted((spec or {}).items())]
                        + [[f"version: {k}", v] for k, v in sorted(versions.items())]))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>adapterswap report"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    report = out / "report.html"
    report.write_text(page, encoding="utf-8")
    return report
