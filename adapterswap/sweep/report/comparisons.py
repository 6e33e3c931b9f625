"""The comparison sections: the swap (target minus source backbone), the adapter ablation
(each setting minus adapter off) and the probe-guided exit (exit minus full window), each
a table of paired deltas with their verdicts."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.analysis import N_TOO_SMALL, N_TOO_SMALL_TO_TELL, Analysis
from adapterswap.sweep.report.page import _Page
from adapterswap.sweep.report.tables import _Raw, _table
from adapterswap.sweep.report.words import (
    _delta_text,
    _setting_order,
    _share,
    _signed_ci,
    _verdict_html,
    plural,
)


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
