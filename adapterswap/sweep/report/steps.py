"""The sections about step counts: metrics vs steps with the regime and knee table, the
recommendations, latency and the per-step table of means with their intervals."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.analysis import N_TOO_SMALL, Analysis
from adapterswap.sweep.report.page import _Page
from adapterswap.sweep.report.tables import _Raw, _table
from adapterswap.sweep.report.words import (
    _knee_span,
    _latency_text,
    _mean_ci,
    _num,
    _quartiles,
    _share,
    _signed_ci,
    _span,
    plural,
    safe_name,
)


def _metrics_section(page: _Page, analysis: Analysis, plots: Mapping[str, bytes]) -> list[str]:
    """Metric-vs-steps plots with their captions, and the regime and knee table."""
    parts: list[str] = []
    metric_plots = [(n, p) for n, p in plots.items() if n.startswith("metric-")]
    regime_rows = [_regime_row(c) for c in analysis.curves
                   if c.metric_kind != "latency" and len(c.steps) >= 2]
    if metric_plots or regime_rows:
        parts.append("<h2>Metrics vs steps</h2>")
        for name, png in metric_plots:
            parts.append(page.figure(name, png, name, _plot_caption(analysis, name)))
        if regime_rows:
            parts.extend(["<h3>Effective regime and knee</h3>", _table(
                ["backbone + setting", "metric (better)", "margin",
                 "effective regime (steps)", "regime 90% interval", "knee (steps)",
                 "knee 90% interval", "plateau (mean at max steps)", "scored at max steps"],
                regime_rows)])
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
    parts.append("<p>Fidelity is judged on a metric that declares the adapter's kind among "
                 "the kinds it measures fidelity for (<code>none</code>: the prompt, for no "
                 "adapter), never on one that declares no kinds (diagnostics such as "
                 "sharpness). Several such metrics: the first by name.</p>")
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
