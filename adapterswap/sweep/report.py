"""Reports a person can look at: ``report.html`` (self-contained), ``plots/*.png``,
``results.csv`` and ``analysis.json``, all rebuilt from the store alone.

Every mean is shown with its interval (or "n too small") and its share of images scored;
regimes and knees with their bootstrap intervals; recommendations only on a fidelity metric
of the adapter's kind (:mod:`adapterswap.sweep.analysis` has the statistics).
"""

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

from adapterswap.sweep.analysis import (
    N_TOO_SMALL,
    Analysis,
    analyse,
    resolve_adapter_kinds,
    resolve_metric_info,
    swap_comparison,
)
from adapterswap.sweep.store import RunStore

_SCOPE_NOTE = (" (the cells of the newest run; every run's cells: "
               "<code>adapterswap report --all-runs</code>)")

CSV_COLUMNS = ["backbone", "adapter", "scale", "start", "end", "reference", "prompt", "seed",
               "steps", "height", "width", "guidance_scale", "status", "image"]

#: What each confound flag means, for the report's warning block.
CONFOUND_TEXT = {
    "window_never_opens": "the adapter's window acted at none of the steps: an adapter-off "
                          "cell under an adapter label, left out of the setting's curve, "
                          "regime and ablation deltas",
    "schedule_starts_far_from_noise": "the schedule's first step assumes much less noise "
                                      "than the pure noise the engine feeds: these cells "
                                      "measure the schedule, not the step count",
}


