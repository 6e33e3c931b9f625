"""Reports a person can look at: ``report.html`` (self-contained), ``plots/*.png``,
``results.csv`` and ``analysis.json``, all rebuilt from the store alone.

The page reads top to bottom as a researcher would show it to a colleague: a banner when the
models had random weights (tiny / random presets), the verdicts in words (swap, ablations,
recommendations, trajectories), the run as resolved (backbones, adapter per backbone, the
step grid and size the cells actually ran, device, dtype, weights identity, code hash,
versions, dates, host) with the reference images, then plots at full width, one compact
per-step table, image grids with click-to-enlarge (CSS only: no script), and the methods.

Every mean is shown with its interval (or "n too small") and its share of images scored;
regimes and knees with their bootstrap intervals; recommendations only on a fidelity metric
of the adapter's kind (:mod:`adapterswap.sweep.analysis` has the statistics). Every picture
in the page is also a file in ``plots/`` (one file per picture).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from adapterswap.sweep.analysis import (
    BETTER,
    N_TOO_SMALL,
    N_TOO_SMALL_TO_TELL,
    NO_DIFFERENCE,
    WORSE,
    Analysis,
    analyse,
    resolve_adapter_kinds,
    resolve_metric_info,
    row_label,
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

#: The banner of a run whose models had random weights.
PRESET_BANNER = {
    "tiny": "<b>Tiny preset: random weights.</b> Every model here is a tiny model with random "
            "weights, so the images and every number below are meaningless: this report "
            "shows the code paths only. Run without <code>--preset</code> for real results.",
    "random": "<b>Random preset: random weights at the published sizes.</b> Latency and memory "
              "are real; the images and every quality number below are meaningless.",
}

#: Plot files this module writes into ``plots/`` (stale ones are removed on a rebuild).
_OWN_PLOTS = re.compile(r"^(metric|trajectory|pareto|probes|ablation|grid|cell|reference|"
                        r"strip)[-.]")

#: Image-grid thumbnails: at least this many pixels on the long side on screen.
THUMB_MIN = 128
#: Image-grid thumbnails are stored at most this large (the enlarged view shows them).
THUMB_MAX = 256


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


# ------------------------------------------------------------------------ words and numbers
def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 step``, ``2 steps``; ``many`` for irregular plurals."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _decimals(width: float, significant: int = 2) -> int:
    """Decimals that show ``width`` (an interval's or a range's) to ``significant`` digits."""
    if not (math.isfinite(width) and width > 0):
        return 4
    return max(0, min(8, significant - 1 - math.floor(math.log10(width))))


def _num(value: float | None, significant: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{significant}g}"


def _interval_decimals(mean: float, low: float, high: float, significant: int) -> int:
    """Decimals that show an interval's width to two digits, but the values to no more
    than ``significant`` digits (a very narrow interval rounds to its ends)."""
    cap = _decimals(max(abs(mean), abs(low), abs(high)) or 1.0, significant)
    return min(_decimals(high - low), cap) if high > low else cap


def _mean_ci(mean: float | None, low: float | None, high: float | None) -> str:
    """``0.589 [0.570, 0.613]`` with decimals from the interval's width (at most five
    significant digits), or the mean and ``n too small``."""
    if mean is None or not math.isfinite(mean):
        return "-"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{_num(mean)} ({N_TOO_SMALL})"
    d = _interval_decimals(mean, low, high, 5)
    return f"{mean:.{d}f} [{low:.{d}f}, {high:.{d}f}]"


def _signed_ci(delta: Mapping[str, Any]) -> str:
    """``+0.028 [+0.010, +0.050]`` (the header says which interval), or the delta and
    ``n too small``."""
    return _delta_text(delta, label="", too_small="")


def _setting_order(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    """Adapter off first, then by adapter, scale (default first), window start and end."""
    scale = entry.get("scale")
    return (entry.get("adapter") != "none", entry.get("adapter") or "", scale is not None,
            scale or 0.0, entry.get("start") or 0.0,
            1.0 if entry.get("end") is None else entry["end"])


def _delta_text(delta: Mapping[str, Any], *, label: str = "95% CI ",
                too_small: str = " for an interval") -> str:
    """``+0.028 [95% CI +0.010, +0.050]``, or the delta with ``n too small for an interval``
    (``label``/``too_small`` empty where a table header says which interval)."""
    mean, low, high = delta.get("mean"), delta.get("ci_low"), delta.get("ci_high")
    if mean is None:
        return "no pairs"
    if low is None or high is None:
        return f"{mean:+.3g} ({N_TOO_SMALL}{too_small})"
    d = _interval_decimals(mean, low, high, 4)
    return f"{mean:+.{d}f} [{label}{low:+.{d}f}, {high:+.{d}f}]"


def _verdict_html(verdict: str) -> str:
    css = {BETTER: "better", WORSE: "worse"}.get(verdict, "neutral")
    return f'<span class="{css}">{html.escape(verdict)}</span>'


# ------------------------------------------------------------------------ plots
def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tidy_axis(axis: Any) -> None:
    """Tick labels with as many decimals as the tick spacing needs; where the values are
    large against their range, an offset (``+9.44e2``) instead of six significant digits."""
    import matplotlib as mpl
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator, ScalarFormatter

    axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
    low, high = sorted(axis.get_view_interval())
    ticks = sorted(t for t in axis.get_ticklocs() if low - 1e-12 <= t <= high + 1e-12)
    if len(ticks) < 2:
        return
    spacing = min(b - a for a, b in zip(ticks, ticks[1:]))
    magnitude = max(abs(low), abs(high))
    if spacing <= 0 or not math.isfinite(spacing):
        return
    digits = math.floor(math.log10(magnitude)) - math.floor(math.log10(spacing)) + 1 \
        if magnitude > 0 else 1
    if digits > 4 or magnitude >= 1e5 or magnitude < 1e-3:
        with mpl.rc_context({"axes.formatter.offset_threshold": 2}):
            formatter = ScalarFormatter(useOffset=True)
        formatter.set_powerlimits((-3, 4))
        axis.set_major_formatter(formatter)
        return
    decimals = max(0, -math.floor(math.log10(spacing)))
    if abs(round(spacing, decimals) - spacing) > spacing * 1e-6:
        decimals += 1
    axis.set_major_formatter(FormatStrFormatter(f"%.{decimals}f"))


def _step_axis(ax: Any, steps: Sequence[int], label: str) -> None:
    """A linear x axis with one tick at every step count that ran (labels thinned beyond 25)."""
    steps = sorted(set(steps))
    pad = max(0.5, 0.03 * (steps[-1] - steps[0]))
    ax.set_xlim(steps[0] - pad, steps[-1] + pad)
    ax.set_xticks(steps)
    if len(steps) > 25:
        keep = set(steps[:: math.ceil(len(steps) / 25)]) | {steps[-1]}
        ax.set_xticklabels([str(s) if s in keep else "" for s in steps])
    else:
        ax.set_xticklabels([str(s) for s in steps])
    ax.set_xlabel(label)


def _legend_below(fig: Any, ax: Any) -> None:
    """The legend under the plot, outside the data (the figure has a constrained layout)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(handles)),
                   fontsize=9, frameon=False)


def _metric_label(metric: str, kind: str | None, direction: str) -> str:
    if kind == "latency":
        return f"{metric} per image (s, lower is better)"
    if direction in ("higher", "lower"):
        return f"{metric} ({direction} is better)"
    return f"{metric} (direction unknown)"


