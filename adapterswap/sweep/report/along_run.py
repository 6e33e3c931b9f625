"""The sections about what happens along one run: trajectories (the predicted clean image
at every step, with its x0-preview strips) and the attention-stream probes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from adapterswap.sweep.analysis import Analysis
from adapterswap.sweep.report.page import _Page
from adapterswap.sweep.report.steps import _regime_cell
from adapterswap.sweep.report.tables import _table
from adapterswap.sweep.report.words import _span


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


def _probe_section(page: _Page, analysis: Analysis, plots: Mapping[str, bytes]) -> list[str]:
    """The probes' first- and last-step means per setting, and their heatmaps."""
    if not analysis.probes:
        return []
    parts = ["<h2>Attention-stream probes</h2>",
             "<p>Norm of the adapter's (or text) stream relative to the base stream, "
             "per block and step, averaged over cells.</p>",
             _table(["backbone", "setting", "quantity", "steps", "cells",
                     "first step (mean)", "last step (mean)"],
                    [[m.backbone, m.setting, m.quantity, m.num_steps, m.cells,
                      m.mean_curve[0], m.mean_curve[-1]] for m in analysis.probes])]
    for name, png in plots.items():
        if name.startswith("probes-"):
            parts.append(page.figure(name, png, name))
    return parts
