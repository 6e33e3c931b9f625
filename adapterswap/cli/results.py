"""The commands that work on finished runs: ``report`` (rebuild the report from a store),
``compare`` (the fidelity cost of an approximation) and ``merge`` (the shards of a distributed
sweep).
"""

from __future__ import annotations

import json
import math
from typing import Any

import click

from adapterswap.cli.common import parse_metric_options


@click.command("merge", epilog="Examples:\n\n\b\n  adapterswap merge runs/big-study")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def merge_command(directory: str) -> None:
    """Merge the per-rank store shards of a distributed sweep into DIR/results.sqlite (every
    cell exactly once) and rebuild the report."""
    from adapterswap.sweep.distributed import merge
    from adapterswap.sweep.report import build_report

    counts = merge(directory)
    report = build_report(directory)
    click.echo(f"merged {counts['shards']} shards ({counts['cells_added']} new cells); "
               f"report: {report}")


@click.command("compare", epilog="""Examples:

\b
  adapterswap sweep --backbone flux-dev --ref face.jpg --out runs/exact
  adapterswap sweep --backbone flux-dev --ref face.jpg --cache threshold:0.1 --out runs/cache
  adapterswap compare runs/exact runs/cache --json cache-cost.json
""")
@click.argument("exact", type=click.Path())
@click.argument("approx", type=click.Path())
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the comparison as JSON here.")
@click.option("--no-lpips", is_flag=True, help="Pixel PSNR and metric deltas only.")
@click.option("--metric-option", "metric_options", multiple=True, metavar="lpips.KEY=VALUE",
              help="Options of the LPIPS metric, e.g. lpips.resolution=256.")
@click.option("--device", default=None, help="Device for LPIPS.")
@click.option("--all-runs", is_flag=True,
              help="Pair every cell of both stores (default: each store's newest run's spec).")
def compare_command(exact: str, approx: str, json_out: str | None, no_lpips: bool,
                    metric_options: tuple[str, ...], device: str | None,
                    all_runs: bool) -> None:
    """The fidelity cost of an approximation on the same inputs: pair the cells of an exact
    run and an approximate one (--fp8, --cache, ...) and report PSNR and LPIPS between each
    pair, the paired change of every metric (95% CI) and the latency of both."""
    from pathlib import Path

    from adapterswap.sweep.compare import compare_runs, format_comparison

    options = parse_metric_options(metric_options)
    unknown = set(options) - {"lpips"}
    if unknown:
        from adapterswap.errors import InvalidArgumentError

        raise InvalidArgumentError("--metric-option", sorted(unknown)[0],
                                   "compare only takes options of the lpips metric")
    result = compare_runs(exact, approx, lpips=not no_lpips,
                          lpips_options=options.get("lpips", {}), device=device,
                          all_runs=all_runs)
    click.echo(format_comparison(result))
    if json_out:
        def clean(value: Any) -> Any:  # JSON has no infinity: identical images give null
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        Path(json_out).write_text(json.dumps(clean(result), indent=2))
        click.echo(f"written: {json_out}")


@click.command("report", epilog="Examples:\n\n\b\n  adapterswap report runs/sdxl-tiny")
@click.argument("directory", type=click.Path())
@click.option("--fraction", default=None, type=float,
              help="Deprecated and ignored: the effective regime is now the fewest steps "
                   "within --margin of the largest step count (paired).")
@click.option("--margin", default=None, type=float,
              help="Margin of the effective regime in metric units (default: the metric's "
                   "seed-to-seed noise at the largest step count).")
@click.option("--missing", default="drop", show_default=True,
              type=click.Choice(["drop", "worst"]),
              help="Images a metric could not score (no face found): drop them (the share "
                   "scored is shown beside every mean) or score them as the metric's worst "
                   "value to bound the bias.")
@click.option("--latency-budget", default=None, type=float,
              help="Seconds per image the recommendation must fit.")
@click.option("--all-runs", is_flag=True,
              help="Every cell the store holds, from every run (default: the cells of the "
                   "newest run's spec).")
def report_command(directory: str, fraction: float | None, latency_budget: float | None,
                   all_runs: bool, margin: float | None, missing: str) -> None:
    """Rebuild report.html, plots, results.csv and analysis.json from a run's store."""
    from adapterswap.errors import InvalidArgumentError
    from adapterswap.sweep.report import build_report

    if fraction is not None and not 0 < fraction <= 1:
        raise InvalidArgumentError("--fraction", fraction, "must be in (0, 1]")
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise InvalidArgumentError("--margin", margin, "must be a finite number >= 0")
    if latency_budget is not None and not (math.isfinite(latency_budget)
                                           and latency_budget > 0):
        raise InvalidArgumentError("--latency-budget", latency_budget,
                                   "must be a number of seconds > 0")
    report = build_report(directory, fraction=fraction, latency_budget=latency_budget,
                          all_runs=all_runs, margin=margin, missing=missing)
    click.echo(f"report: {report}")