def plot_curves(analysis: Analysis) -> dict[str, bytes]:
    """PNGs: per metric with two or more step counts, mean vs steps per backbone and setting
    (95% CI band where an interval exists, regime with its 90% interval and knee marked),
    with a panel of the share of images scored when some were not; the latency-fidelity
    Pareto plot per fidelity metric; the scale x window heatmap of the ablation deltas; per
    metric, the trajectory of the predicted clean image along long runs; probe heatmaps."""
    plots = _metric_plots(analysis.curves, prefix="metric", xlabel="denoising steps",
                          title="{metric} vs steps")
    plots.update(_metric_plots(analysis.trajectories, prefix="trajectory",
                               xlabel="step of the run (predicted clean image)",
                               title="{metric} along the run (x0 preview)"))
    plots.update(_pareto_plot(analysis))
    plots.update(ablation_heatmaps(analysis))
    plots.update(_probe_plots(analysis))
    return plots


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _metric_plots(curves: Sequence[Any], *, prefix: str, xlabel: str,
                  title: str) -> dict[str, bytes]:
    """One plot per metric of the curves with two or more step counts (a single step count
    is a value, shown in the per-step table)."""
    import numpy as np

    plt = _pyplot()
    plots = {}
    for metric in sorted({c.metric for c in curves}):
        members = [c for c in curves if c.metric == metric and len(c.steps) >= 2]
        if not members:
            continue
        steps = sorted({s for c in members for s in c.steps})
        partial = any(s is not None and s < 1 for c in members for s in c.scored_share)
        if partial:
            fig, (ax, share_ax) = plt.subplots(2, 1, figsize=(10, 5.0), sharex=True,
                                               gridspec_kw={"height_ratios": [4, 1]},
                                               layout="constrained")
        else:
            fig, ax = plt.subplots(figsize=(10, 4.0), layout="constrained")
            share_ax = None
        any_interval = False
        for curve in members:
            x = np.array(curve.steps, dtype=float)
            mean = np.array(_nan(curve.mean))
            marks = []
            if curve.effective_regime is not None:
                span = curve.regime_interval
                marks.append(f"regime {curve.effective_regime}" + (
                    f", 90% {span[0]}-{span[1]}" if span and span[0] != span[1] else ""))
            if curve.knee is not None:
                marks.append(f"knee {curve.knee}")
            label = f"{curve.backbone} + {curve.adapter}" + (
                f" ({'; '.join(marks)})" if marks else "")
            line = ax.plot(x, mean, marker="o", markersize=4, linewidth=1.8, label=label)[0]
            colour = line.get_color()
            low, high = np.array(_nan(curve.ci_low)), np.array(_nan(curve.ci_high))
            has = np.isfinite(low) & np.isfinite(high)
            if has.any():  # bands only where an interval exists (n too small: none)
                any_interval = True
                ax.fill_between(x, low, high, where=has, color=colour, alpha=0.25,
                                linewidth=0, interpolate=False)
                for edge in (low, high):
                    ax.plot(x, np.where(has, edge, np.nan), color=colour, linewidth=0.8,
                            alpha=0.9)
            if curve.effective_regime is not None:
                ax.axvline(curve.effective_regime, color=colour, linestyle="--", alpha=0.8,
                           linewidth=1.2)
                if curve.regime_interval and curve.regime_interval[0] != \
                        curve.regime_interval[1]:
                    ax.axvspan(curve.regime_interval[0], curve.regime_interval[1],
                               color=colour, alpha=0.08)
            if curve.knee is not None and curve.knee in curve.steps:
                y = curve.mean[curve.steps.index(curve.knee)]
                ax.plot([curve.knee], [y], marker="*", markersize=14, color=colour,
                        linestyle="none")
            if share_ax is not None:
                share_ax.plot(x, _nan(curve.scored_share), marker=".", color=colour)
        directions = {c.direction for c in members}
        kinds = {c.metric_kind for c in members}
        ax.set_ylabel(_metric_label(metric, next(iter(kinds)) if len(kinds) == 1 else None,
                                    directions.pop() if len(directions) == 1 else "mixed"))
        heading = title.format(metric=metric)
        if "latency" in kinds:
            heading += " (median of the timed repeats)"
        elif any_interval:
            heading += " (mean, 95% bootstrap CI band)"
        else:
            heading += f" (mean; {N_TOO_SMALL} for an interval)"
        ax.set_title(heading, fontsize=11)
        ax.grid(alpha=0.3)
        _legend_below(fig, ax)
        if share_ax is not None:
            share_ax.set_ylim(-0.05, 1.05)
            share_ax.set_ylabel("share scored", fontsize=8)
            share_ax.grid(alpha=0.3)
            _step_axis(share_ax, steps, xlabel)
            ax.tick_params(labelbottom=False)
        else:
            _step_axis(ax, steps, xlabel)
        _tidy_axis(ax.yaxis)
        plots[f"{prefix}-{safe_name(metric)}"] = _png(fig)
        plt.close(fig)
    return plots


def _pareto_plot(analysis: Analysis) -> dict[str, bytes]:
    """Median latency against the fidelity metric, one plot per fidelity metric (the first
    is ``pareto``), its y axis named after the metric."""
    plt = _pyplot()
    by_metric: dict[str, list[str]] = {}
    for label in analysis.pareto:
        metric = analysis.fidelity_metric.get(label)
        if metric is not None:
            by_metric.setdefault(metric, []).append(label)
    plots = {}
    for i, (metric, labels) in enumerate(sorted(by_metric.items())):
        fig, ax = plt.subplots(figsize=(10, 4.0), layout="constrained")
        direction = "unknown"
        for label in labels:
            curve = next((c for c in analysis.curves if c.label == label
                          and c.metric == metric), None)
            if curve is None:
                continue
            direction = curve.direction
            lat = analysis.latency.get(label, {})
            pts = [(lat[s]["median_s"], m, s) for s, m in zip(curve.steps, curve.mean)
                   if s in lat and m is not None]
            if not pts:
                continue
            front = analysis.pareto[label]
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", alpha=0.6,
                           label=label.replace("|", " + "))[0]
            ax.plot([p[0] for p in front], [p[1] for p in front], "-",
                    color=line.get_color(), linewidth=1.5)
            for x, y, s in pts:
                ax.annotate(plural(s, "step"), (x, y), fontsize=8, xytext=(4, 4),
                            textcoords="offset points")
        ax.set_xlabel("median latency per image (s, batch 1)")
        ax.set_ylabel(_metric_label(metric, None, direction))
        ax.set_title(f"latency vs {metric}: Pareto front (line; points labelled with steps)",
                     fontsize=11)
        ax.grid(alpha=0.3)
        _legend_below(fig, ax)
        _tidy_axis(ax.yaxis)
        _tidy_axis(ax.xaxis)
        plots["pareto" if i == 0 else f"pareto-{safe_name(metric)}"] = _png(fig)
        plt.close(fig)
    return plots


def _window_text(start: float, end: float) -> str:
    return f"{start:g}-{end:g}"


def _heatmap_metrics(analysis: Analysis, backbone: str) -> list[str]:
    """The metric(s) of a backbone's ablation heatmap: its adapter's fidelity metric; without
    one, every ablated metric (latency aside), at most four."""
    entries = [a for a in analysis.ablations if a["backbone"] == backbone]
    fidelity = [analysis.fidelity_metric[f"{backbone}|{a['setting']}"] for a in entries
                if f"{backbone}|{a['setting']}" in analysis.fidelity_metric]
    if fidelity:
        return [sorted(set(fidelity))[0]]
    return sorted({a["metric"] for a in entries})[:4]


def ablation_heatmaps(analysis: Analysis) -> dict[str, bytes]:
    """Per backbone: a scale x window heatmap of the fidelity metric's paired delta against
    adapter off (95% CI and verdict in each cell; grey: not run)."""
    import numpy as np

    plt = _pyplot()
    plots = {}
    for backbone in sorted({a["backbone"] for a in analysis.ablations}):
        metrics = _heatmap_metrics(analysis, backbone)
        if not metrics:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(10, 1.2 + 0.9 * max(
            2, len({a.get("scale") for a in analysis.ablations}))), squeeze=False,
            layout="constrained")
        for ax, metric in zip(axes[0], metrics):
            entries = [a for a in analysis.ablations if a["backbone"] == backbone
                       and a["metric"] == metric]
            scales = sorted({a.get("scale") for a in entries},
                            key=lambda s: (s is None, s or 0.0))
            windows = sorted({(a.get("start", 0.0), a.get("end", 1.0)) for a in entries})
            values = np.full((len(scales), len(windows)), np.nan)
            cells = {}
            for a in entries:
                i = scales.index(a.get("scale"))
                j = windows.index((a.get("start", 0.0), a.get("end", 1.0)))
                values[i, j] = np.nan if a["mean"] is None else a["mean"]
                cells[(i, j)] = a
            limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
            limit = limit or 1.0
            higher = next((a["higher_is_better"] for a in entries
                           if a["higher_is_better"] is not None), None)
            cmap = plt.get_cmap("RdBu" if higher is not False else "RdBu_r").with_extremes(
                bad="#e6e6e6")
            image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-limit,
                              vmax=limit, aspect="auto")
            for i in range(len(scales)):
                for j in range(len(windows)):
                    a = cells.get((i, j))
                    if a is None:
                        ax.text(j, i, "not run", ha="center", va="center", fontsize=8,
                                color="#666")
                        continue
                    low, high = a["ci_low"], a["ci_high"]
                    d = _decimals(high - low) if low is not None and high is not None \
                        and high > low else 3
                    text = f"{a['mean']:+.{d}f}\n" + (
                        f"[{low:+.{d}f}, {high:+.{d}f}]" if low is not None else N_TOO_SMALL)
                    text += f"\n{a.get('verdict', '')}"
                    strong = abs(values[i, j]) > 0.6 * limit
                    ax.text(j, i, text, ha="center", va="center", fontsize=8,
                            color="white" if strong else "black")
            ax.set_xticks(range(len(windows)))
            ax.set_xticklabels([_window_text(*w) for w in windows])
            ax.set_yticks(range(len(scales)))
            ax.set_yticklabels(["default" if s is None else f"{s:g}" for s in scales])
            ax.set_xlabel("adapter window (fraction of the schedule)")
            ax.set_ylabel("adapter scale")
            direction = {True: "higher", False: "lower"}.get(higher, "unknown")
            ax.set_title(f"{metric}: change vs adapter off ({direction} is better)",
                         fontsize=10)
            bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
            bar.set_label(f"{metric} delta", fontsize=8)
            _tidy_axis(bar.ax.yaxis)
        fig.suptitle(f"{backbone}: paired delta vs adapter off, mean [95% CI] and verdict",
                     fontsize=11)
        plots[f"ablation-{safe_name(backbone)}"] = _png(fig)
        plt.close(fig)
    return plots


