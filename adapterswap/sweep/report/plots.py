"""The plots of a report: metric vs steps per backbone and setting (and along the run for
trajectories), the latency-fidelity Pareto front, and the heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapterswap.sweep.analysis import N_TOO_SMALL, Analysis
from adapterswap.sweep.report.figures import (
    _legend_below,
    _metric_label,
    _nan,
    _png,
    _pyplot,
    _step_axis,
    _tidy_axis,
)
from adapterswap.sweep.report.heatmaps import _probe_plots, ablation_heatmaps
from adapterswap.sweep.report.words import plural, safe_name


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
