"""Running a sweep spec from the command line and telling the user how it went: validation
and weight checks before the store is created, the progress bar, the distributed and
probe-guided-exit paths, the dry run, and the summary (warnings, time accounting, failure
reasons, exit code 1 when a cell failed).
"""

from __future__ import annotations

from typing import Any

import click

#: Counts and times of a sweep's summary that add up over the passes of probe-guided exit.
_SUMMED = ("done", "failed", "total", "skipped", "seconds", "forward_seconds",
           "forward_span_seconds", "forwards", "shared_first_steps", "finish_seconds",
           "decode_seconds", "load_seconds", "latency_seconds")


def run_spec(spec: Any, *, ray: dict[str, Any] | None = None) -> Any:
    """Validate, run with a progress bar, rebuild the report; return (summary, report path).
    With ``spec.probe_exit`` set, run the probe-guided exit (two passes) instead; with ``ray``
    (``address``, ``workers``), run on a Ray cluster."""
    from adapterswap.sweep.distributed import dist_env
    from adapterswap.sweep.report import build_report

    threshold = getattr(spec, "_probe_exit", None)
    if ray is not None:
        from adapterswap.errors import UsageError

        if threshold is not None or dist_env() is not None:
            raise UsageError("--backend ray runs its own workers: start it without torchrun "
                             "and without --probe-exit")
        return _execute(spec, ray=ray), build_report(spec.out)
    if dist_env() is not None:
        if threshold is not None:
            from adapterswap.errors import UsageError

            raise UsageError("--probe-exit runs on one process; start it without torchrun")
        return _execute_distributed(spec)
    if threshold is None:
        summary = _execute(spec)
    else:
        from adapterswap.sweep.exit import run_probe_exit

        runs = run_probe_exit(spec, threshold, run=_execute)["runs"]
        summary = runs[0]
        for extra in runs[1:]:
            for name in _SUMMED:
                setattr(summary, name, getattr(summary, name) + getattr(extra, name))
            for flag, count in extra.confounds.items():
                summary.confounds[flag] = summary.confounds.get(flag, 0) + count
    return summary, build_report(spec.out)


def _execute_distributed(spec: Any) -> Any:
    """One rank of a torchrun job (:func:`adapterswap.sweep.distributed.run_distributed`):
    returns (summary of the whole job on rank 0, report)."""
    from adapterswap.sweep.distributed import run_distributed

    return run_distributed(spec, echo=lambda message: click.echo(message, err=True))


def _execute(spec: Any, ray: dict[str, Any] | None = None) -> Any:
    """Validate and run one spec with a progress bar; return its summary. With ``ray``
    (``address``, ``workers``), the cells run on Ray's workers
    (:class:`~adapterswap.sweep.ray_backend.RaySweep`) and this process stores them."""
    from rich.console import Console

    from adapterswap.errors import WeightsNotFoundError
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.store import RunStore

    spec.validate()
    check_weights(spec)  # the store is created only once the sweep can start
    console = Console(stderr=True)
    for note in spec.defaults_used:
        console.print(f"note: {note}")
    total = len(spec.cells())
    with _progress(console) as progress:
        task = progress.add_task("cells", total=total, completed=0)

        def log(message: str) -> None:
            progress.console.print(f"[yellow]{message}")

        def on_cell(cell: Any, status: str) -> None:
            progress.update(task, advance=1, description=f"{cell.backbone} {cell.steps} steps")

        try:
            if ray is not None:
                from adapterswap.sweep.ray_backend import RaySweep

                summary = RaySweep(spec, **ray, echo=log, on_cell=on_cell).run()
            else:
                with RunStore(spec.out) as store:
                    summary = SweepEngine(spec, store, log=log, on_cell=on_cell).run()
        except WeightsNotFoundError as exc:
            raise _try_tiny(exc, spec) from None
        progress.update(task, completed=total)
    return summary