def _probe_plots(analysis: Analysis) -> dict[str, bytes]:
    """Per probe quantity: a step x block heatmap (longest run) and the mean over blocks
    against the fraction of the schedule for every run length."""
    import numpy as np

    plt = _pyplot()
    plots = {}
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for probe_map in analysis.probes:
        groups.setdefault((probe_map.backbone, probe_map.setting, probe_map.quantity),
                          []).append(probe_map)
    for i, ((backbone, setting, quantity), maps) in enumerate(sorted(groups.items())):
        longest = max(maps, key=lambda m: m.num_steps)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, max(3.4, 0.18 * len(longest.blocks)
                                                             + 1.8)), layout="constrained")
        image = ax1.imshow(np.array(longest.matrix), aspect="auto", cmap="viridis",
                           interpolation="nearest",
                           extent=(0.5, longest.num_steps + 0.5, len(longest.blocks) - 0.5,
                                   -0.5))
        ax1.set_yticks(range(len(longest.blocks)))
        ax1.set_yticklabels(longest.blocks, fontsize=6)
        _step_axis(ax1, range(1, longest.num_steps + 1),
                   f"step (of {plural(longest.num_steps, 'step')})")
        ax1.set_xlim(0.5, longest.num_steps + 0.5)
        ax1.set_title(f"{quantity} per block", fontsize=9)
        fig.colorbar(image, ax=ax1)
        for probe_map in sorted(maps, key=lambda m: m.num_steps):
            x = [(s + 1) / probe_map.num_steps for s in range(probe_map.num_steps)]
            ax2.plot(x, probe_map.mean_curve, marker="o",
                     label=plural(probe_map.num_steps, "step"))
        ax2.set_xlabel("fraction of the schedule")
        ax2.set_ylabel(f"mean {quantity} over blocks")
        ax2.grid(alpha=0.3)
        _legend_below(fig, ax2)
        _tidy_axis(ax2.yaxis)
        fig.suptitle(f"{backbone} + {setting}: {quantity}", fontsize=10)
        plots[f"probes-{i:02d}-{safe_name(backbone)}-{safe_name(quantity)}"] = _png(fig)
        plt.close(fig)
    return plots


# ------------------------------------------------------------------------ pictures
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size)
    except Exception:  # noqa: BLE001 - no matplotlib font: Pillow's own
        return ImageFont.load_default(size=size)


def _encode(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _thumbnail(image: Any) -> tuple[Any, bool]:
    """At most :data:`THUMB_MAX` pixels on the long side; a small image is enlarged by a
    whole factor (nearest pixel, so its pixels stay visible) to at least :data:`THUMB_MIN`.
    Returns the image and whether it was enlarged."""
    from PIL import Image

    image = image.convert("RGB")
    long_side = max(image.size)
    if long_side > THUMB_MAX:
        image = image.copy()
        image.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
        return image, False
    if long_side < THUMB_MIN:
        k = math.ceil(THUMB_MIN / long_side)
        return image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST), True
    return image, False


def reference_file(out: Path, reference: str) -> Path:
    """Where the sweep saved a reference image (:class:`~adapterswap.sweep.models.
    ModelFactory`: the first 16 hex digits of the sha256 of the reference string)."""
    return out / "references" / (hashlib.sha256(reference.encode()).hexdigest()[:16] + ".png")


def _reference_name(reference: str) -> str:
    return reference if reference.startswith("synthetic:") else (Path(reference).name
                                                                 or reference)


def reference_thumbnails(out: Path, rows: Sequence[Mapping[str, Any]]
                         ) -> list[tuple[str, bytes | None, bool]]:
    """Per reference the cells used: its name, its thumbnail (``None``: not saved) and
    whether the thumbnail was enlarged."""
    from PIL import Image

    shown = []
    for reference in sorted({r["reference"] for r in rows if r.get("reference")}):
        path = reference_file(out, reference)
        if not path.is_file():
            shown.append((reference, None, False))
            continue
        with Image.open(path) as image:
            thumb, enlarged = _thumbnail(image)
        shown.append((reference, _encode(thumb), enlarged))
    return shown


@dataclass
class ImageGrid:
    """One (reference, prompt): column groups (backbone and setting side by side when they
    ran the same steps), seeds within each group, one row per step count (or per backbone,
    setting and step count)."""

    reference: str
    prompt: str
    groups: list[str]
    seeds: list[int]
    rows: list[tuple[str, list[tuple[bytes, bool] | None]]] = field(default_factory=list)


