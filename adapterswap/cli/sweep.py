"""The commands that run sweeps: ``sweep``, ``trajectory``, ``ablate`` and ``swap``, with the
options they share (:func:`common_sweep_options`) and their translation into a
:class:`~adapterswap.sweep.spec.SweepSpec` (:func:`spec_flags`). Running the spec and the
summary are in :mod:`adapterswap.cli.execution`.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import click

from adapterswap.cli.common import (
    parse_backbone_options,
    parse_metric_options,
    parse_options,
    warn_plugin_failures,
)
from adapterswap.cli.execution import check_weights, print_dry_run, print_summary, run_spec
from adapterswap.fastpath import ATTENTION_CHOICES
from adapterswap.sweep.images_io import IMAGE_FORMATS


def common_sweep_options(func: Any) -> Any:
    """Options shared by ``sweep``, ``trajectory``, ``ablate`` and ``swap``."""
    options = [
        click.option("--ref", "references", multiple=True,
                     help="Reference image, or an embedding .npy for adapters that take one "
                          "(repeatable). Default with --preset tiny: synthetic."),
        click.option("--prompt", "prompts", multiple=True, help="Prompt (repeatable)."),
        click.option("--prompts", "prompts_file", default=None,
                     help="File with one prompt per line."),
        click.option("--seeds", default=None, help="Comma-separated seeds, e.g. 0,1,2,3."),
        click.option("--scale", default=None, type=float, help="Adapter conditioning scale."),
        click.option("--start", default=None, type=float, help="Adapter window start (0-1)."),
        click.option("--end", default=None, type=float, help="Adapter window end (0-1)."),
        click.option("--enhancer", "enhancers", multiple=True, metavar="NAME[:k=v,...]",
                     help="Enhancer acting on the adapter's steps (repeatable; 'none' "
                          "included), e.g. --enhancer none --enhancer dcg:a=1.5,b=3 "
                          "(see `adapterswap list enhancers`)."),
        click.option("--height", default=None, type=int),
        click.option("--width", default=None, type=int),
        click.option("--guidance-scale", default=None, type=float),
        click.option("--metrics", default=None,
                     help="Comma-separated metric names (default: by adapter kind)."),
        click.option("--out", default=None, help="Output directory (default runs/<name>)."),
        click.option("--preset", type=click.Choice(["tiny", "random"]), default=None,
                     help="tiny: tiny random-initialised models on CPU; random: random weights "
                          "at the published sizes (real latency, no download); no weights "
                          "needed for either."),
        click.option("--device", default=None),
        click.option("--dtype", default=None, help="bf16, fp16 or fp32."),
        click.option("--source", "sources", multiple=True, metavar="BACKBONE=PATH",
                     help="Weights for a backbone (repeatable)."),
        click.option("--adapter-source", default=None, help="Adapter weights."),
        click.option("--adapter-option", "adapter_options", multiple=True, metavar="KEY=VALUE"),
        click.option("--backbone-option", "backbone_options", multiple=True,
                     metavar="KEY=VALUE",
                     help="Backbone option for every backbone of the sweep (repeatable), e.g. "
                          "timestep_spacing=trailing (base UNet backbones: start low step "
                          "counts from pure noise); BACKBONE.KEY=VALUE for one backbone."),
        click.option("--metric-option", "metric_options", multiple=True,
                     metavar="METRIC.KEY=VALUE",
                     help="Option of one metric (repeatable), e.g. identity.recognizer=ir-se50."),
        click.option("--timing-repeats", default=None, type=int,
                     help="Timed single-image runs per latency configuration, after a warm-up "
                          "(default 5; median and IQR stored; 0: no latency)."),
        click.option("--timing-budget", "timing_budget_s", default=None, type=float,
                     help="Seconds latency timing may take per adapter setting before it times "
                          "two step counts and fits fixed + per-step time (default 60)."),
        click.option("--max-batch", default=None, type=int,
                     help="Most samples per denoiser forward (default 16)."),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile denoiser, adapter and VAE decoder (default: on with a "
                          "GPU when a backbone's cells plan enough work to repay it: FLUX ~470 "
                          "image-steps, SD1.5 ~3000 forwards, SDXL ~3700; each batch shape "
                          "compiles once)."),
        click.option("--attention", default=None,
                     type=click.Choice(ATTENTION_CHOICES),
                     help="SDPA kernel preference (default auto: cuDNN first on Hopper); fa3: "
                          "FlashAttention-3 (Hopper, pip install fa3-fwd); fa3-fp8: its "
                          "float8 kernel (approximation; cells keyed apart)."),
        click.option("--fp8", is_flag=True, default=None,
                     help="float8 linear layers (approximation, Hopper+; cells keyed apart)."),
        click.option("--cache", default=None, metavar="POLICY",
                     help="Block cache, threshold:T or interval:N (approximation, FLUX only; "
                          "cells keyed apart)."),
        click.option("--overlap/--no-overlap", default=None,
                     help="Finish cells (images, metrics, store) on a background thread while "
                          "the next forwards run (default: on with a GPU)."),
        click.option("--image-format", type=click.Choice(list(IMAGE_FORMATS)),
                     default=None,
                     help="How cell images are written: png (default, lossless), webp "
                          "(lossless, smaller and faster) or jpeg (quality 95, lossy; metrics "
                          "score the image in memory, not the file)."),
        click.option("--dry-run", is_flag=True,
                     help="Validate the spec and print what would run; run nothing."),
        click.option("--config", "config", default=None, type=click.Path(),
                     help="TOML sweep spec; flags override it."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def preset_suffix(preset: str | None) -> str:
    """What a preset adds to a default output directory's name (``-tiny``, ``-random``), so
    that runs of random weights never land beside runs of real ones."""
    return f"-{preset}" if preset else ""


def spec_flags(references: tuple[str, ...], prompts: tuple[str, ...], prompts_file: str | None,
                seeds: str | None, scale: float | None, start: float | None, end: float | None,
                height: int | None, width: int | None, guidance_scale: float | None,
                metrics: str | None, out: str | None, preset: str | None, device: str | None,
                dtype: str | None, sources: tuple[str, ...], adapter_source: str | None,
                adapter_options: tuple[str, ...], max_batch: int | None,
                metric_options: tuple[str, ...] = (), dry_run: bool = False,
                compile_: bool | None = None, attention: str | None = None,
                fp8: bool | None = None, overlap: bool | None = None,
                cache: str | None = None,
                backbone_options: tuple[str, ...] = (), timing_repeats: int | None = None,
                timing_budget_s: float | None = None,
                enhancers: tuple[str, ...] = (),
                image_format: str | None = None) -> dict[str, Any]:
    from adapterswap.sweep.spec import parse_int_list, read_prompts_file

    prompt_list = list(prompts)
    if prompts_file:
        prompt_list += read_prompts_file(prompts_file)
    source_map = {}
    for pair in sources:
        name, sep, path = pair.partition("=")
        if not sep:
            from adapterswap.errors import InvalidArgumentError

            raise InvalidArgumentError("--source", pair, "expected BACKBONE=PATH")
        source_map[name] = path
    return {
        "references": list(references) or None, "prompts": prompt_list or None,
        "seeds": parse_int_list("--seeds", seeds), "scale": scale, "start": start, "end": end,
        "height": height, "width": width, "guidance_scale": guidance_scale,
        "metrics": [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None,
        "out": out, "preset": preset, "device": device, "dtype": dtype,
        "sources": source_map or None, "adapter_source": adapter_source,
        "adapter_options": parse_options(adapter_options, "--adapter-option") or None,
        "backbone_options": parse_backbone_options(backbone_options) or None,
        "timing_repeats": timing_repeats, "timing_budget_s": timing_budget_s,
        "metric_options": parse_metric_options(metric_options) or None,
        "max_batch": max_batch,
        "compile": compile_, "attention": attention, "fp8": True if fp8 else None,
        "overlap": overlap, "cache": cache, "enhancers": list(enhancers) or None,
        "image_format": image_format,
    }


@click.command("sweep", epilog="""Examples:

\b
  adapterswap sweep --backbone sdxl --preset tiny
  adapterswap sweep --backbone sdxl --ref style.png --prompt "a cat" --seeds 0,1,2,3
  adapterswap sweep --backbone flux-dev --backbone flux-schnell --ref face.jpg \\
      --prompts prompts.txt --steps 1,2,4,8,16,28 --out runs/flux
  adapterswap sweep --config sweep.toml --seeds 0,1
  adapterswap sweep --backbone flux-dev --ref face.jpg --cache threshold:0.1 \\
      --out runs/flux-cache
  adapterswap sweep --config sweep.toml --backend ray --address auto
""")
@click.option("--backbone", "backbones", multiple=True, help="Backbone (repeatable).")
@click.option("--adapter", default=None,
              help="Adapter name or 'none' (default: the family's built-in adapter).")
@click.option("--steps", default=None, help="Step grid, e.g. 1,2,4,8,16,28 (default: the "
                                            "backbone's own grid).")
@click.option("--sequential", is_flag=True,
              help="Run each step count on its own instead of step-parallel batches.")
@click.option("--trajectory", is_flag=True,
              help="Also decode and score the predicted clean image at every step.")
@click.option("--scales", default=None, help="Ablation: adapter scale grid, e.g. 0,0.5,1.")
@click.option("--windows", default=None,
              help="Ablation: adapter windows START-END, e.g. 0-1,0-0.25,0-0.5.")
@click.option("--adapter-off", is_flag=True,
              help="Ablation: also run every cell with the adapter detached.")
@click.option("--probes", is_flag=True,
              help="Record attention-stream norm probes per step and block.")
@click.option("--probe-exit", default=None, type=float, metavar="THRESHOLD",
              help="Probe-guided exit: end the adapter's window where its relative "
                   "contribution falls below THRESHOLD, re-run, and compare.")
@click.option("--launcher", type=click.Choice(["torchrun"]), default=None,
              help="Start the sweep on several processes with torchrun (one per GPU).")
@click.option("--backend", type=click.Choice(["ray"]), default=None,
              help="Run the sweep on a Ray cluster: one actor per GPU, groups handed out "
                   "as they free up, every cell into the one store (needs Ray: "
                   "pip install 'ray>=2.40').")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="Ray cluster to join with --backend ray ('auto': the one this machine "
                   "joined with `ray start`; default: that one, else a new local Ray).")
@click.option("--nproc", default=None, type=int,
              help="Processes for --launcher torchrun, or actors for --backend ray (default: "
                   "the number of GPUs, else 2).")
@common_sweep_options
def sweep_command(backbones: tuple[str, ...], adapter: str | None, steps: str | None,
                  sequential: bool, trajectory: bool, scales: str | None,
                  windows: str | None, adapter_off: bool, probes: bool,
                  probe_exit: float | None, launcher: str | None, backend: str | None,
                  address: str | None, nproc: int | None,
                  config: str | None, **flags: Any) -> None:
    """Run a step sweep (backbones x references x prompts x seeds x steps), score every cell,
    and write results.sqlite, results.csv and report.html. Re-running resumes.

    On several GPUs: torchrun --nproc-per-node N -m adapterswap sweep ... (or --launcher
    torchrun): each rank takes groups from a shared queue into its shard; rank 0 merges and
    reports.
    On a Ray cluster: --backend ray [--address auto]."""
    ray = _ray_options(backend, address, nproc, launcher)
    if launcher == "torchrun":
        _relaunch_with_torchrun(nproc)
    _run_sweep_command("sweep", backbones, adapter, steps, config, flags, {
        "step_parallel": False if sequential else None,
        "trajectory": True if trajectory else None,
        "adapter_off": True if adapter_off else None,
        "probes": True if probes else None,
    }, scales, windows, probe_exit=probe_exit, ray=ray)


def _ray_options(backend: str | None, address: str | None, nproc: int | None,
                 launcher: str | None) -> dict[str, Any] | None:
    """What ``--backend ray`` runs with (``None``: not on Ray); checked before any work, with
    one line when Ray is not installed."""
    from adapterswap.errors import InvalidArgumentError

    if backend != "ray":
        if address is not None:
            raise InvalidArgumentError("--address", address, "only with --backend ray")
        return None
    if launcher is not None:
        raise InvalidArgumentError("--backend", backend, "is not combined with --launcher")
    if nproc is not None and nproc < 1:
        raise InvalidArgumentError("--nproc", nproc, "must be >= 1")
    from adapterswap.sweep.ray_backend import require_ray

    require_ray()
    return {"address": address, "workers": nproc}


def _relaunch_with_torchrun(nproc: int | None) -> None:
    """Re-run this command under torchrun (without --launcher/--nproc) and exit with its
    status."""
    import os
    import subprocess

    from adapterswap.errors import InvalidArgumentError

    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() or 2
    if nproc < 1:
        raise InvalidArgumentError("--nproc", nproc, "must be >= 1")
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--launcher", "--nproc"):
            skip = True
            continue
        if arg.startswith(("--launcher=", "--nproc=")):
            continue
        args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "adapterswap", *args]
    raise SystemExit(subprocess.call(command, env=dict(os.environ)))


def _run_sweep_command(kind: str, backbones: tuple[str, ...], adapter: str | None,
                       steps: str | None, config: str | None, flags: dict[str, Any],
                       extra: dict[str, Any], scales: str | None = None,
                       windows: str | None = None, probe_exit: float | None = None,
                       ray: dict[str, Any] | None = None) -> None:
    from adapterswap.sweep.spec import (
        SweepSpec,
        parse_float_list,
        parse_int_list,
        parse_windows,
    )

    warn_plugin_failures()
    dry_run = flags.pop("dry_run", False)
    values = spec_flags(**flags)
    values.update({"backbones": list(backbones) or None, "adapter": adapter,
                   "steps": parse_int_list("--steps", steps),
                   "scales": parse_float_list("--scales", scales),
                   "windows": parse_windows("--windows", windows), **extra})
    base = SweepSpec.from_toml(config) if config else {}
    if values.get("out") is None and "out" not in base:
        names = values["backbones"] or base.get("backbones") or ["sweep"]
        suffix = "" if kind == "sweep" else f"-{kind}"
        values["out"] = f"runs/{'-'.join(names)}{suffix}{preset_suffix(values.get('preset'))}"
    spec = SweepSpec.merged(base, values)
    if probe_exit is not None and not (math.isfinite(probe_exit) and probe_exit > 0):
        from adapterswap.errors import InvalidArgumentError

        raise InvalidArgumentError("--probe-exit", probe_exit, "must be a number > 0")
    spec._probe_exit = probe_exit
    if dry_run:
        print_dry_run(spec)
        return
    summary, report = run_spec(spec, ray=ray)
    print_summary(summary, report)


@click.command("trajectory", epilog="""Examples:

\b
  adapterswap trajectory --backbone flux-dev --preset tiny
  adapterswap trajectory --backbone flux-schnell --ref face.jpg --prompt "..." --steps 4
""")
@click.option("--backbone", "backbones", multiple=True, help="Backbone (repeatable).")
@click.option("--adapter", default=None, help="Adapter name or 'none'.")
@click.option("--steps", default=None,
              help="Run length(s) (default: each backbone's default steps).")
@common_sweep_options
def trajectory_command(backbones: tuple[str, ...], adapter: str | None, steps: str | None,
                       config: str | None, **flags: Any) -> None:
    """One long run per cell; at every step the predicted clean image is decoded and scored
    (stored in the trajectory table, plotted with the effective regime marked)."""
    _run_sweep_command("trajectory", backbones, adapter, steps, config, flags, {
        "trajectory": True, "only_default_steps": None if steps else True})


@click.command("ablate", epilog="""Examples:

\b
  adapterswap ablate --backbone flux-schnell --preset tiny
  adapterswap ablate --backbone sdxl --ref style.png --scales 0.25,0.5,1 \\
      --windows 0-1,0-0.25,0-0.5,0.5-1 --seeds 0,1,2,3
""")
@click.option("--backbone", "backbones", multiple=True, help="Backbone (repeatable).")
@click.option("--adapter", default=None, help="Adapter (default: the family's built-in).")
@click.option("--steps", default=None, help="Step grid (default: the default steps only).")
@click.option("--scales", default=None, help="Adapter scale grid, e.g. 0.25,0.5,1.")
@click.option("--windows", default=None,
              help="Adapter windows START-END, e.g. 0-1,0-0.25,0-0.5,0.5-1.")
@common_sweep_options
def ablate_command(backbones: tuple[str, ...], adapter: str | None, steps: str | None,
                   scales: str | None, windows: str | None, config: str | None,
                   **flags: Any) -> None:
    """Adapter off vs on on identical inputs, over a scale grid and window grid; reports
    deltas against adapter-off with paired 95% CIs (does fidelity come from the adapter?)."""
    _run_sweep_command("ablate", backbones, adapter, steps, config, flags, {
        "adapter_off": True, "only_default_steps": None if steps else True}, scales, windows)


@click.command("swap", epilog="""Examples:

\b
  adapterswap swap --adapter infusenet --from flux-dev --to flux-schnell \\
      --ref face.jpg --prompt "a portrait of a chef" --seeds 0,1,2,3
  adapterswap swap --from sdxl --to sdxl-lightning --preset tiny
  adapterswap swap --from sdxl --to sdxl-lightning,sdxl-hyper,sdxl-dmd2,sdxl-turbo,sdxl-tcd \\
      --enhancer none --enhancer dcg --preset tiny
""")
@click.option("--adapter", default=None, help="Adapter (default: the family's built-in).")
@click.option("--from", "source", required=True, help="Backbone the adapter was trained on.")
@click.option("--to", "target", required=True,
              help="Backbone(s) to move it to, comma-separated.")
@common_sweep_options
def swap_command(adapter: str | None, source: str, target: str, config: str | None,
                 **flags: Any) -> None:
    """Run the adapter on the source and on each target at their default steps on identical
    inputs and seeds (enhancers act on the targets); report, per target and enhancer, the
    latency ratio, the denoiser forwards and each metric's paired delta with a 95% CI."""
    import json as _json

    from adapterswap.errors import InvalidArgumentError
    from adapterswap.sweep.report.words import _delta_text
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    warn_plugin_failures()
    targets = [t.strip() for t in target.split(",") if t.strip()]
    if not targets:
        raise InvalidArgumentError("--to", target, "give one or more backbones")
    for name in targets:
        if name == source or targets.count(name) > 1:
            raise InvalidArgumentError("--to", target, f"{name!r} is the source or repeated")
    dry_run = flags.pop("dry_run", False)
    values = spec_flags(**flags)
    values.update({"backbones": [source, *targets], "adapter": adapter,
                   "only_default_steps": True, "enhancer_backbones": targets})
    if values.get("out") is None:
        values["out"] = (f"runs/swap-{source}-to-{'-'.join(targets)}"
                         f"{preset_suffix(values['preset'])}")
    base = SweepSpec.from_toml(config) if config else {}
    spec = SweepSpec.merged(base, values)
    spec.validate()
    if dry_run:
        print_dry_run(spec)
        return
    check_weights(spec)  # before the store is created
    with RunStore(spec.out) as store:
        store.set_meta("swap", {"from": source, "to": targets})
    summary, report = run_spec(spec)
    swap = _json.loads((report.parent / "swap.json").read_text())
    for comparison in swap["comparisons"]:
        enhancer = comparison.get("enhancer") or "none"
        name = comparison["to"] + (f" + {enhancer}" if enhancer != "none" else "")
        lat = comparison.get("latency")
        click.echo(f"{source} -> {name}: " + (
            f"{lat['from_s']:.3f} s -> {lat['to_s']:.3f} s per image, "
            f"{lat['speedup']:.2f}x faster" if lat else "latency not measured"))
        for metric, d in comparison["metrics"].items():
            if d["mean"] is None:
                click.echo(f"  {metric}: no pairs")
                continue
            # the report's wording: as many decimals as tell the interval's ends apart
            click.echo(f"  {metric}: {d['from_mean']:.4g} -> {d['to_mean']:.4g}, delta "
                       f"{_delta_text(d)} (n={d['n']})")
    print_summary(summary, report)