def _progress(console: Any) -> Any:
    """The sweep's progress bar: cells done of all, time remaining."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def _try_tiny(exc: Exception, spec: Any) -> Exception:
    """A missing-weights error with the command that tries the tool without weights."""
    from adapterswap.errors import WeightsNotFoundError

    return WeightsNotFoundError(f"{exc} To try the tool without weights: adapterswap sweep "
                                f"--backbone {spec.backbones[0]} --preset tiny")


def check_weights(spec: Any) -> None:
    """Every backbone's weights findable without the network (local folder complete, or in
    the HF cache when offline), and what each adapter needs for the references
    (:meth:`Adapter.check_references <adapterswap.adapter.Adapter.check_references>`), before
    the store is created or a model loads."""
    from adapterswap.devices import default_device
    from adapterswap.errors import WeightsNotFoundError
    from adapterswap.fastpath.flash import check_attention
    from adapterswap.plugins import get_backbone
    from adapterswap.sweep.models import ModelFactory

    # the device the models will run on: the tiny preset stays on the CPU unless told
    device = spec.device or ("cpu" if spec.preset == "tiny" else default_device())
    check_attention(spec.attention, device)
    for name in spec.backbones:  # options that cannot run there (a memory budget off CUDA,
        # or with the fast path's switches)
        check_device = getattr(get_backbone(name), "check_run_device", None)
        if check_device is not None:
            check_device(spec.options_for(name), device, fast=spec.fast_path(device))
    try:
        models = ModelFactory.from_spec(spec)
        models.check_weights(spec.backbones)
    except WeightsNotFoundError as exc:
        raise _try_tiny(exc, spec) from None
    if not spec.preset:  # what the references need of each adapter (e.g. face models)
        from adapterswap.plugins import get_backbone

        names = {spec.adapter_for(get_backbone(b)) for b in spec.backbones} - {None}
        for name in sorted(names):
            models.adapter(name).check_references(list(spec.references))


def print_dry_run(spec: Any) -> None:
    """Print what a spec would run (after validation)."""
    spec.validate()
    cells = spec.cells()
    for note in spec.defaults_used:
        click.echo(f"note: {note}", err=True)
    steps = sorted({c.steps for c in cells})
    click.echo(f"{len(cells)} cells: backbones {', '.join(spec.backbones)}; "
               f"adapter settings {len({c.setting() for c in cells})}; "
               f"{len(spec.references) or 0} reference(s) x {len(spec.prompts)} prompt(s) x "
               f"{len(spec.seeds)} seed(s); steps {','.join(map(str, steps))}; "
               f"metrics {', '.join(spec.metrics) or '-'}; out {spec.out}")


#: What each confound flag means for the figures, and what to do about it.
CONFOUND_ADVICE = {
    "schedule_starts_far_from_noise": (
        "cell(s) ran a schedule whose first step assumes a mostly denoised input while it "
        "gets pure noise (leading timestep spacing at low step counts: at 1 step it runs "
        "t=1); their low-step figures measure the schedule, not the adapter. Re-run base "
        "backbones with --backbone-option timestep_spacing=trailing"),
    "window_never_opens": (
        "cell(s) have an adapter window that never opens at their step count: they are "
        "adapter-off cells under an adapter label, and the analysis counts them as such"),
}


def confound_warnings(counts: dict[str, int]) -> list[str]:
    """One line per confound flag seen in a sweep."""
    return [f"{count} {CONFOUND_ADVICE.get(flag, f'cell(s) flagged {flag}')} "
            f"(flag {flag!r} in the store and the report)"
            for flag, count in sorted(counts.items()) if count]


def time_accounting(summary: Any) -> str:
    """Where a sweep's wall time went, in parts that add up to it: loading, latency timing,
    denoiser forwards, finishing (when inline; beside the forwards it is shown apart) and
    the rest."""
    shared = f", {summary.shared_first_steps} first steps shared" \
        if summary.shared_first_steps else ""
    finishing = f"decoding, scoring, storing {summary.finish_seconds:.1f} s"
    shown = [round(summary.load_seconds, 1), round(summary.latency_seconds, 1),
             round(summary.forward_seconds, 1)]
    if not summary.finish_overlapped:
        shown.append(round(summary.finish_seconds, 1))
    # "other" is what is left of the total as printed, so the printed parts add up to it
    other = round(round(summary.seconds, 1) - sum(shown), 1) + 0.0  # no "-0.0"
    parts = [f"loading models and metrics {shown[0]:.1f} s", f"latency timing {shown[1]:.1f} s",
             f"{summary.forwards} denoiser forwards {shown[2]:.1f} s{shared}"]
    if not summary.finish_overlapped:
        parts.append(finishing)
    parts.append(f"other {other:.1f} s")
    text = " + ".join(parts)
    if summary.finish_overlapped:
        text += f"; {finishing} on a background thread, beside the forwards"
    return text


def print_summary(summary: Any, report: Any) -> None:
    """The end of a sweep: unavailable metrics and confounds as warnings, one line of counts,
    time and paths, and the failure reasons (then exit code 1) when a cell failed."""
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return
    for metric, reason in sorted(summary.unavailable_metrics.items()):
        click.echo(f"warning: metric {metric!r} unavailable: {reason}", err=True)
    for line in confound_warnings(summary.confounds):
        click.echo(f"warning: {line}", err=True)
    click.echo(f"{summary.done} cells done, {summary.skipped} already finished, "
               f"{summary.failed} failed, in {summary.seconds:.1f} s "
               f"({time_accounting(summary)}). Results: {report.parent} (report: {report})")
    if summary.failed:
        for line in failure_reasons(report.parent):
            click.echo(f"error: {line}", err=True)
        raise SystemExit(1)


def failure_reasons(out: Any) -> list[str]:
    """One line per distinct reason the newest invocation's cells failed, with its count
    (the reasons are in the store; the terminal shows them too)."""
    from collections import Counter

    from adapterswap.sweep.store import RunStore

    with RunStore(out, lock=False) as store:
        keys = store.current_keys()
        rows = store.rows(sorted(keys) if keys is not None else None)
    reasons = Counter(row["error"] or "no reason recorded" for row in rows
                      if row["status"] == "failed")
    return [f"{count} cell(s) failed: {reason}" for reason, count in reasons.most_common()]
