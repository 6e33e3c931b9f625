"""The top of the page: banners for random-weight presets, warnings (where facts came from,
unknown directions, confounded cells) and the verdicts at a glance."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.analysis import (
    BETTER,
    N_TOO_SMALL,
    N_TOO_SMALL_TO_TELL,
    NO_DIFFERENCE,
    WORSE,
    Analysis,
)
from adapterswap.sweep.report.heatmaps import _heatmap_metrics
from adapterswap.sweep.report.tables import _table
from adapterswap.sweep.report.words import _delta_text, _latency_text, _verdict_html, plural

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


def _preset_banners(runs: Sequence[Mapping[str, Any]], spec: Mapping[str, Any]) -> list[str]:
    """A banner per preset of random weights the runs used (the spec's, for a store that
    records no runs)."""
    presets = {r["preset"] for r in runs if r.get("preset")} or (
        {spec["preset"]} if not runs and spec.get("preset") else set())
    parts = []
    for preset in sorted(presets):
        text = PRESET_BANNER.get(preset, f"<b>Preset {html.escape(preset)}.</b> The models "
                                         "are not the real ones: the images and numbers "
                                         "below may be meaningless.")
        parts.append(f'<div class="banner" id="preset-banner">{text}</div>')
    return parts


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

    enhancer = swap.get("enhancer") or "none"
    target = at(swap["to"], "to_steps") + (f" + {html.escape(enhancer)}"
                                           if enhancer != "none" else "")
    if lat and lat.get("speedup"):
        speedup = lat["speedup"]
        pace = (f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower")
        text = (f"{target} is <b>{pace}</b> than "
                f"{at(swap['from'], 'from_steps')} ({lat['to_s']:.3g} s vs "
                f"{lat['from_s']:.3g} s per image, median)")
    else:
        text = (f"{target} against {at(swap['from'], 'from_steps')} "
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
    for comparison in (swap.get("comparisons") or [swap]) if swap else []:
        items.append(_swap_headline(comparison, analysis))
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
