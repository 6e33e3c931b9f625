"""The methods at the foot of the page: the statistics in words and how many cells each
metric scored."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.analysis import N_TOO_SMALL, N_TOO_SMALL_TO_TELL, NO_DIFFERENCE, Analysis
from adapterswap.sweep.report.tables import _table


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


def _coverage_table(analysis: Analysis, rows: Sequence[Mapping[str, Any]],
                    cell_metrics: Sequence[str]) -> list[str]:
    done_rows = [r for r in rows if r["status"] == "done"]
    coverage = []
    for metric in cell_metrics:
        values = [r["scores"].get(metric) for r in done_rows if metric in r["scores"]]
        undefined = sum(v is None for v in values)
        info = analysis.metrics.get(metric, {})
        coverage.append([metric, info.get("evaluator") or "not recorded", info.get("kind"),
                         analysis.metrics.get(metric, {}).get("direction", "unknown"),
                         len(values) - undefined, undefined, len(done_rows) - len(values)])
    if not coverage:
        return []
    return ["<h3>Scores</h3>", _table(["metric", "evaluated by", "kind", "better",
                                       "scored cells",
                                       "undefined (None: could not score)", "not attempted"],
                                      coverage)]
