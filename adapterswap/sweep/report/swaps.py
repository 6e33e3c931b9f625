"""The report's sections for a swap to several targets and for enhancers: one table and one
plot over every target and enhancer (latency ratio, denoiser forwards, each metric's paired
delta with its 95% CI), and the enhancer-minus-none deltas with their cost."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.analysis import Analysis
from adapterswap.sweep.report.figures import _png, _pyplot, _tidy_axis
from adapterswap.sweep.report.page import _Page
from adapterswap.sweep.report.tables import _Raw, _table
from adapterswap.sweep.report.words import _signed_ci, _verdict_html


def _target(c: Mapping[str, Any]) -> str:
    enhancer = c.get("enhancer") or "none"
    return c["to"] + (f" + {enhancer}" if enhancer != "none" else "")


def _delta_cell(delta: Mapping[str, Any] | None) -> Any:
    """A table cell: the paired delta with its CI, verdict and pairs, or ``-``."""
    if delta is None:
        return "-"
    return _Raw(f"{html.escape(_signed_ci(delta))}<br>"
                f"{_verdict_html(delta.get('verdict', ''))} (n={delta['n']})")


def _forwards(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def swap_metric(comparisons: Sequence[Mapping[str, Any]], analysis: Analysis) -> str | None:
    """The metric the plot shows: the fidelity metric of the swap's backbones where one is
    scored on every comparison, else the first metric they all have."""
    shared = set.intersection(*(set(c["metrics"]) for c in comparisons)) if comparisons \
        else set()
    for label, metric in sorted(analysis.fidelity_metric.items()):
        if metric in shared and label.split("|", 1)[0] in {c["from"] for c in comparisons}:
            return metric
    for metric in sorted(shared):
        if any(c["metrics"][metric].get("mean") is not None for c in comparisons):
            return metric
    return None


def swap_plot(comparisons: Sequence[Mapping[str, Any]], metric: str) -> bytes | None:
    """Latency ratio (x, how many times faster than the source) against ``metric``'s paired
    delta with its 95% CI (y), one point per target and enhancer; ``None`` when no comparison
    has both."""
    points = [(c, c["latency"]["speedup"], c["metrics"][metric]) for c in comparisons
              if c.get("latency") and metric in c["metrics"]
              and c["metrics"][metric].get("mean") is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c, speedup, d in points:
        low = d["mean"] - d["ci_low"] if d.get("ci_low") is not None else 0.0
        high = d["ci_high"] - d["mean"] if d.get("ci_high") is not None else 0.0
        ax.errorbar([speedup], [d["mean"]], yerr=[[low], [high]], fmt="o", capsize=4,
                    label=_target(c))
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_xlabel(f"speed-up over {points[0][0]['from']} (median latency ratio)")
    ax.set_ylabel(f"{metric}: target - source (95% CI)")
    _tidy_axis(ax.yaxis)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    png = _png(fig)
    plt.close(fig)
    return png


def swap_table_section(page: _Page, swap: Mapping[str, Any], analysis: Analysis
                       ) -> list[str]:
    """A swap to several targets (or with enhancers): one row per target and enhancer."""
    comparisons = swap["comparisons"]
    metrics = sorted({m for c in comparisons for m in c["metrics"]})
    parts = [f"<h2>Swap: {html.escape(swap['from'])} &rarr; "
             f"{html.escape(', '.join(swap.get('targets') or [swap['to']]))}</h2>",
             "<p>Each target (with each enhancer) against the source without one, at each "
             "backbone's steps: the median latency ratio, the denoiser forwards per image, and "
             "each metric's paired delta (target - source) over identical references, prompts "
             "and seeds, clusters (reference, prompt) resampled.</p>"]
    metric = swap_metric(comparisons, analysis)
    png = swap_plot(comparisons, metric) if metric else None
    if png is not None:
        parts.append(page.figure("swap-targets", png, f"speed-up against {metric} delta",
                                 f"Each point: a target (+ enhancer); x: how many times "
                                 f"faster than {html.escape(swap['from'])}; y: the paired "
                                 f"{html.escape(metric or '')} delta with its 95% CI."))
    body = []
    for c in comparisons:
        lat = c.get("latency")
        steps = (c.get("steps") or {}).get(c["to"]) or []
        row: list[Any] = [_target(c), steps[-1] if steps else "-",
                          f"{lat['speedup']:.2f}x" if lat else "not measured",
                          f"{_forwards((c.get('forwards') or {}).get('from'))} &rarr; "
                          f"{_forwards((c.get('forwards') or {}).get('to'))}"]
        row[3] = _Raw(row[3])
        row += [_delta_cell(c["metrics"].get(m)) for m in metrics]
        body.append(row)
    headers = ["target", "steps", "speed-up", "forwards / image (source &rarr; target)"]
    headers[3] = _Raw(headers[3])
    parts.append(_table(headers + [_Raw(f"{html.escape(m)}<br><small>delta [95% CI]</small>")
                                   for m in metrics], body))
    return parts


def enhancer_section(enhancers: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each enhancer against no enhancer on the same backbone and adapter setting."""
    metrics = sorted({m for e in enhancers for m in e["metrics"]})
    parts = ["<h2>Enhancers: enhancer minus none</h2>",
             "<p>Paired over backbone, adapter setting, reference, prompt, seed and steps; "
             "clusters (reference, prompt) resampled. Cost: denoiser forwards per image and "
             "the median latency per image at the largest step count timed for both.</p>"]
    body = []
    for e in enhancers:
        forwards = e.get("forwards") or {}
        ratio = e.get("latency_ratio")
        row: list[Any] = [e["backbone"], e["setting"], e["enhancer"],
                          _Raw(f"{_forwards(forwards.get('none'))} &rarr; "
                               f"{_forwards(forwards.get(e['enhancer']))}"),
                          f"{ratio:.2f}x at {e['latency_steps']}" if ratio else "not measured"]
        row += [_delta_cell(e["metrics"].get(m)) for m in metrics]
        body.append(row)
    parts.append(_table(["backbone", "setting", "enhancer",
                         _Raw("forwards / image (none &rarr; enhancer)"),
                         "latency (enhancer / none)"]
                        + [_Raw(f"{html.escape(m)}<br><small>delta [95% CI]</small>")
                           for m in metrics], body))
    return parts