def _setting_names(settings: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """What tells (backbone, setting) pairs apart: the backbone where several ran, the
    setting where several ran ("adapter off" for none)."""
    several_backbones = len({b for b, _ in settings}) > 1
    several_settings = len({label for _, label in settings}) > 1
    return {(b, label): ([b] if several_backbones else [])
            + ([label if label != "none" else "adapter off"] if several_settings else [])
            for b, label in settings}


#: Most image columns side by side before groups are stacked as rows.
GRID_COLUMNS = 8


def image_grids(store: RunStore, rows: Sequence[Mapping[str, Any]]) -> list[ImageGrid]:
    """Per reference and prompt, every image as a thumbnail: backbones and settings side by
    side (columns: seeds) with one row per step count when they ran the same steps and fit
    :data:`GRID_COLUMNS` columns; otherwise one row per backbone, setting and step count."""
    from PIL import Image

    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done" and row.get("image"):
            groups.setdefault((row["reference"], row["prompt"]), []).append(row)
    order = {b: i for i, b in enumerate(dict.fromkeys(r["backbone"] for r in rows))}

    def tile(members: Sequence[Mapping[str, Any]], backbone: str, label: str, steps: int,
             seed: int) -> tuple[bytes, bool] | None:
        match = next((r for r in members if r["backbone"] == backbone
                      and row_label(r) == label and r["steps"] == steps
                      and r["seed"] == seed), None)
        path = store.out / match["image"] if match else None
        if path is None or not path.is_file():
            return None
        with Image.open(path) as image:
            thumb, enlarged = _thumbnail(image)
        return _encode(thumb), enlarged

    grids = []
    for (reference, prompt), members in groups.items():  # in the order the cells ran
        seeds = sorted({r["seed"] for r in members})
        first = {}
        for r in members:
            first.setdefault((r["backbone"], row_label(r)), r)
        settings = sorted(first, key=lambda k: (order.get(k[0], 0), _setting_order(first[k])))
        steps_of = {k: sorted({r["steps"] for r in members
                               if (r["backbone"], row_label(r)) == k}) for k in settings}
        names = _setting_names(settings)
        side_by_side = (len(settings) > 1 and len({tuple(v) for v in steps_of.values()}) == 1
                        and len(settings) * len(seeds) <= GRID_COLUMNS)
        if side_by_side:
            grid = ImageGrid(reference, prompt, [", ".join(names[k]) for k in settings], seeds)
            for steps in steps_of[settings[0]]:
                grid.rows.append((plural(steps, "step"),
                                  [tile(members, b, label, steps, seed)
                                   for b, label in settings for seed in seeds]))
        else:
            grid = ImageGrid(reference, prompt, [""], seeds)
            for backbone, label in settings:
                for steps in steps_of[(backbone, label)]:
                    title = ", ".join(names[(backbone, label)] + [plural(steps, "step")])
                    grid.rows.append((title, [tile(members, backbone, label, steps, seed)
                                              for seed in seeds]))
        grids.append(grid)
    return grids


def _trajectory_strips(store: RunStore, rows: Sequence[Mapping[str, Any]]) -> list[
        tuple[str, bytes]]:
    """The x0 preview strips of trajectory cells (first seed of each group only), redrawn
    with the step number under each preview, at most ten previews a row."""
    from PIL import Image, ImageDraw

    strips = []
    seen = set()
    font = _font(13)
    for row in rows:
        path = store.out / "images" / f"{row['key']}-trajectory.png"
        group = (row["backbone"], row_label(row), row["reference"], row["prompt"],
                 row["steps"])
        if row["status"] != "done" or group in seen or not path.is_file():
            continue
        seen.add(group)
        with Image.open(path) as strip:
            strip = strip.convert("RGB")
        side = strip.height
        count = max(1, strip.width // side)
        size = max(96, min(side, 160))
        per_row = min(count, 10)
        lines = math.ceil(count / per_row)
        gap, label_h = 6, 20
        canvas = Image.new("RGB", (per_row * (size + gap) - gap, lines * (size + label_h)),
                           "white")
        draw = ImageDraw.Draw(canvas)
        for k in range(count):
            tile = strip.crop((k * side, 0, (k + 1) * side, side))
            resample = Image.Resampling.NEAREST if size >= side else Image.Resampling.LANCZOS
            tile = tile.resize((size, size), resample)
            x, y = (k % per_row) * (size + gap), (k // per_row) * (size + label_h)
            canvas.paste(tile, (x, y))
            text = f"step {k + 1}"
            width = draw.textlength(text, font=font)
            draw.text((x + (size - width) / 2, y + size + 2), text, fill="black", font=font)
        title = (f"{row['backbone']} + {row_label(row)} | {plural(row['steps'], 'step')} | "
                 f"seed {row['seed']} | {row['prompt']}")
        strips.append((title, _encode(canvas)))
    return strips


# ------------------------------------------------------------------------ the run, resolved
def _cells_of(run: Mapping[str, Any], by_key: Mapping[str, Mapping[str, Any]],
              store: RunStore) -> list[Mapping[str, Any]]:
    keys = list(run.get("cell_keys") or [])
    missing = [k for k in keys if k not in by_key]
    extra = {r["key"]: r for r in store.rows(missing)} if missing else {}
    return [by_key.get(k) or extra[k] for k in keys if k in by_key or k in extra]


def _guidance(backbone: str, values: Sequence[float | None]) -> str:
    """The guidance scale(s) the cells ran: given, else the backbone's default (from its
    plugin, when installed), or "none" for a backbone without guidance."""
    try:
        from adapterswap.plugins import get_backbone

        cls = get_backbone(backbone)
        mode, default = cls.guidance_mode, cls.default_guidance_scale
    except Exception:  # noqa: BLE001 - plugin not installed: say what the cells say
        mode, default = None, None
    if mode == "none":
        return "none (no guidance)"
    shown = []
    for value in sorted(set(values), key=lambda v: (v is not None, v or 0.0)):
        if value is not None:
            shown.append(f"{value:g}")
        elif default is not None:
            shown.append(f"{default:g} (default)")
        else:
            shown.append("default")
    text = ", ".join(shown) or "-"
    return f"{text}, {mode} guidance" if mode else text


def resolved_runs(store: RunStore, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per run of the newest invocation (:meth:`RunStore.current_runs`), what it ran as
    resolved from its cells and its ``runs`` row: per backbone the adapter setting(s), step
    grid, size, guidance and weights identity; device, dtype, code hash, versions, dates,
    host, status, references, prompts, seeds and metrics."""
    by_key = {r["key"]: r for r in rows}
    resolved = []
    for run in store.current_runs():
        cells = _cells_of(run, by_key, store)
        spec = run.get("spec") or {}
        weights = dict(run.get("weights") or {})
        names = list(dict.fromkeys([*(spec.get("backbones") or []),
                                    *(c["backbone"] for c in cells)]))
        backbones = []
        for name in names:
            mine = [c for c in cells if c["backbone"] == name]
            adapters = sorted({c["adapter"] for c in mine if c["adapter"] != "none"})
            adapter = ", ".join(adapters) or "none"
            if adapters and any(c["adapter"] == "none" for c in mine):
                adapter += " (and adapter off)"
            on = [c for c in mine if c["adapter"] != "none"]
            backbones.append({
                "backbone": name, "weights": weights.pop(f"backbone:{name}", None),
                "adapter": adapter,
                "scales": ", ".join("default" if v is None else f"{v:g}" for v in sorted(
                    {c.get("scale") for c in on}, key=lambda v: (v is not None, v or 0.0)))
                or "-",
                "windows": ", ".join(_window_text(*w) for w in sorted(
                    {(c.get("start") or 0.0, 1.0 if c.get("end") is None else c["end"])
                     for c in on})) or "-",
                "steps": ", ".join(str(s) for s in sorted({c["steps"] for c in mine})) or "-",
                "size": ", ".join(f"{h}x{w}" for h, w in sorted(
                    {(c["height"], c["width"]) for c in mine})) or "-",
                "guidance": _guidance(name, [c.get("guidance_scale") for c in mine]),
                "cells": len(mine),
                "done": sum(c["status"] == "done" for c in mine),
                "failed": sum(c["status"] == "failed" for c in mine),
            })
        argv = run.get("argv") or []
        command = ("adapterswap " + shlex.join(argv[1:])) if argv and \
            "adapterswap" in str(argv[0]) else None
        metrics = run.get("metrics") or {}
        resolved.append({
            "id": run["id"], "status": run["status"], "started": _iso(run["started_at"]),
            "finished": _iso(run.get("finished_at")),
            "seconds": (run["finished_at"] - run["started_at"])
            if run.get("finished_at") else None,
            "host": run.get("host") or "-", "device": run["device"], "dtype": run["dtype"],
            "preset": spec.get("preset"), "code_hash": run["code_hash"],
            "versions": dict(run.get("versions") or {}), "other_weights": weights,
            "backbones": backbones,
            "references": {r: (run.get("reference_hashes") or {}).get(r)
                           for r in sorted({c["reference"] for c in cells})},
            "prompts": list(dict.fromkeys(c["prompt"] for c in cells)),
            "seeds": sorted({c["seed"] for c in cells}),
            "metrics": {m: (metrics.get(m) or {}).get("available", True)
                        for m in spec.get("metrics") or sorted(metrics)},
            "command": command, "cells": len(cells),
        })
    return resolved


# ------------------------------------------------------------------------ HTML pieces
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


def _cell(value: Any) -> str:
    text = _fmt(value)
    plain = re.sub(r"<[^>]+>", "", text)
    return f'<td class="w">{text}</td>' if len(plain) > 40 else f"<td>{text}</td>"


def _table(headers: Sequence[str], body: Sequence[Sequence[Any]], css: str = "") -> str:
    """An HTML table (long cells wrap, short ones do not); no rows, no table (an empty
    string)."""
    if not body:
        return ""
    head = "".join(f"<th>{_fmt(h) if isinstance(h, _Raw) else html.escape(h)}</th>"
                   for h in headers)
    rows = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in body)
    cls = f' class="{css}"' if css else ""
    return (f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead><tbody>{rows}'
            "</tbody></table></div>")


def _span(interval: Sequence[int] | None) -> str:
    return N_TOO_SMALL if not interval else f"{interval[0]}-{interval[1]}"


def _quartiles(entry: Mapping[str, Any]) -> str:
    """A latency row's IQR as ``q1-q3`` (a spread over repeats, not a confidence interval)."""
    if entry.get("iqr_s") is not None:
        return f"{entry['q1_s']:.3g}-{entry['q3_s']:.3g}"
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
    text = f"{entry['median_s']:.3g} s"
    if entry.get("method") != "fitted" or entry.get("iqr_s") is not None:
        text += f" (IQR {_quartiles(entry)})"
    return text


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;
 max-width:1200px;padding:0 1.5em;color:#222;line-height:1.45}
h1{margin:.2em 0} h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.8em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
td{white-space:nowrap} td.w{white-space:normal;min-width:16em;text-align:left}
.scroll{overflow-x:auto}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
table.kv td,table.kv th{text-align:left} table.kv th{white-space:nowrap}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.5em 1em}
.banner{background:#fdecea;border:2px solid #c0392b;padding:.7em 1em;font-size:15px;
 margin:1em 0}
.glance{background:#f5f8fc;border:1px solid #c9d7ea;padding:.4em 1.2em}
.glance li{margin:.35em 0}
.better{color:#137333;font-weight:600} .worse{color:#b3261e;font-weight:600}
.neutral{color:#555;font-weight:600}
img{max-width:100%} img.plot{width:100%;height:auto}
figure{margin:1em 0} figcaption{font-size:13px;color:#555}
.refs{display:flex;flex-wrap:wrap;gap:1.5em}
table.grid td,table.grid th{text-align:center;vertical-align:middle;padding:4px}
table.grid th.row{text-align:right;white-space:nowrap;font-weight:600}
table.grid .g{border-left:3px solid #888}
table.grid img,.refs img{width:128px;height:auto}
img.px{image-rendering:pixelated}
.tile{margin:0;display:inline-block} .tile a{cursor:zoom-in} .tile .close,.tile .hint{display:none}
.tile:target{position:fixed;inset:0;z-index:10;margin:0;background:rgba(15,15,15,.9);
 display:flex;flex-direction:column;align-items:center;justify-content:center}
.tile:target img{width:94vw;height:84vh;max-width:none;object-fit:contain}
.tile:target figcaption{color:#fff;font-size:15px;margin-top:.6em}
.tile:target .hint{display:inline;color:#bbb}
.tile:target .close{display:block;position:fixed;inset:0;cursor:zoom-out}
code{font-size:90%} .notes{font-size:13px;color:#555}
"""


class _Page:
    """Collects the page's parts and its pictures; every picture is embedded once and
    written once to ``plots/`` under its own name."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.files: dict[str, bytes] = {}
        self._zooms = 0

    def add(self, *parts: str) -> None:
        self.parts.extend(p for p in parts if p)

    def img(self, name: str, png: bytes, alt: str, css: str = "") -> str:
        base, n = name, 1
        while name in self.files:
            n += 1
            name = f"{base}-{n}"
        self.files[name] = png
        cls = f' class="{css}"' if css else ""
        return f'<img{cls} alt="{html.escape(alt)}" src="{_data_uri(png)}">'

    def zoomable(self, name: str, png: bytes, caption: str, *, pixelated: bool = False,
                 visible_caption: str | None = None) -> str:
        """A picture that opens enlarged on click and closes on the next click (CSS
        ``:target``, no script)."""
        self._zooms += 1
        anchor = f"z{self._zooms}"
        image = self.img(name, png, caption, "px" if pixelated else "")
        shown = html.escape(visible_caption) if visible_caption is not None else ""
        return (f'<figure class="tile" id="{anchor}"><a href="#{anchor}">{image}</a>'
                f'<figcaption>{shown}<span class="hint">{html.escape(caption)} '
                "(click to close)</span></figcaption>"
                '<a class="close" href="#_" aria-label="close"></a></figure>')

    def figure(self, name: str, png: bytes, alt: str, caption: str = "") -> str:
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        return f"<figure>{self.img(name, png, alt, 'plot')}{cap}</figure>"


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
        "attempted. Verdicts: <i>better</i> / <i>worse</i> when the 95% interval of the paired "
        f"delta excludes zero, <i>{NO_DIFFERENCE}</i> when it includes zero, "
        f"<i>{N_TOO_SMALL_TO_TELL}</i> without an interval.</p>")


def _report_kind(swap_meta: Any, spec: Mapping[str, Any], analysis: Analysis) -> str:
    if swap_meta:
        return "swap"
    if analysis.ablations or spec.get("adapter_off") or spec.get("scales") \
            or spec.get("windows"):
        return "ablation"
    if analysis.trajectories and spec.get("only_default_steps"):
        return "trajectory"
    return "sweep"


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
        runs = resolved_runs(store, rows)
        references = reference_thumbnails(out, rows)
        versions = store.meta("versions", {})

    page = _Page()
    kind = _report_kind(swap_meta, spec, analysis)
    done = sum(r["status"] == "done" for r in rows)
    failed_count = sum(r["status"] == "failed" for r in rows)
    heading = {"ablation": "adapterswap ablation report",
               "trajectory": "adapterswap trajectory report"}.get(kind,
                                                                  "adapterswap sweep report")
    if kind == "swap":
        heading = (f"adapterswap swap report: {html.escape(swap_meta['from'])} &rarr; "
                   f"{html.escape(swap_meta['to'])}")
    page.add(f"<h1>{heading}</h1><p>{plural(len(rows), 'cell')} ({done} done, "
             f"{failed_count} failed) in <code>{html.escape(str(out))}</code>"
             f"{'' if keys is None else _SCOPE_NOTE}.</p>")
    presets = {r["preset"] for r in runs if r.get("preset")} or (
        {spec["preset"]} if not runs and spec.get("preset") else set())
    for preset in sorted(presets):
        text = PRESET_BANNER.get(preset, f"<b>Preset {html.escape(preset)}.</b> The models "
                                         "are not the real ones: the images and numbers "
                                         "below may be meaningless.")
        page.add(f'<div class="banner" id="preset-banner">{text}</div>')
    page.add(*_source_warnings(analysis))
    unavailable = {m: r for m, (ok, r) in status.items() if not ok}
    for metric, reason in sorted(unavailable.items()):
        page.add(f'<p class="warn">Metric <b>{html.escape(metric)}</b> is unavailable: '
                 f"{html.escape(reason or '')}</p>")
    for note in [*notes, *analysis.notes]:
        page.add(f'<p class="warn">{html.escape(note)}</p>')
    page.add(*_confound_block(analysis))
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        page.add("<h2>Failed cells</h2>", _table(
            ["backbone", "setting", "prompt", "seed", "steps", "error"],
            [[r["backbone"], row_label(r), r["prompt"], r["seed"], r["steps"], r["error"]]
             for r in failed]))

    page.add(*_glance_section(analysis, store_swap))
    page.add(*_run_section(page, runs, references, versions, spec))
    if store_swap:
        page.add(*_swap_section(store_swap, analysis))
    if analysis.ablations:
        page.add(*_ablation_section(page, analysis, plots))
    if analysis.trajectories and kind == "trajectory":
        page.add(*_trajectory_section(page, analysis, plots, strips))
    metric_plots = [(n, p) for n, p in plots.items() if n.startswith("metric-")]
    regime_rows = [_regime_row(c) for c in analysis.curves
                   if c.metric_kind != "latency" and len(c.steps) >= 2]
    if metric_plots or regime_rows:
        page.add("<h2>Metrics vs steps</h2>")
        for name, png in metric_plots:
            page.add(page.figure(name, png, name, _plot_caption(analysis, name)))
        if regime_rows:
            page.add("<h3>Effective regime and knee</h3>", _table(
                ["backbone + setting", "metric (better)", "margin",
                 "effective regime (steps)", "regime 90% interval", "knee (steps)",
                 "knee 90% interval", "plateau (mean at max steps)", "scored at max steps"],
                regime_rows))
    page.add(*_recommendation_section(analysis))
    page.add(*_latency_section(page, analysis, plots))
    page.add(*_per_step_section(analysis))
    if analysis.trajectories and kind != "trajectory":
        page.add(*_trajectory_section(page, analysis, plots, strips))
    if exit_meta:
        page.add(*_exit_section(exit_meta, exits))
    if analysis.probes:
        page.add("<h2>Attention-stream probes</h2>",
                 "<p>Norm of the adapter's (or text) stream relative to the base stream, "
                 "per block and step, averaged over cells.</p>",
                 _table(["backbone", "setting", "quantity", "steps", "cells",
                         "first step (mean)", "last step (mean)"],
                        [[m.backbone, m.setting, m.quantity, m.num_steps, m.cells,
                          m.mean_curve[0], m.mean_curve[-1]] for m in analysis.probes]))
        for name, png in plots.items():
            if name.startswith("probes-"):
                page.add(page.figure(name, png, name))
    page.add(*_image_section(page, grids))
    page.add("<h2>Methods</h2>", _statistics_note(analysis))
    page.add(*_coverage_table(analysis, rows, cell_metrics))

    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    for stale in plot_dir.glob("*.png"):
        if _OWN_PLOTS.match(stale.name) and stale.stem not in page.files:
            stale.unlink()
    for name, png in page.files.items():
        (plot_dir / f"{name}.png").write_bytes(png)
    document = (f"<!doctype html><html><head><meta charset='utf-8'><title>adapterswap report"
                f"</title><meta name='viewport' content='width=device-width'>"
                f"<style>{STYLE}</style></head><body>{''.join(page.parts)}</body></html>")
    report = out / "report.html"
    report.write_text(document, encoding="utf-8")
    return report


# ------------------------------------------------------------------------ sections
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


def _swap_fidelity_metric(swap: Mapping[str, Any], analysis: Analysis) -> str | None:
    for backbone in (swap["to"], swap["from"]):
        for label, metric in sorted(analysis.fidelity_metric.items()):
            if label.split("|", 1)[0] == backbone and metric in swap["metrics"]:
                return metric
    return None


def _swap_headline(swap: Mapping[str, Any], analysis: Analysis) -> str:
    """``toy-fast at 2 steps is 5.9x faster than toy-dev at 8 steps; toy-colour-match +0.028
    [95% CI +0.010, +0.050]: better``."""
    lat = swap.get("latency")
    steps = swap.get("steps") or {}

    def at(backbone: str, key: str) -> str:
        n = (lat or {}).get(key) or (steps.get(backbone) or [None])[-1]
        return f"<b>{html.escape(backbone)}</b>" + (f" at {plural(n, 'step')}" if n else "")

    if lat and lat.get("speedup"):
        speedup = lat["speedup"]
        pace = (f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower")
        text = (f"{at(swap['to'], 'to_steps')} is <b>{pace}</b> than "
                f"{at(swap['from'], 'from_steps')} ({lat['to_s']:.3g} s vs "
                f"{lat['from_s']:.3g} s per image, median)")
    else:
        text = (f"{at(swap['to'], 'to_steps')} against {at(swap['from'], 'from_steps')} "
                "(latency not measured)")
    metric = _swap_fidelity_metric(swap, analysis)
    shown = [metric] if metric else [m for m in swap["metrics"]][:3]
    for name in shown:
        d = swap["metrics"][name]
        verdict = d.get("verdict", N_TOO_SMALL_TO_TELL)
        text += (f"; {html.escape(name)} {html.escape(_delta_text(d))}: "
                 f"{_verdict_html(verdict)}")
    if not shown:
        text += "; no metric was scored on both"
    return text


def _glance_section(analysis: Analysis, swap: Mapping[str, Any] | None) -> list[str]:
    """The verdicts in words: the swap, the ablations, the recommendations, the
    trajectories."""
    items = []
    if swap:
        items.append(_swap_headline(swap, analysis))
    for backbone in sorted({a["backbone"] for a in analysis.ablations}):
        for metric in _heatmap_metrics(analysis, backbone)[:1]:
            entries = [a for a in analysis.ablations if a["backbone"] == backbone
                       and a["metric"] == metric]
            counts = {v: sum(a.get("verdict") == v for a in entries)
                      for v in (BETTER, WORSE, NO_DIFFERENCE, N_TOO_SMALL_TO_TELL)}
            tally = ", ".join(f"{n} {_verdict_html(v)}" for v, n in counts.items() if n)
            best = max((a for a in entries if a["mean"] is not None),
                       key=lambda a: a["mean"] if a["higher_is_better"] is not False
                       else -a["mean"], default=None)
            text = (f"<b>{html.escape(backbone)}</b>, {html.escape(metric)} against adapter "
                    f"off over {plural(len(entries), 'setting')}: {tally or 'no pairs'}")
            if best is not None:
                text += (f". Best: {html.escape(best['setting'])} "
                         f"{html.escape(_delta_text(best))}: "
                         f"{_verdict_html(best.get('verdict', ''))}")
            items.append(text)
    recs = analysis.recommendations
    made = [r for r in recs if r.steps is not None]
    for r in made:
        lat = analysis.latency.get(r.label, {}).get(r.steps)
        span = r.regime_interval
        items.append(
            f"<b>{html.escape(r.backbone)} + {html.escape(r.adapter)}</b>: "
            f"<b>{plural(r.steps, 'step')}</b> {'is' if r.steps == 1 else 'are'} enough for "
            f"{html.escape(r.metric or '')} (within {r.margin:.3g} of the "
            f"{r.plateau_steps}-step plateau; effective regime {r.regime}"
            + (f", 90% interval {span[0]}-{span[1]}" if span else f", {N_TOO_SMALL} for an "
               "interval") + ")"
            + (f"; median latency {_latency_text(lat)}" if lat else ""))
    several_steps = any(len(c.steps) >= 2 for c in analysis.curves)
    if recs and not made and not swap and not analysis.ablations and several_steps:
        reasons = sorted({r.reason for r in recs})
        items.append("No recommendation: " + html.escape(reasons[0] if len(reasons) == 1
                                                         else "; ".join(reasons)))
    for curve in analysis.trajectories:
        base = curve.label.rsplit(" (", 1)[0]
        if analysis.fidelity_metric.get(base) not in (None, curve.metric):
            continue
        if base not in analysis.fidelity_metric and curve.metric_kind in ("diagnostic",
                                                                          "latency"):
            continue
        setting = curve.adapter.rsplit(" (", 1)[0]
        what = (f"<b>{html.escape(curve.backbone)} + {html.escape(setting)}</b>, "
                f"{curve.steps[-1] if curve.steps else '?'}-step run")
        if curve.effective_regime is not None:
            span = curve.regime_interval
            items.append(f"{what}: {html.escape(curve.metric)} is within {curve.margin:.3g} "
                         f"of its final value from step <b>{curve.effective_regime}</b>"
                         + (f" (90% interval {span[0]}-{span[1]})" if span else ""))
        else:
            items.append(f"{what}: {html.escape(curve.metric)}: "
                         f"{html.escape(curve.regime_note or 'no regime')}")
    if not items:
        return []
    return ["<h2>At a glance</h2>", '<ul class="glance" id="verdicts">'
            + "".join(f"<li>{i}</li>" for i in items) + "</ul>"]


def _run_section(page: _Page, runs: Sequence[Mapping[str, Any]],
                 references: Sequence[tuple[str, bytes | None, bool]],
                 versions: Mapping[str, str], spec: Mapping[str, Any]) -> list[str]:
    """The run as resolved: per run of the newest invocation, its backbones (adapter, steps,
    size, guidance, weights) and its environment; then the reference images."""
    parts = ["<h2>Run</h2>"]
    if not runs:  # a store written before runs were recorded: the spec as given
        parts.append("<p>This store records no runs; the spec as given:</p>")
        parts.append(_table(["setting", "value"],
                            [[k, json.dumps(v)] for k, v in sorted((spec or {}).items())]
                            + [[f"version: {k}", v] for k, v in sorted(versions.items())],
                            "kv"))
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>Run {run['id']}</h3>")
        backbones = run["backbones"]
        show_scales = any(b["scales"] not in ("-", "default") for b in backbones)
        show_windows = any(b["windows"] not in ("-", "0-1") for b in backbones)
        headers = ["backbone", "weights", "adapter"] + (["scales"] if show_scales else []) \
            + (["windows"] if show_windows else []) + ["steps run", "size (h x w)",
                                                       "guidance", "cells"]
        body = []
        for b in backbones:
            cells = plural(b["cells"], "cell") + (f" ({b['failed']} failed)"
                                                  if b["failed"] else "")
            body.append([b["backbone"], b["weights"], b["adapter"]]
                        + ([b["scales"]] if show_scales else [])
                        + ([b["windows"]] if show_windows else [])
                        + [b["steps"], b["size"], b["guidance"], cells])
        parts.append(_table(headers, body))
        seconds = run["seconds"]
        duration = f" ({seconds:.1f} s)" if seconds is not None else ""
        refs = ", ".join(_reference_name(r) + (f" ({h[:19]})" if h and h != r else "")
                         for r, h in run["references"].items())
        metrics = ", ".join(m + ("" if ok else " (unavailable)")
                            for m, ok in run["metrics"].items())
        general = [
            ["status", run["status"]],
            ["started", run["started"]], ["finished", f"{run['finished']}{duration}"],
            ["host", run["host"]], ["device", run["device"]], ["dtype", run["dtype"]],
            ["preset", run["preset"] or "none (real weights)"],
            ["code hash", _Raw(f"<code>{html.escape(run['code_hash'])}</code>")],
            ["versions", ", ".join(f"{k} {v}" for k, v in sorted(run["versions"].items()))],
        ]
        general += [[f"weights: {k.replace(':', ' ', 1)}", v]
                    for k, v in sorted(run["other_weights"].items())]
        general += [
            [plural(len(run["references"]), "reference"), refs or "none"],
            [plural(len(run["prompts"]), "prompt"),
             _Raw("<br>".join(html.escape(p) for p in run["prompts"][:12])
                  + ("<br>..." if len(run["prompts"]) > 12 else ""))],
            [plural(len(run["seeds"]), "seed"), ", ".join(map(str, run["seeds"]))],
            ["metrics", metrics or "-"],
        ]
        if run["command"]:
            general.append(["command", _Raw(f"<code>{html.escape(run['command'])}</code>")])
        parts.append(_table(["", f"run {run['id']}"], general, "kv"))
    if references:
        parts.append("<h3>References</h3>")
        tiles = []
        for i, (reference, png, enlarged) in enumerate(references):
            name = _reference_name(reference)
            if png is None:
                tiles.append(f"<div>{html.escape(name)}: not saved</div>")
                continue
            tiles.append(page.zoomable(f"reference-{i:02d}-{safe_name(name, 40)}", png,
                                       f"reference {name}", pixelated=enlarged,
                                       visible_caption=name))
        parts.append('<div class="refs">' + "".join(tiles) + "</div>")
    return parts


def _swap_section(swap: Mapping[str, Any], analysis: Analysis) -> list[str]:
    parts = [f"<h2>Swap: {html.escape(swap['from'])} &rarr; {html.escape(swap['to'])}</h2>"]
    lat = swap.get("latency")
    if lat:
        def iqr(pair: Sequence[float] | None) -> str:
            return f" (IQR {pair[0]:.3g}-{pair[1]:.3g})" if pair else f" (IQR: {N_TOO_SMALL})"

        parts.append(f"<p>Median latency per image (batch 1): {lat['from_s']:.3g} s"
                     f"{iqr(lat.get('from_iqr'))} &rarr; {lat['to_s']:.3g} s"
                     f"{iqr(lat.get('to_iqr'))}: <b>{lat['speedup']:.1f}x faster</b>.</p>")
    parts.append("<p>Each metric: the paired delta (to - from) over identical references, "
                 "prompts and seeds at each backbone's steps.</p>")
    parts.append(_table(
        ["metric", "from (mean)", "to (mean)", "delta (to - from) [95% CI]", "pairs",
         "clusters", "scored from", "scored to", "better", "verdict"],
        [[m, d["from_mean"], d["to_mean"], _delta_text(d), d["n"], d["clusters"],
          _share(*d["from_scored"]), _share(*d["to_scored"]),
          {True: "higher", False: "lower"}.get(d["higher_is_better"], "direction unknown"),
          _Raw(_verdict_html(d.get("verdict", N_TOO_SMALL_TO_TELL)))]
         for m, d in swap["metrics"].items()]))
    return parts


def _ablation_section(page: _Page, analysis: Analysis, plots: Mapping[str, bytes]
                      ) -> list[str]:
    parts = ["<h2>Adapter ablation: setting minus adapter off</h2>",
             "<p>Paired over backbone, reference, prompt, seed and steps; clusters "
             "(reference, prompt) resampled. The heatmap shows the fidelity metric's delta "
             "per scale and window; the table every metric's.</p>"]
    for name, png in plots.items():
        if name.startswith("ablation-"):
            parts.append(page.figure(name, png, name, "Blue: better than adapter off, red: "
                                     "worse; each cell: mean delta, 95% CI, verdict."))
    metrics = sorted({a["metric"] for a in analysis.ablations})
    ordered = sorted(analysis.ablations, key=lambda a: (a["backbone"], _setting_order(a)))
    settings = list(dict.fromkeys((a["backbone"], a["setting"]) for a in ordered))
    by = {(a["backbone"], a["setting"], a["metric"]): a for a in analysis.ablations}
    excluded = any(a["excluded_window_never_opens"] for a in analysis.ablations)
    body = []
    for backbone, setting in settings:
        row: list[Any] = [backbone, setting]
        never = 0
        for metric in metrics:
            a = by.get((backbone, setting, metric))
            if a is None:
                row.append("-")
                continue
            never = max(never, a["excluded_window_never_opens"])
            row.append(_Raw(f"{html.escape(_signed_ci(a))}<br>"
                            f"{_verdict_html(a.get('verdict', ''))} (n={a['n']})"))
        body.append(row + ([never] if excluded else []))
    headers = ["backbone", "setting"] + [_Raw(f"{html.escape(m)}<br><small>delta [95% CI]"
                                              "</small>") for m in metrics]
    parts.append(_table(headers + (["excluded (window never opens)"] if excluded else []),
                        body))
    return parts


def _plot_caption(analysis: Analysis, name: str) -> str:
    metric = name.split("-", 1)[1]
    curves = [c for c in analysis.curves if safe_name(c.metric) == metric
              and len(c.steps) >= 2]
    said = []
    if any(v is not None for c in curves for v in c.ci_low):
        said.append("Band: 95% CI of the mean.")
    else:
        said.append(f"No interval ({N_TOO_SMALL}, or a latency: the latency table has "
                    "the spread over repeats).")
    if any(c.effective_regime is not None for c in curves):
        said.append("Dashed line: effective regime (shaded: its 90% interval).")
    if any(c.knee is not None for c in curves):
        said.append("Star: knee.")
    partial = any(s is not None and s < 1 for c in curves for s in c.scored_share)
    said.append("Lower panel: share of attempted images the metric scored." if partial
                else "Every attempted image was scored.")
    return " ".join(said)


def _recommendation_section(analysis: Analysis) -> list[str]:
    parts = ["<h2>Recommendations</h2>"]
    recs = analysis.recommendations
    made = [r for r in recs if r.steps is not None]
    if analysis.curves and all(len(c.steps) < 2 for c in analysis.curves):
        parts.append("<p>No recommendation: every backbone and setting ran a single step "
                     "count, so there is nothing to choose between.</p>")
        return parts
    if analysis.recommendation is None:
        reasons = list(dict.fromkeys(r.reason for r in recs)) or \
            [analysis.recommendation_reason]
        listed = "".join(f"<li>{html.escape(x)}</li>" for x in reasons)
        parts.append('<div class="warn"><b>No recommendation.</b> '
                     f"<ul>{listed}</ul></div>")
    parts.append("<p>Fidelity is judged on the metric of the adapter's kind (identity, style, "
                 "object; text for no adapter), never on sharpness or contrast. Several "
                 "metrics of that kind: the first by name.</p>")
    if made:
        parts.append(_table(
            ["backbone + setting", "fidelity metric (kind)", "steps",
             "regime 90% interval", "paired difference vs plateau [95% CI]",
             "latency (median)"],
            [[f"{r.backbone} + {r.adapter}",
              f"{r.metric or '-'}" + (f" ({r.metric_kind})" if r.metric_kind else ""),
              r.steps if r.steps is not None else "none",
              _span(r.regime_interval) if r.regime is not None else "-",
              "-" if r.difference is None else _signed_ci(
                  {"mean": r.difference, "ci_low": r.difference_ci_low,
                   "ci_high": r.difference_ci_high}),
              _latency_text(analysis.latency.get(r.label, {}).get(r.steps))
              if r.steps else "-"] for r in recs]))
        parts.append('<ul class="notes">' + "".join(
            f"<li>{html.escape(r.backbone)} + {html.escape(r.adapter)}: "
            f"{html.escape(r.reason)}</li>" for r in recs) + "</ul>")
    return parts


def _latency_section(page: _Page, analysis: Analysis, plots: Mapping[str, bytes]
                     ) -> list[str]:
    if not analysis.latency:
        return []
    parts = ["<h2>Latency</h2>",
             "<p>Per image, batch 1: the median over repeats with its interquartile range "
             f"(IQR; {N_TOO_SMALL} with fewer than two repeats), or a fitted fixed + per-step "
             "model with this step count's residual.</p>"]
    entries = [(label, steps, e) for label, by_steps in sorted(analysis.latency.items())
               for steps, e in sorted(by_steps.items())]
    fitted = any(e.get("residual_s") is not None for _, _, e in entries)
    denoise = any(e.get("denoise_s") is not None for _, _, e in entries)
    parts.append(_table(
        ["backbone + setting", "steps", "median (s)", "IQR (s)", "repeats", "method"]
        + (["fit residual (s)"] if fitted else []) + (["denoise median (s)"] if denoise
                                                      else []),
        [[label.replace("|", " + "), steps, _num(e["median_s"], 3), _quartiles(e),
          e["repeats"], e["method"]] + ([_num(e["residual_s"], 3)] if fitted else [])
         + ([_num(e["denoise_s"], 3)] if denoise else []) for label, steps, e in entries]))
    implausible = sorted({label.replace("|", " + ") for label, steps, e in entries
                          if (e.get("median_s") is not None and e["median_s"] <= 0)
                          or (e.get("per_step_s") is not None and e["per_step_s"] < 0)})
    if implausible:
        parts.append('<p class="warn"><b>Implausible latency fit</b> for '
                     f"{html.escape(', '.join(implausible))}: the fixed + per-step model "
                     "fitted to the measured step counts has a negative per-step time (the "
                     "measurements are noise at this size), so its predicted latencies are "
                     "meaningless. Measure every step count (<code>--timing-repeats</code>, "
                     "<code>--timing-budget</code>).</p>")
    for name, png in plots.items():
        if name.startswith("pareto"):
            parts.append("<h3>Latency-fidelity Pareto front</h3>")
            parts.append(page.figure(name, png, name))
    return parts


def _per_step_section(analysis: Analysis) -> list[str]:
    """One table: rows (backbone, setting, steps), columns metrics, each cell
    ``mean [95% CI] (scored/attempted)``."""
    curves = analysis.curves
    if not curves:
        return []
    metrics = sorted({c.metric for c in curves})
    direction = {c.metric: c.direction for c in curves}
    kinds = {c.metric: c.metric_kind for c in curves}
    cells: dict[tuple[str, str, int], dict[str, str]] = {}
    for curve in curves:
        for j, steps in enumerate(curve.steps):
            mean = curve.mean[j]
            if curve.metric_kind == "latency":
                text = "-" if mean is None else f"{mean:.3g} s"
            else:
                text = _mean_ci(mean, curve.ci_low[j], curve.ci_high[j])
            text += f" ({curve.scored[j]}/{curve.attempted[j]})"
            cells.setdefault((curve.backbone, curve.adapter, steps), {})[curve.metric] = text
    order = list(dict.fromkeys(c.backbone for c in curves))
    body = [[backbone, setting, steps, *[cells[(backbone, setting, steps)].get(m, "-")
                                         for m in metrics]]
            for backbone, setting, steps in sorted(
                cells, key=lambda k: (order.index(k[0]), k[1] != "none", k[1], k[2]))]
    headers: list[str] = ["backbone", "setting", "steps"]
    for m in metrics:
        better = "lower is better (s)" if kinds.get(m) == "latency" else (
            f"{direction[m]} is better" if direction[m] != "unknown" else "direction unknown")
        headers.append(_Raw(f"{html.escape(m)}<br><small>{better}</small>"))
    return ["<h2>Per step</h2>",
            "<p>Each cell: mean [95% CI] (images scored / attempted).</p>",
            _table(headers, body), _curve_notes(curves)]


def _curve_notes(curves: Sequence[Any]) -> str:
    """The curves' notes, each once, naming the curves it is about (all of them: once)."""
    about: dict[str, list[str]] = {}
    for curve in curves:
        for note in curve.notes:
            about.setdefault(note, []).append(f"{curve.backbone} + {curve.adapter}, "
                                              f"{curve.metric}")
    items = []
    for note, names in about.items():
        if len(names) == len(curves) and len(curves) > 1:
            items.append(f"every curve: {note}")
        else:
            shown = "; ".join(names) if len(names) <= 3 else plural(len(names), "curve")
            items.append(f"{shown}: {note}")
    if not items:
        return ""
    return ('<ul class="notes">' + "".join(f"<li>{html.escape(i)}</li>" for i in items[:12])
            + (f"<li>and {plural(len(items) - 12, 'more note')}</li>" if len(items) > 12
               else "") + "</ul>")


def _trajectory_section(page: _Page, analysis: Analysis, plots: Mapping[str, bytes],
                        strips: Sequence[tuple[str, bytes]]) -> list[str]:
    parts = ["<h2>Trajectories: the predicted clean image at every step</h2>",
             _table(["backbone", "run", "metric", "effective regime (step)",
                     "regime 90% interval", "knee (step)"],
                    [[c.backbone, c.adapter, c.metric, _regime_cell(c),
                      _span(c.regime_interval), c.knee] for c in analysis.trajectories])]
    for name, png in plots.items():
        if name.startswith("trajectory-"):
            parts.append(page.figure(name, png, name, "Band: 95% CI of the mean over seeds "
                                     "and references. Dashed line: effective regime."))
    for i, (title, png) in enumerate(strips):
        parts.append("<div>" + page.zoomable(
            f"strip-{i:03d}", png, f"x0 previews: {title}",
            visible_caption=f"x0 previews, step 1 to the last: {title}") + "</div>")
    return parts


def _image_section(page: _Page, grids: Sequence[ImageGrid]) -> list[str]:
    if not grids:
        return []
    parts = ["<h2>Images</h2>", "<p>Click an image to enlarge it; click again to close.</p>"]
    for g, grid in enumerate(grids):
        parts.append(f"<h3>Reference {html.escape(_reference_name(grid.reference))}, "
                     f"prompt &ldquo;{html.escape(grid.prompt)}&rdquo;</h3>")
        head = ""
        if len(grid.groups) > 1:
            head = "<tr><th></th>" + "".join(
                f'<th class="g" colspan="{len(grid.seeds)}">{html.escape(name)}</th>'
                for name in grid.groups) + "</tr>"
        head += "<tr><th></th>" + "".join(
            f'<th{" class=g" if i == 0 else ""}>seed {s}</th>'
            for _ in grid.groups for i, s in enumerate(grid.seeds)) + "</tr>"
        body = []
        for r, (label, tiles) in enumerate(grid.rows):
            cells = []
            for k, thumb in enumerate(tiles):
                group, seed = grid.groups[k // len(grid.seeds)], grid.seeds[k % len(grid.seeds)]
                css = ' class="g"' if k % len(grid.seeds) == 0 else ""
                if thumb is None:
                    cells.append(f"<td{css}>-</td>")
                    continue
                png, enlarged = thumb
                caption = ", ".join(p for p in (group, label, f"seed {seed}") if p)
                cells.append(f"<td{css}>" + page.zoomable(
                    f"cell-{g:03d}-{r:03d}-{k:02d}", png, caption, pixelated=enlarged)
                    + "</td>")
            body.append(f'<tr><th class="row">{html.escape(label)}</th>{"".join(cells)}</tr>')
        parts.append(f'<div class="scroll"><table class="grid"><thead>{head}</thead><tbody>'
                     f'{"".join(body)}</tbody></table></div>')
    return parts


def _coverage_table(analysis: Analysis, rows: Sequence[Mapping[str, Any]],
                    cell_metrics: Sequence[str]) -> list[str]:
    done_rows = [r for r in rows if r["status"] == "done"]
    coverage = []
    for metric in cell_metrics:
        values = [r["scores"].get(metric) for r in done_rows if metric in r["scores"]]
        undefined = sum(v is None for v in values)
        coverage.append([metric, analysis.metrics.get(metric, {}).get("kind"),
                         analysis.metrics.get(metric, {}).get("direction", "unknown"),
                         len(values) - undefined, undefined, len(done_rows) - len(values)])
    if not coverage:
        return []
    return ["<h3>Scores</h3>", _table(["metric", "kind", "better", "scored cells",
                                       "undefined (None: could not score)", "not attempted"],
                                      coverage)]


def _regime_cell(curve: Any) -> Any:
    if curve.direction == "unknown":
        return "direction unknown"
    if curve.effective_regime is None:
        return curve.regime_note or "-"
    return curve.effective_regime


def _regime_row(curve: Any) -> list[Any]:
    margin = "-" if curve.margin is None else f"{curve.margin:.3g} ({curve.margin_source})"
    known = curve.effective_regime is not None
    regime = _regime_cell(curve)
    if known and curve.regime_mode is not None and curve.regime_mode != regime:
        regime = f"{regime} (mode {curve.regime_mode})"
    return [f"{curve.backbone} + {curve.adapter}", f"{curve.metric} ({curve.direction})",
            margin, regime, _span(curve.regime_interval) if known else "-", curve.knee,
            _knee_span(curve), f"{_num(curve.plateau)} at {curve.steps[-1]}",
            _share(curve.scored[-1], curve.attempted[-1])]


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
                         e["latency_exit_s"], metric, _delta_text(d), d["n"]])
    parts.append(_table(["backbone", "steps", "exit at step", "adapter steps saved",
                         "latency full (median, s)", "latency exit (median, s)", "metric",
                         "delta [95% CI]", "pairs"], body))
    for p in exit_meta["plan"]:
        if p["exit_step"] is None:
            parts.append(f"<p>{html.escape(p['backbone'])}, {plural(p['steps'], 'step')}: "
                         "the contribution never fell below the threshold; full window "
                         "kept.</p>")
    return parts