def safe_name(text: str, limit: int = 60) -> str:
    """A file-name fragment: letters, digits, '-', '_' only, bounded length."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:limit]
    return cleaned or "x"


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, metrics: Sequence[str]) -> None:
    """One row per cell: its settings and one column per metric (empty: not scored)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS + list(metrics) + ["latency_total_s", "latency_denoise_s",
                                                       "adapter_active_steps", "confounds"])
        for row in rows:
            writer.writerow([row.get(c) for c in CSV_COLUMNS]
                            + [row["scores"].get(m) for m in metrics]
                            + [row["timings"].get("total_s"), row["timings"].get("denoise_s"),
                               row.get("adapter_active_steps"),
                               ";".join(row.get("confounds") or [])])


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def plot_curves(analysis: Analysis) -> dict[str, bytes]:
    """PNGs: per metric, mean vs steps per backbone and setting (95% CI band where an
    interval exists, regime with its 90% interval and knee marked) over a panel of the share
    of images scored; the latency-fidelity Pareto plot; per metric, the trajectory of the
    predicted clean image along long runs; probe heatmaps."""
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


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _metric_plots(curves: Sequence[Any], *, prefix: str, xlabel: str,
                  title: str) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = {}
    for metric in sorted({c.metric for c in curves}):
        fig, (ax, share_ax) = plt.subplots(2, 1, figsize=(6, 4.6), sharex=True,
                                           gridspec_kw={"height_ratios": [3, 1]})
        members = [c for c in curves if c.metric == metric]
        any_interval = False
        for curve in members:
            label = f"{curve.backbone} + {curve.adapter}"
            x = np.array(curve.steps, dtype=float)
            mean = np.array(_nan(curve.mean))
            line = ax.plot(x, mean, marker="o", label=label)[0]
            colour = line.get_color()
            low, high = np.array(_nan(curve.ci_low)), np.array(_nan(curve.ci_high))
            has = np.isfinite(low) & np.isfinite(high)
            if has.any():  # bands only where an interval exists (n too small: none)
                any_interval = True
                ax.fill_between(x, low, high, where=has, color=colour, alpha=0.2,
                                interpolate=False)
                ax.vlines(x[has], low[has], high[has], color=colour, alpha=0.6)
            if curve.effective_regime is not None:
                ax.axvline(curve.effective_regime, color=colour, linestyle="--", alpha=0.8,
                           label=f"effective regime ({curve.effective_regime})")
                if curve.regime_interval and curve.regime_interval[0] != \
                        curve.regime_interval[1]:
                    ax.axvspan(curve.regime_interval[0], curve.regime_interval[1],
                               color=colour, alpha=0.08,
                               label=f"regime 90% interval ({curve.regime_interval[0]}-"
                                     f"{curve.regime_interval[1]})")
            if curve.knee is not None and curve.knee in curve.steps:
                y = curve.mean[curve.steps.index(curve.knee)]
                ax.plot([curve.knee], [y], marker="*", markersize=14, color=colour,
                        linestyle="none", label=f"knee ({curve.knee})")
            share_ax.plot(x, _nan(curve.scored_share), marker=".", color=colour)
        ax.set_xscale("log", base=2)
        directions = {c.direction for c in members}
        direction = directions.pop() if len(directions) == 1 else "mixed"
        ax.set_ylabel(f"{metric} ({direction} is better)" if direction in ("higher", "lower")
                      else f"{metric} (direction unknown)")
        ax.set_title(title.format(metric=metric) if any_interval else
                     f"{title.split(' (')[0].format(metric=metric)} (mean; {N_TOO_SMALL} "
                     "for an interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        share_ax.set_ylim(-0.05, 1.05)
        share_ax.set_ylabel("scored", fontsize=8)
        share_ax.set_xlabel(xlabel)
        share_ax.grid(alpha=0.3)
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
            metric = analysis.fidelity_metric.get(label)
            curve = next((c for c in analysis.curves if c.label == label
                          and c.metric == metric), None)
            if curve is None:
                continue
            lat = analysis.latency.get(label, {})
            pts = [(lat[s]["median_s"], m, s) for s, m in zip(curve.steps, curve.mean)
                   if s in lat and m is not None]
            if not pts:
                continue
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", alpha=0.5,
                           label=f"{label.replace('|', ' + ')} ({metric})")[0]
            ax.plot([p[0] for p in front], [p[1] for p in front], "-",
                    color=line.get_color())
            for x, y, s in pts:
                ax.annotate(str(s), (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("median latency per image (s, batch 1)")
        ax.set_ylabel("fidelity (the adapter kind's metric)")
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


class _Raw(str):
    """Table cell text that is already HTML."""


def _fmt(value: Any) -> str:
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape("-" if value is None else str(value))


def _table(headers: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _ci(low: float | None, high: float | None) -> str:
    """``[low, high]``, or "n too small" where there is no interval."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return N_TOO_SMALL
    return f"[{low:.4g}, {high:.4g}]"


def _span(interval: Sequence[int] | None) -> str:
    return N_TOO_SMALL if not interval else f"{interval[0]}-{interval[1]}"


def _quartiles(entry: Mapping[str, Any]) -> str:
    """A latency row's IQR as ``q1-q3`` (a spread over repeats, not a confidence interval)."""
    if entry.get("iqr_s") is not None:
        return f"{entry['q1_s']:.4g}-{entry['q3_s']:.4g}"
    return "-" if entry.get("method") == "fitted" else N_TOO_SMALL


def _knee_span(curve: Any) -> str:
    if curve.knee_interval:
        return _span(curve.knee_interval)
    if curve.resampling is None or curve.knee_none_share is None:
        return N_TOO_SMALL if curve.effective_regime is not None else "-"
    return "no knee in any resample"


def _share(scored: int, attempted: int) -> str:
    return "-" if not attempted else f"{scored}/{attempted} ({scored / attempted:.0%})"


def _latency_text(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("median_s") is None:
        return "-"
    text = f"{entry['median_s']:.4g} s"
    if entry.get("method") != "fitted" or entry.get("iqr_s") is not None:
        text += f" (IQR {_quartiles(entry)})"
    return text


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.5em 1em}
img{max-width:100%} figure{margin:1em 0} figcaption{font-size:13px;color:#555}
"""


def _statistics_note(analysis: Analysis) -> str:
    o = analysis.options
    missing = ("unscored images are left out (<code>missing=\"drop\"</code>)"
               if o.get("missing") == "drop" else
               "unscored images count as the metric's worst value (<code>missing=\"worst\""
               "</code>: the recorded worst, else the worst observed in the sweep)")
    margin = (f"the given margin {o['margin']:g}" if o.get("margin") is not None else
              "each metric's seed-to-seed noise at its largest step count (standard "
              "deviation across seeds within a (reference, prompt), pooled)")
    return (
        "<p>Intervals are percentile bootstraps over "
        f"{o.get('resamples')} resamples (seed {o.get('seed')}) that draw whole (reference, "
        "prompt) clusters with replacement, each with all its seeds at every step count, so "
        "differences between step counts are paired; with a single (reference, prompt) the "
        "seeds are resampled and the interval covers seed noise only. With fewer than two "
        f"resampling units there is no interval (<i>{N_TOO_SMALL}</i>). Means: 95% intervals. "
        "<b>Effective regime</b>: the fewest steps whose paired mean difference from the "
        f"largest step count is within the margin in the metric's better direction; margin: "
        f"{margin}. Regime and knee (Kneedle) are recomputed on every resample: mode and 90% "
        f"interval. Missing scores: {missing}; <i>scored</i> is images scored of images "
        "attempted.</p>")


def build_report(out: str | Path, *, fraction: float | None = None,
                 latency_budget: float | None = None, all_runs: bool = False,
                 missing: str = "drop", margin: float | None = None) -> Path:
    """Rebuild ``report.html``, ``plots/``, ``results.csv`` and ``analysis.json`` from the
    store in ``out``; return the report's path.

    :param fraction: deprecated, ignored (the effective regime is the margin rule).
    :param latency_budget: seconds per image (median) the recommendation must fit.
    :param all_runs: every cell in the store, not only those of the newest run's spec.
    :param missing: ``"drop"`` or ``"worst"`` (:func:`~adapterswap.sweep.analysis.analyse`).
    :param margin: the effective regime's margin for every metric (default: seed noise).
    """
    out = Path(out)
    if not (out / "results.sqlite").is_file():
        from adapterswap.errors import InvalidArgumentError

        raise InvalidArgumentError("DIR", str(out), "has no results.sqlite (run a sweep first)")
    with RunStore(out, lock=False) as store:
        keys = None if all_runs else store.current_keys()
        rows = store.rows(keys)
        latency_rows = store.latency_rows(None if all_runs else rows)
        status = store.metric_status()
        spec = store.meta("spec", {})
        versions = store.meta("versions", {})
        notes = store.meta("metric_notes", [])
        swap_meta = store.meta("swap")
        exit_meta = store.meta("probe_exit")
        trajectory_rows = store.trajectory_rows()
        metrics = sorted({m for r in rows for m in r["scores"]}
                         | {t["metric"] for t in trajectory_rows})
        metric_info, info_source = resolve_metric_info(store, metrics)
        adapter_kinds, kinds_source = resolve_adapter_kinds(store, {r["adapter"] for r in rows})
        analysis = analyse(rows, latency_rows, metric_info=metric_info,
                           adapter_kinds=adapter_kinds, fraction=fraction,
                           latency_budget=latency_budget, margin=margin, missing=missing,
                           trajectory_rows=trajectory_rows, probe_rows=store.probe_rows(),
                           metric_info_source=info_source, adapter_kinds_source=kinds_source)
        analysis.options["all_runs"] = all_runs
        analysis.options["cells_shown"] = "every run" if keys is None else "newest run's spec"
        strips = _trajectory_strips(store, rows)
        exits = []
        if exit_meta:
            from adapterswap.sweep.exit import exit_comparison

            exits = exit_comparison(rows, latency_rows, exit_meta, analysis.fidelity_metric,
                                    metric_info=metric_info)
            (out / "probe_exit.json").write_text(json.dumps(
                {"plan": exit_meta, "comparison": exits}, indent=2, default=str))
        store_swap = None
        if swap_meta:
            store_swap = swap_comparison(rows, latency_rows, source=swap_meta["from"],
                                         target=swap_meta["to"], metric_info=metric_info,
                                         missing=missing)
            (out / "swap.json").write_text(json.dumps(store_swap, indent=2, default=str))
        cell_metrics = sorted({m for r in rows for m in r["scores"]})
        write_csv(rows, out / "results.csv", cell_metrics)
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
             f"<code>{html.escape(str(out))}</code>"
             f"{'' if keys is None else _SCOPE_NOTE}.</p>"]
    parts.extend(_source_warnings(analysis))
    unavailable = {m: r for m, (ok, r) in status.items() if not ok}
    for metric, reason in sorted(unavailable.items()):
        parts.append(f'<p class="warn">Metric <b>{html.escape(metric)}</b> is unavailable: '
                     f"{html.escape(reason or '')}</p>")
    for note in [*notes, *analysis.notes]:
        parts.append(f'<p class="warn">{html.escape(note)}</p>')
    parts.extend(_confound_block(analysis))
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        parts.append(_table(["backbone", "prompt", "seed", "steps", "error"],
                            [[r["backbone"], r["prompt"], r["seed"], r["steps"], r["error"]]
                             for r in failed]))
    if store_swap:
        parts.extend(_swap_section(store_swap))
    done_rows = [r for r in rows if r["status"] == "done"]
    coverage = []
    for metric in cell_metrics:
        values = [r["scores"].get(metric) for r in done_rows if metric in r["scores"]]
        undefined = sum(v is None for v in values)
        coverage.append([metric, analysis.metrics.get(metric, {}).get("kind"),
                         analysis.metrics.get(metric, {}).get("direction", "unknown"),
                         len(values) - undefined, undefined, len(done_rows) - len(values)])
    if coverage:
        parts.append("<h2>Scores</h2>")
        parts.append(_table(["metric", "kind", "better", "scored cells",
                             "undefined (None: could not score)", "not attempted"], coverage))
    parts.append("<h2>Statistics</h2>")
    parts.append(_statistics_note(analysis))
    parts.extend(_recommendation_section(analysis))
    parts.append("<h2>Effective regime and knee</h2>")
    parts.append(_table(
        ["backbone", "adapter", "metric", "better", "margin", "effective regime (steps)",
         "regime mode", "regime 90% interval", "knee (steps)", "knee 90% interval",
         "plateau (mean at max steps)", "scored at max steps"],
        [_regime_row(c) for c in analysis.curves if c.metric_kind != "latency"]))
    parts.append("<h2>Metrics vs steps</h2>")
    for name, png in plots.items():
        if name.startswith("metric-"):
            parts.append(f'<figure><img alt="{html.escape(name)}" src="{_data_uri(png)}">'
                         "<figcaption>Lower panel: share of attempted images the metric "
                         "scored.</figcaption></figure>")
    if analysis.latency:
        parts.append("<h2>Latency</h2>")
        parts.append("<p>Per image, batch 1: the median over repeats with its interquartile "
                     "range (IQR; " + N_TOO_SMALL + " with fewer than two repeats), or a fitted "
                     "fixed + per-step model with this step count's residual.</p>")
        body = []
        for label, by_steps in sorted(analysis.latency.items()):
            for steps, e in sorted(by_steps.items()):
                body.append([label.replace("|", " + "), steps, e["median_s"], _quartiles(e),
                             e["repeats"], e["method"], e["residual_s"], e["denoise_s"]])
        parts.append(_table(["backbone + setting", "steps", "median (s)", "IQR (s)",
                             "repeats", "method", "fit residual (s)", "denoise median (s)"],
                            body))
    if "pareto" in plots:
        parts.append("<h2>Latency-fidelity Pareto front</h2>")
        parts.append(f'<figure><img alt="pareto" src="{_data_uri(plots["pareto"])}"></figure>')
    if analysis.ablations:
        parts.append("<h2>Adapter ablation: setting minus adapter off</h2>")
        parts.append("<p>Paired over backbone, reference, prompt, seed and steps; clusters "
                     "(reference, prompt) resampled. <b>from adapter</b>: the 95% CI excludes "
                     "zero in the metric's better direction.</p>")
        parts.append(_table(
            ["backbone", "setting", "metric", "delta", "95% CI", "pairs", "clusters",
             "from adapter", "excluded (window never opens)"],
            [[a["backbone"], a["setting"], a["metric"], a["mean"],
              _ci(a["ci_low"], a["ci_high"]), a["n"], a["clusters"],
              "direction unknown" if a["higher_is_better"] is None else
              (N_TOO_SMALL if a["from_adapter"] is None else a["from_adapter"]),
              a["excluded_window_never_opens"]] for a in analysis.ablations]))
    if analysis.trajectories:
        parts.append("<h2>Trajectories: the predicted clean image at every step</h2>")
        parts.append(_table(
            ["backbone", "run", "metric", "effective regime (step)", "regime 90% interval",
             "knee (step)"],
            [[c.backbone, c.adapter, c.metric, _regime_cell(c), _span(c.regime_interval),
              c.knee] for c in analysis.trajectories]))
        for name, png in plots.items():
            if name.startswith("trajectory-"):
                parts.append(f'<figure><img alt="{html.escape(name)}" src="{_data_uri(png)}">'
                             "</figure>")
        for title, png in strips:
            parts.append(f'<figure><img alt="x0 strip" src="{_data_uri(png)}"><figcaption>'
                         f"x0 previews, step 1 to the last: {html.escape(title)}</figcaption>"
                         "</figure>")
    if exit_meta:
        parts.extend(_exit_section(exit_meta, exits))
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
        parts.extend(_per_step_table(curve))
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


def _source_warnings(analysis: Analysis) -> list[str]:
    parts = []
    source = analysis.metric_info_source
    if source in ("plugins", "store+plugins"):
        names = sorted(m for m, i in analysis.metrics.items() if i.get("known"))
        parts.append('<p class="warn">Metric directions and kinds were not all recorded in the '
                     "store; they were taken from the installed plugins' declarations "
                     f"(<code>metric_info_source: {source}</code>; metrics: "
                     f"{html.escape(', '.join(names))}).</p>")
    unknown = sorted(m for m, i in analysis.metrics.items() if i.get("direction") == "unknown")
    if unknown:
        parts.append('<p class="warn">Direction unknown for '
                     f"<b>{html.escape(', '.join(unknown))}</b>: means and intervals are "
                     "shown, but no regime, knee, Pareto front or recommendation.</p>")
    if analysis.adapter_kinds_source in ("plugins", "store+plugins"):
        parts.append('<p class="warn">Adapter kinds were taken from the installed plugins, '
                     "not from the store.</p>")
    return parts


def _confound_block(analysis: Analysis) -> list[str]:
    if not analysis.confounds:
        return []
    flags = sorted({c["flag"] for c in analysis.confounds})
    meaning = "".join(f"<li><b>{html.escape(f)}</b>: "
                      f"{html.escape(CONFOUND_TEXT.get(f, 'flagged by the engine'))}</li>"
                      for f in flags)
    return ['<div class="warn"><b>Confounded cells.</b> Some cells carry flags that change '
            f"what they measure:<ul>{meaning}</ul>"
            + _table(["backbone", "setting", "steps", "flag", "cells"],
                     [[c["backbone"], c["setting"], c["steps"], c["flag"],
                       f"{c['cells']} of {c['of_cells']}"] for c in analysis.confounds])
            + "</div>"]


def _swap_section(swap: Mapping[str, Any]) -> list[str]:
    parts = [f"<h2>Swap: {html.escape(swap['from'])} &rarr; {html.escape(swap['to'])}</h2>"]
    lat = swap.get("latency")
    if lat:
        def iqr(pair: Sequence[float] | None) -> str:
            return f" (IQR {pair[0]:.4g}-{pair[1]:.4g})" if pair else f" (IQR: {N_TOO_SMALL})"

        parts.append(f"<p>Median latency per image (batch 1): {lat['from_s']:.4g} s"
                     f"{iqr(lat.get('from_iqr'))} &rarr; {lat['to_s']:.4g} s"
                     f"{iqr(lat.get('to_iqr'))}: <b>{lat['speedup']:.2f}x faster</b>.</p>")
    parts.append(_table(
        ["metric", "from (mean)", "to (mean)", "delta (to - from)", "95% CI", "pairs",
         "clusters", "scored from", "scored to", "better"],
        [[m, d["from_mean"], d["to_mean"], d["mean"], _ci(d["ci_low"], d["ci_high"]), d["n"],
          d["clusters"], _share(*d["from_scored"]), _share(*d["to_scored"]),
          {True: "higher", False: "lower"}.get(d["higher_is_better"], "direction unknown")]
         for m, d in swap["metrics"].items()]))
    return parts


def _recommendation_section(analysis: Analysis) -> list[str]:
    parts = ["<h2>Recommendations</h2>"]
    if analysis.recommendation is None:
        parts.append('<p class="warn"><b>No recommendation.</b> '
                     f"{html.escape(analysis.recommendation_reason)}</p>")
    parts.append("<p>Fidelity is judged on the metric of the adapter's kind (identity, style, "
                 "object; text for no adapter), never on sharpness or contrast. Several "
                 "metrics of that kind: the first by name.</p>")
    parts.append(_table(
        ["backbone", "adapter", "adapter kind", "fidelity metric", "steps",
         "regime 90% interval", "paired difference vs plateau [95% CI]", "latency (median)",
         "why"],
        [[r.backbone, r.adapter, r.adapter_kind or ("-" if r.adapter_name == "none" else "?"),
          r.metric, r.steps, _span(r.regime_interval) if r.regime is not None else "-",
          "-" if r.difference is None else
          f"{r.difference:+.4g} {_ci(r.difference_ci_low, r.difference_ci_high)}",
          _latency_text(analysis.latency.get(r.label, {}).get(r.steps)) if r.steps else "-",
          r.reason] for r in analysis.recommendations]))
    return parts


def _regime_cell(curve: Any) -> Any:
    if curve.direction == "unknown":
        return "direction unknown"
    if curve.effective_regime is None:
        return curve.regime_note or "-"
    return curve.effective_regime


def _regime_row(curve: Any) -> list[Any]:
    margin = "-" if curve.margin is None else f"{curve.margin:.3g} ({curve.margin_source})"
    known = curve.effective_regime is not None
    return [curve.backbone, curve.adapter, curve.metric, curve.direction, margin,
            _regime_cell(curve), curve.regime_mode if known else "-",
            _span(curve.regime_interval) if known else "-", curve.knee, _knee_span(curve),
            curve.plateau, _share(curve.scored[-1], curve.attempted[-1])]


def _per_step_table(curve: Any) -> list[str]:
    head = (f"<h3>{html.escape(curve.backbone)} + {html.escape(curve.adapter)}: "
            f"{html.escape(curve.metric)} ({html.escape(curve.direction)} is better"
            if curve.direction != "unknown" else
            f"<h3>{html.escape(curve.backbone)} + {html.escape(curve.adapter)}: "
            f"{html.escape(curve.metric)} (direction unknown")
    head += ")</h3>"
    parts = [head]
    for note in curve.notes:
        parts.append(f"<p>{html.escape(note)}</p>")
    last = curve.steps[-1] if curve.steps else None
    body = []
    for j, steps in enumerate(curve.steps):
        within = curve.within_margin[j] if j < len(curve.within_margin) else None
        body.append([steps, _share(curve.scored[j], curve.attempted[j]), curve.n[j],
                     curve.clusters[j], curve.mean[j], _ci(curve.ci_low[j], curve.ci_high[j]),
                     curve.difference[j] if steps != last else "plateau",
                     _ci(curve.difference_ci_low[j], curve.difference_ci_high[j])
                     if steps != last else "-",
                     "-" if within is None else within,
                     curve.excluded_window_never_opens[j]])
    parts.append(_table(["steps", "scored", "n", "clusters", "mean", "95% CI",
                         f"paired difference vs {last} steps", "95% CI", "within margin",
                         "excluded (window never opens)"], body))
    return parts


def _exit_section(exit_meta: Mapping[str, Any], exits: Sequence[Mapping[str, Any]]
                  ) -> list[str]:
    parts = ["<h2>Probe-guided adapter exit</h2>",
             f"<p>The adapter's window ends at the first step where its relative "
             f"contribution ({html.escape(exit_meta['quantity'])}, mean over blocks) "
             f"falls below {exit_meta['threshold']:g}; the same cells ran with that "
             "window. Deltas are exit minus full window, paired by reference, prompt "
             "and seed; clusters (reference, prompt) resampled.</p>"]
    body = []
    for e in exits:
        for metric, d in e["deltas"].items():
            body.append([e["backbone"], e["steps"], e["exit_step"],
                         f"{e['adapter_compute_saved']:.0%}", e["latency_full_s"],
                         e["latency_exit_s"], metric, d["mean"], _ci(d["ci_low"], d["ci_high"]),
                         d["n"]])
    parts.append(_table(["backbone", "steps", "exit at step", "adapter steps saved",
                         "latency full (median, s)", "latency exit (median, s)", "metric",
                         "delta", "95% CI", "pairs"], body))
    for p in exit_meta["plan"]:
        if p["exit_step"] is None:
            parts.append(f"<p>{html.escape(p['backbone'])}, {p['steps']} steps: the "
                         "contribution never fell below the threshold; full window kept.</p>")
    return parts
