"""Heatmaps: the scale x window heatmap of the ablation deltas per backbone, and the
step x block heatmap of the attention-stream probes."""

from __future__ import annotations

from typing import Any

from adapterswap.sweep.analysis import N_TOO_SMALL, Analysis
from adapterswap.sweep.report.figures import _legend_below, _png, _pyplot, _step_axis, _tidy_axis
from adapterswap.sweep.report.words import _decimals, _window_text, plural, safe_name


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
