"""The entry point: :func:`build_report` rebuilds ``report.html``, ``plots/``,
``results.csv`` and ``analysis.json`` (and ``swap.json``, ``probe_exit.json`` where the
store has a swap or an exit plan) from the store alone, and assembles the page from the
sections top to bottom."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapterswap.sweep.analysis import (
    Analysis,
    analyse,
    enhancer_deltas,
    resolve_adapter_kinds,
    resolve_metric_info,
    row_label,
    swap_comparisons,
)
from adapterswap.sweep.report.along_run import _probe_section, _trajectory_section
from adapterswap.sweep.report.comparisons import _ablation_section, _exit_section, _swap_section
from adapterswap.sweep.report.glance import (
    _confound_block,
    _glance_section,
    _preset_banners,
    _source_warnings,
)
from adapterswap.sweep.report.images import (
    _image_section,
    _trajectory_strips,
    image_grids,
    reference_thumbnails,
)
from adapterswap.sweep.report.methods import _coverage_table, _statistics_note
from adapterswap.sweep.report.page import _Page, write_page
from adapterswap.sweep.report.plots import plot_curves
from adapterswap.sweep.report.results_csv import write_csv
from adapterswap.sweep.report.runs import _run_section, resolved_runs
from adapterswap.sweep.report.steps import (
    _latency_section,
    _metrics_section,
    _per_step_section,
    _recommendation_section,
)
from adapterswap.sweep.report.swaps import enhancer_section, swap_table_section
from adapterswap.sweep.report.tables import _table
from adapterswap.sweep.report.words import plural
from adapterswap.sweep.store import RunStore

_SCOPE_NOTE = (" (the cells of the newest run; every run's cells: "
               "<code>adapterswap report --all-runs</code>)")


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
            targets = swap_meta["to"] if isinstance(swap_meta["to"], list) \
                else [swap_meta["to"]]
            comparisons = swap_comparisons(rows, latency_rows, source=swap_meta["from"],
                                           targets=targets, metric_info=metric_info,
                                           missing=missing)
            # the first comparison's fields at the top (one target: as before), all of them
            # under "comparisons"
            store_swap = {**comparisons[0], "targets": targets, "comparisons": comparisons}
            (out / "swap.json").write_text(json.dumps(store_swap, indent=2, default=str))
        enhancers = enhancer_deltas(rows, latency_rows, metric_info=metric_info,
                                    missing=missing)
        if enhancers:
            (out / "enhancers.json").write_text(json.dumps(enhancers, indent=2, default=str))
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
                   f"{html.escape(', '.join(store_swap['targets']))}")
    page.add(f"<h1>{heading}</h1><p>{plural(len(rows), 'cell')} ({done} done, "
             f"{failed_count} failed) in <code>{html.escape(str(out))}</code>"
             f"{'' if keys is None else _SCOPE_NOTE}.</p>")
    page.add(*_preset_banners(runs, spec))
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
    if store_swap and len(store_swap["comparisons"]) > 1:
        page.add(*swap_table_section(page, store_swap, analysis))
    elif store_swap:
        page.add(*_swap_section(store_swap, analysis))
    if enhancers:
        page.add(*enhancer_section(enhancers))
    if analysis.ablations:
        page.add(*_ablation_section(page, analysis, plots))
    if analysis.trajectories and kind == "trajectory":
        page.add(*_trajectory_section(page, analysis, plots, strips))
    page.add(*_metrics_section(page, analysis, plots))
    page.add(*_recommendation_section(analysis))
    page.add(*_latency_section(page, analysis, plots))
    page.add(*_per_step_section(analysis))
    if analysis.trajectories and kind != "trajectory":
        page.add(*_trajectory_section(page, analysis, plots, strips))
    if exit_meta:
        page.add(*_exit_section(exit_meta, exits))
    page.add(*_probe_section(page, analysis, plots))
    page.add(*_image_section(page, grids))
    page.add("<h2>Methods</h2>", _statistics_note(analysis))
    page.add(*_coverage_table(analysis, rows, cell_metrics))
    return write_page(page, out)
