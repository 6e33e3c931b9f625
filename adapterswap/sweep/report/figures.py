"""Matplotlib plumbing shared by every plot: the headless backend, PNG bytes, tick labels
with the decimals the spacing needs, a linear step axis and a legend under the plot."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


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


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]
