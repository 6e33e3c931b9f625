"""The ``adapterswap`` command line.

Exit codes: 0 success, 1 the work failed, 2 bad usage. Errors are one line on stderr;
``--debug`` shows the traceback. Paths that only list things never import torch.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import click

from adapterswap import __version__
from adapterswap.errors import AdapterswapError
from adapterswap.fastpath import ATTENTION_CHOICES


class AdapterswapGroup(click.Group):
    """Turns adapterswap errors into one stderr line and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except AdapterswapError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                       err=True)
            ctx.exit(1)


@click.group(cls=AdapterswapGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Examples:\n\n\b\n  adapterswap plugins\n  adapterswap list backbones\n"
                    "  adapterswap doctor")
@click.version_option(__version__, prog_name="adapterswap")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--verbose", is_flag=True,
              help="Let diffusers, transformers and huggingface_hub print their progress bars, "
                   "log messages and warnings (off by default).")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Move adapters across diffusion backbones and measure how many steps they need."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if not verbose:
        from adapterswap.quiet import silenced

        ctx.with_resource(silenced())


def _warn_plugin_failures() -> None:
    from adapterswap.plugins import plugin_failures, selection_warnings

    for line in selection_warnings():  # ADAPTERSWAP_LOAD_PLUGINS names an unknown plugin
        click.echo(f"warning: {line}", err=True)
    for failure in plugin_failures():
        click.echo(f"warning: {failure.message()}", err=True)


@main.command("plugins", epilog="Examples:\n\n\b\n  adapterswap plugins\n"
                                "  adapterswap plugins --json")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins with versions, hooks and what they register."""
    from dataclasses import asdict

    from adapterswap.plugins import plugin_failures, plugin_infos

    infos = plugin_infos()
    failures = plugin_failures()
    if as_json:
        click.echo(json.dumps({
            "plugins": [asdict(i) for i in infos],
            "failures": [{"plugin": f.plugin, "entry_point": f.entry_point,
                          "error": f"{type(f.error).__name__}: {f.error}"} for f in failures],
        }, indent=2))
        return
    for info in infos:
        version = f" {info.version}" if info.version else ""
        click.echo(f"{info.name}{version} ({info.distribution or 'not a distribution'})")
        click.echo(f"  hooks: {', '.join(info.hooks) or '-'}")
        for what in ("backbones", "adapters", "metrics"):
            names = getattr(info, what)
            if names:
                click.echo(f"  {what}: {', '.join(names)}")
    for failure in failures:
        click.echo(f"FAILED {failure.message()}")


def _backbone_rows() -> list[dict[str, Any]]:
    from adapterswap.plugins import adapters, backbones

    rows = []
    for entry in backbones().entries():
        cls = entry.cls
        rows.append({
            "name": entry.name, "family": cls.family, "plugin": entry.plugin,
            "default_source": cls.default_source, "default_steps": cls.default_steps,
            "guidance_mode": cls.guidance_mode,
            "default_guidance_scale": cls.default_guidance_scale,
            "adapters": [a.name for a in adapters().entries() if cls.family in a.cls.families],
            "description": cls.description,
        })
    return rows


def _adapter_rows() -> list[dict[str, Any]]:
    from adapterswap.plugins import adapters, backbones

    rows = []
    for entry in adapters().entries():
        cls = entry.cls
        rows.append({
            "name": entry.name, "kind": cls.kind, "families": sorted(cls.families),
            "plugin": entry.plugin, "default_source": cls.default_source,
            "default_scale": cls.default_scale,
            "backbones": [b.name for b in backbones().entries() if b.cls.family in cls.families],
            "description": cls.description,
        })
    return rows


def _metric_rows() -> list[dict[str, Any]]:
    from adapterswap.plugins import metrics

    return [{"name": e.name, "plugin": e.plugin, "needs": sorted(e.cls.needs),
             "higher_is_better": e.cls.higher_is_better, "kinds": sorted(e.cls.kinds),
             "description": e.cls.description} for e in metrics().entries()]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "-"
        return "-" if value is None or value == "" else str(value)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


LIST_COLUMNS = {
    "backbones": ["name", "family", "default_steps", "guidance_mode", "adapters", "plugin"],
    "adapters": ["name", "kind", "families", "backbones", "plugin"],
    "metrics": ["name", "needs", "higher_is_better", "plugin"],
}


@main.command("list", epilog="Examples:\n\n\b\n  adapterswap list backbones\n"
                             "  adapterswap list adapters --json")
@click.argument("what", type=click.Choice(["backbones", "adapters", "metrics"]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(what: str, as_json: bool) -> None:
    """List registered backbones, adapters or metrics, with family compatibility."""
    rows = {"backbones": _backbone_rows, "adapters": _adapter_rows,
            "metrics": _metric_rows}[what]()
    _warn_plugin_failures()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"No {what} registered. Install a plugin (see `adapterswap plugins`).")
    else:
        click.echo(_table(rows, LIST_COLUMNS[what]))


@main.command("doctor", epilog="Examples:\n\n\b\n  adapterswap doctor\n"
                               "  HF_HUB_OFFLINE=1 adapterswap doctor --json")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(as_json: bool) -> None:
    """Check the environment and whether each backbone's, adapter's and metric's weights are
    present locally (configured path or Hugging Face cache). Uses no network; weights that
    would have to be downloaded count as missing, which is reported, not an error."""
    from adapterswap.doctor import collect

    report = collect()
    _warn_plugin_failures()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    env = dict(report["environment"])
    if not env.pop("config_present", True):
        env["config"] = (f"{env['config']} (missing: no such file; each backbone and adapter "
                         "uses its default source)")
    click.echo("environment:")
    for key, value in env.items():
        click.echo(f"  {key}: {value}")
    for section in ("backbones", "adapters", "metrics"):
        click.echo(f"{section}:")
        for row in report[section]:
            click.echo(f"  {row['name']}: {row['status']}")
            if row.get("hint") and not row.get("present", True):
                click.echo(f"    {row['hint']}")




def _parse_options(pairs: tuple[str, ...], argument: str) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true, lists)."""
    from adapterswap.errors import InvalidArgumentError

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidArgumentError(argument, pair, "expected key=value")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.strip().replace("-", "_")] = value
    return options


@main.command("generate", epilog="""Examples:

\b
  adapterswap generate --preset tiny
  adapterswap generate --preset tiny --backbone sdxl
  adapterswap generate --backbone flux-schnell --adapter infusenet --ref face.jpg \\
      --prompt "a portrait of a chef" --seed 0 --out out.png
  adapterswap generate --backbone flux-dev --ref face.jpg --prompt "..." --steps 28
""")
@click.option("--backbone", default=None,
              help="Backbone name (see `adapterswap list backbones`); default flux-schnell "
                   "with --preset tiny.")
@click.option("--adapter", default=None,
              help="Adapter name, or 'none'. Default: the backbone family's built-in adapter.")
@click.option("--ref", "reference", default=None, help="Reference image for the adapter.")
@click.option("--prompt", default=None, help="Text prompt.")
@click.option("--seed", default=0, type=int, show_default=True)
@click.option("--steps", "num_inference_steps", default=None, type=int,
              help="Denoising steps (default: the backbone's).")
@click.option("--guidance-scale", default=None, type=float,
              help="Guidance (default: the backbone's; not allowed for guidance-free backbones).")
@click.option("--scale", default=None, type=float, help="Adapter conditioning scale.")
@click.option("--start", default=0.0, type=float, show_default=True,
              help="Fraction of the schedule where the adapter starts acting.")
@click.option("--end", default=1.0, type=float, show_default=True,
              help="Fraction of the schedule where the adapter stops acting.")
@click.option("--height", default=None, type=int)
@click.option("--width", default=None, type=int)
@click.option("--source", default=None, help="Backbone weights: Hub repo id or local directory.")
@click.option("--adapter-source", default=None, help="Adapter weights: repo id or local path.")
@click.option("--option", "backbone_options", multiple=True, metavar="KEY=VALUE",
              help="Backbone loading option (repeatable), e.g. cpu_offload=true.")
@click.option("--adapter-option", "adapter_options", multiple=True, metavar="KEY=VALUE",
              help="Adapter option (repeatable), e.g. model_version=sim_stage1.")
@click.option("--device", default=None, help="cuda, cpu, ... (default: cuda if available).")
@click.option("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA).")
@click.option("--preset", type=click.Choice(["tiny"]), default=None,
              help="tiny: tiny random-initialised models; needs no other argument.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Output image path (default: ./adapterswap-<backbone>-<adapter>-s<seed>.png).")
@click.option("--attention", default="auto",
              type=click.Choice(ATTENTION_CHOICES),
              help="SDPA kernel preference (default auto: cuDNN first on Hopper).")
@click.option("--fp8", is_flag=True, help="float8 linear layers (approximation, Hopper+).")
@click.option("--cache", default=None, metavar="POLICY",
              help="Block cache, threshold:T or interval:N (approximation, FLUX only).")
def generate_command(backbone: str | None, adapter: str | None, reference: str | None,
                     prompt: str | None, seed: int, num_inference_steps: int | None,
                     guidance_scale: float | None, scale: float | None, start: float, end: float,
                     height: int | None, width: int | None, source: str | None,
                     adapter_source: str | None, backbone_options: tuple[str, ...],
                     adapter_options: tuple[str, ...], device: str | None, dtype: str | None,
                     preset: str | None, out: str | None, attention: str = "auto",
                     fp8: bool = False, cache: str | None = None) -> None:
    """Generate one image with a backbone and (optionally) an adapter (on the fast path's
    exact switches; one image does not repay compilation, so nothing is compiled)."""
    from pathlib import Path

    from adapterswap.adapter import load_image
    from adapterswap.denoise import denoise
    from adapterswap.errors import InvalidArgumentError
    from adapterswap.plugins import get_adapter, get_backbone

    _warn_plugin_failures()
    if backbone is None:
        if preset != "tiny":
            raise InvalidArgumentError("--backbone", None, "required (or use --preset tiny)")
        backbone = "flux-schnell"
    backbone_cls = get_backbone(backbone)
    adapter_name = adapter if adapter is not None else backbone_cls.default_adapter
    if adapter_name in ("none", ""):
        adapter_name = None
    adapter_cls = get_adapter(adapter_name) if adapter_name else None
    b_opts = _parse_options(backbone_options, "--option")
    a_opts = _parse_options(adapter_options, "--adapter-option")
    tiny = preset == "tiny"
    if not tiny and prompt is None:
        raise InvalidArgumentError("--prompt", None, "required (or use --preset tiny)")
    if prompt is None:
        from adapterswap.sweep.spec import DEFAULT_PROMPTS

        prompt = DEFAULT_PROMPTS[0]
    from adapterswap.sweep import spec as checks

    # every argument checked before anything loads or is written (the sweep's own checks)
    checks.check_seed("--seed", seed)
    checks.check_device("--device", device)
    checks.check_dtype("--dtype", dtype)
    if num_inference_steps is not None:
        if num_inference_steps < 1:
            raise InvalidArgumentError("--steps", num_inference_steps, "must be an integer >= 1")
        checks.check_steps("--steps", [num_inference_steps], backbone_cls)
    checks.check_size(backbone_cls, height, width, names=("--height", "--width"),
                      default=(backbone_cls.default_height, backbone_cls.default_width))
    if out is None:
        out = f"adapterswap-{backbone_cls.name}-{adapter_name or 'none'}-s{seed}.png"
    checks.check_output_file("--out", out)
    from adapterswap.sweep.models import ModelFactory

    models = ModelFactory(preset=preset, device=device, dtype=dtype,
                          sources={backbone: source}, backbone_options={backbone: b_opts},
                          adapter_source=adapter_source,
                          adapter_kwargs={"scale": scale, "start": start, "end": end, **a_opts})
    image: Any = None
    if adapter_cls is not None:
        if reference is not None:
            load_image(reference, argument="--ref")  # readable? (fails before loading models)
            image = reference  # the path, so that adapters' errors name the file
        elif tiny:
            image = models.reference_image("synthetic:0", adapter_cls.name)
        else:
            raise InvalidArgumentError("--ref", None,
                                       f"adapter {adapter_cls.name!r} needs a reference image")
        adapter_cls(scale=scale, start=start, end=end).check_backbone(backbone_cls)
    models.check_weights([backbone])  # a missing or incomplete folder, before loading
    # diffusers' name, as the backbone's own refusal at run time
    checks.check_guidance("guidance_scale", guidance_scale, backbone_cls)
    ad = None
    if adapter_cls is not None and not tiny:
        # validate the adapter's settings and family before loading anything heavy
        ad = models.adapter(adapter_cls.name)
        ad.check_backbone(backbone_cls)
    loaded = models.backbone(backbone)
    if adapter_cls is not None and ad is None:
        ad = models.adapter(adapter_cls.name, loaded)  # tiny weights that fit the backbone
    from adapterswap.fastpath import FastPath

    if ad is not None:
        ad.attach(loaded)
    loaded.enable_fast_path(FastPath(attention=attention, fp8=fp8, cache=cache),
                            adapters=[ad] if ad is not None else [])
    result = denoise(loaded, prompt, num_inference_steps=num_inference_steps, seeds=[seed],
                     height=height, width=width, guidance_scale=guidance_scale, adapter=ad,
                     reference=image)
    path = Path(out).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        result.images[0].save(path)
    except OSError as exc:  # checked before loading; the disk may still fill up
        from adapterswap.errors import StoreWriteError

        raise StoreWriteError(f"could not write the image {str(path)!r}: "
                              f"{exc.strerror or exc}") from None
    t = result.timings
    click.echo(f"wrote {path} ({backbone_cls.name}"
               f"{' + ' + adapter_name if adapter_name else ''}, seed {seed}; "
               f"total {t['total_s']:.2f} s, denoising {t['denoise_s']:.2f} s)")


def _common_sweep_options(func: Any) -> Any:
    """Options shared by ``sweep`` and ``swap``."""
    options = [
        click.option("--ref", "references", multiple=True,
                     help="Reference image (repeatable). Default with --preset tiny: synthetic."),
        click.option("--prompt", "prompts", multiple=True, help="Prompt (repeatable)."),
        click.option("--prompts", "prompts_file", default=None,
                     help="File with one prompt per line."),
        click.option("--seeds", default=None, help="Comma-separated seeds, e.g. 0,1,2,3."),
        click.option("--scale", default=None, type=float, help="Adapter conditioning scale."),
        click.option("--start", default=None, type=float, help="Adapter window start (0-1)."),
        click.option("--end", default=None, type=float, help="Adapter window end (0-1)."),
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
                     help="SDPA kernel preference (default auto: cuDNN first on Hopper)."),
        click.option("--fp8", is_flag=True, default=None,
                     help="float8 linear layers (approximation, Hopper+; cells keyed apart)."),
        click.option("--cache", default=None, metavar="POLICY",
                     help="Block cache, threshold:T or interval:N (approximation, FLUX only; "
                          "cells keyed apart)."),
        click.option("--overlap/--no-overlap", default=None,
                     help="Finish cells (images, metrics, store) on a background thread while "
                          "the next forwards run (default: on with a GPU)."),
        click.option("--dry-run", is_flag=True,
                     help="Validate the spec and print what would run; run nothing."),
        click.option("--config", "config", default=None, type=click.Path(),
                     help="TOML sweep spec; flags override it."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _spec_flags(references: tuple[str, ...], prompts: tuple[str, ...], prompts_file: str | None,
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
                timing_budget_s: float | None = None) -> dict[str, Any]:
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
        "adapter_options": _parse_options(adapter_options, "--adapter-option") or None,
        "backbone_options": _backbone_options(backbone_options) or None,
        "timing_repeats": timing_repeats, "timing_budget_s": timing_budget_s,
        "metric_options": _metric_options(metric_options) or None,
        "max_batch": max_batch,
        "compile": compile_, "attention": attention, "fp8": True if fp8 else None,
        "overlap": overlap, "cache": cache,
    }


def _backbone_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``timestep_spacing=trailing`` (every backbone) or ``sd15.timestep_spacing=trailing``
    (one backbone's table)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key = pair.partition("=")[0]
        name, dot, _ = key.partition(".")
        if dot:
            options.setdefault(name.strip(), {}).update(
                _parse_options((pair[len(name) + 1:],), "--backbone-option"))
        else:
            options.update(_parse_options((pair,), "--backbone-option"))
    return options


def _metric_options(pairs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``identity.recognizer=ir-se50`` -> ``{"identity": {"recognizer": "ir-se50"}}``."""
    from adapterswap.errors import InvalidArgumentError

    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, dot, rest = pair.partition(".")
        if not dot or "=" not in rest or not name:
            raise InvalidArgumentError("--metric-option", pair, "expected METRIC.KEY=VALUE")
        options.setdefault(name, {}).update(_parse_options((rest,), "--metric-option"))
    return options


def _run_spec(spec: Any) -> Any:
    """Validate, run with a progress bar, rebuild the report; return (summary, report path).
    With ``spec.probe_exit`` set, run the probe-guided exit (two passes) instead."""
    from adapterswap.sweep.distributed import dist_env
    from adapterswap.sweep.report import build_report

    threshold = getattr(spec, "_probe_exit", None)
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
            summary.done += extra.done
            summary.failed += extra.failed
            summary.total += extra.total
            summary.skipped += extra.skipped
            summary.seconds += extra.seconds
            summary.forward_seconds += extra.forward_seconds
            summary.forward_span_seconds += extra.forward_span_seconds
            summary.forwards += extra.forwards
            summary.shared_first_steps += extra.shared_first_steps
            summary.finish_seconds += extra.finish_seconds
            summary.decode_seconds += extra.decode_seconds
            summary.load_seconds += extra.load_seconds
            summary.latency_seconds += extra.latency_seconds
            for flag, count in extra.confounds.items():
                summary.confounds[flag] = summary.confounds.get(flag, 0) + count
    return summary, build_report(spec.out)


def _execute_distributed(spec: Any) -> Any:
    """One rank of a torchrun job (:func:`adapterswap.sweep.distributed.run_distributed`):
    returns (summary of the whole job on rank 0, report)."""
    from adapterswap.sweep.distributed import run_distributed

    return run_distributed(spec, echo=lambda message: click.echo(message, err=True))


def _execute(spec: Any) -> Any:
    """Validate and run one spec with a progress bar; return its summary."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from adapterswap.errors import WeightsNotFoundError
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.store import RunStore

    spec.validate()
    _check_weights(spec)  # the store is created only once the sweep can start
    console = Console(stderr=True)
    for note in spec.defaults_used:
        console.print(f"note: {note}")
    with RunStore(spec.out) as store, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=console, transient=False) as progress:
        engine = SweepEngine(spec, store, log=lambda m: progress.console.print(f"[yellow]{m}"))
        total = len(spec.cells())
        task = progress.add_task("cells", total=total, completed=0)

        def on_cell(cell: Any, status: str) -> None:
            progress.update(task, advance=1, description=f"{cell.backbone} {cell.steps} steps")

        engine.on_cell = on_cell
        try:
            summary = engine.run()
        except WeightsNotFoundError as exc:
            raise _try_tiny(exc, spec) from None
        progress.update(task, completed=total)
    return summary


def _try_tiny(exc: Exception, spec: Any) -> Exception:
    """A missing-weights error with the command that tries the tool without weights."""
    from adapterswap.errors import WeightsNotFoundError

    return WeightsNotFoundError(f"{exc} To try the tool without weights: adapterswap sweep "
                                f"--backbone {spec.backbones[0]} --preset tiny")


def _check_weights(spec: Any) -> None:
    """Every backbone's weights findable without the network (local folder complete, or in
    the HF cache when offline), before the store is created or a model loads."""
    from adapterswap.errors import WeightsNotFoundError
    from adapterswap.sweep.models import ModelFactory

    try:
        ModelFactory.from_spec(spec).check_weights(spec.backbones)
    except WeightsNotFoundError as exc:
        raise _try_tiny(exc, spec) from None


@main.command("sweep", epilog="""Examples:

\b
  adapterswap sweep --backbone sdxl --preset tiny
  adapterswap sweep --backbone sdxl --ref style.png --prompt "a cat" --seeds 0,1,2,3
  adapterswap sweep --backbone flux-dev --backbone flux-schnell --ref face.jpg \\
      --prompts prompts.txt --steps 1,2,4,8,16,28 --out runs/flux
  adapterswap sweep --config sweep.toml --seeds 0,1
  adapterswap sweep --backbone flux-dev --ref face.jpg --cache threshold:0.1 \\
      --out runs/flux-cache
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
@click.option("--nproc", default=None, type=int,
              help="Processes for --launcher torchrun (default: the number of GPUs, else 2).")
@_common_sweep_options
def sweep_command(backbones: tuple[str, ...], adapter: str | None, steps: str | None,
                  sequential: bool, trajectory: bool, scales: str | None,
                  windows: str | None, adapter_off: bool, probes: bool,
                  probe_exit: float | None, launcher: str | None, nproc: int | None,
                  config: str | None, **flags: Any) -> None:
    """Run a step sweep (backbones x references x prompts x seeds x steps), score every cell,
    and write results.sqlite, results.csv and report.html. Re-running resumes.

    On several GPUs: torchrun --nproc-per-node N -m adapterswap sweep ... (or --launcher
    torchrun): each rank runs a balanced share into its shard; rank 0 merges and reports."""
    if launcher == "torchrun":
        _relaunch_with_torchrun(nproc)
    _run_sweep_command("sweep", backbones, adapter, steps, config, flags, {
        "step_parallel": False if sequential else None,
        "trajectory": True if trajectory else None,
        "adapter_off": True if adapter_off else None,
        "probes": True if probes else None,
    }, scales, windows, probe_exit=probe_exit)


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
                       windows: str | None = None, probe_exit: float | None = None) -> None:
    from adapterswap.sweep.spec import (
        SweepSpec,
        parse_float_list,
        parse_int_list,
        parse_windows,
    )

    _warn_plugin_failures()
    dry_run = flags.pop("dry_run", False)
    values = _spec_flags(**flags)
    values.update({"backbones": list(backbones) or None, "adapter": adapter,
                   "steps": parse_int_list("--steps", steps),
                   "scales": parse_float_list("--scales", scales),
                   "windows": parse_windows("--windows", windows), **extra})
    base = SweepSpec.from_toml(config) if config else {}
    if values.get("out") is None and "out" not in base:
        names = values["backbones"] or base.get("backbones") or ["sweep"]
        suffix = "" if kind == "sweep" else f"-{kind}"
        values["out"] = (f"runs/{'-'.join(names)}{suffix}"
                         f"{'-tiny' if values.get('preset') else ''}")
    spec = SweepSpec.merged(base, values)
    if probe_exit is not None and not (math.isfinite(probe_exit) and probe_exit > 0):
        from adapterswap.errors import InvalidArgumentError

        raise InvalidArgumentError("--probe-exit", probe_exit, "must be a number > 0")
    spec._probe_exit = probe_exit
    if dry_run:
        _dry_run(spec)
        return
    summary, report = _run_spec(spec)
    _print_summary(summary, report)


@main.command("trajectory", epilog="""Examples:

\b
  adapterswap trajectory --backbone flux-dev --preset tiny
  adapterswap trajectory --backbone flux-schnell --ref face.jpg --prompt "..." --steps 4
""")
@click.option("--backbone", "backbones", multiple=True, help="Backbone (repeatable).")
@click.option("--adapter", default=None, help="Adapter name or 'none'.")
@click.option("--steps", default=None,
              help="Run length(s) (default: each backbone's default steps).")
@_common_sweep_options
def trajectory_command(backbones: tuple[str, ...], adapter: str | None, steps: str | None,
                       config: str | None, **flags: Any) -> None:
    """One long run per cell; at every step the predicted clean image is decoded and scored
    (stored in the trajectory table, plotted with the effective regime marked)."""
    _run_sweep_command("trajectory", backbones, adapter, steps, config, flags, {
        "trajectory": True, "only_default_steps": None if steps else True})


@main.command("ablate", epilog="""Examples:

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
@_common_sweep_options
def ablate_command(backbones: tuple[str, ...], adapter: str | None, steps: str | None,
                   scales: str | None, windows: str | None, config: str | None,
                   **flags: Any) -> None:
    """Adapter off vs on on identical inputs, over a scale grid and window grid; reports
    deltas against adapter-off with paired 95% CIs (does fidelity come from the adapter?)."""
    _run_sweep_command("ablate", backbones, adapter, steps, config, flags, {
        "adapter_off": True, "only_default_steps": None if steps else True}, scales, windows)


def _dry_run(spec: Any) -> None:
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
        "gets pure noise (leading timestep spacing at low step counts: SD1.5's DDIM at 1 step "
        "runs t=1); their low-step figures measure the schedule, not the adapter. Re-run base "
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


def _print_summary(summary: Any, report: Any) -> None:
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


@main.command("swap", epilog="""Examples:

\b
  adapterswap swap --adapter infusenet --from flux-dev --to flux-schnell \\
      --ref face.jpg --prompt "a portrait of a chef" --seeds 0,1,2,3
  adapterswap swap --from sdxl --to sdxl-lightning --preset tiny
""")
@click.option("--adapter", default=None, help="Adapter (default: the family's built-in).")
@click.option("--from", "source", required=True, help="Backbone the adapter was trained on.")
@click.option("--to", "target", required=True, help="Backbone to move it to.")
@_common_sweep_options
def swap_command(adapter: str | None, source: str, target: str, config: str | None,
                 **flags: Any) -> None:
    """Run the adapter on two backbones at their default steps on identical inputs and seeds;
    report the latency ratio and each metric's paired delta with a 95% CI."""
    import json as _json

    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    _warn_plugin_failures()
    dry_run = flags.pop("dry_run", False)
    values = _spec_flags(**flags)
    values.update({"backbones": [source, target], "adapter": adapter,
                   "only_default_steps": True})
    if values.get("out") is None:
        values["out"] = f"runs/swap-{source}-to-{target}{'-tiny' if values['preset'] else ''}"
    base = SweepSpec.from_toml(config) if config else {}
    spec = SweepSpec.merged(base, values)
    spec.validate()
    if dry_run:
        _dry_run(spec)
        return
    _check_weights(spec)  # before the store is created
    with RunStore(spec.out) as store:
        store.set_meta("swap", {"from": source, "to": target})
    summary, report = _run_spec(spec)
    swap = _json.loads((report.parent / "swap.json").read_text())
    lat = swap.get("latency")
    if lat:
        click.echo(f"{source} -> {target}: {lat['from_s']:.3f} s -> {lat['to_s']:.3f} s per "
                   f"image, {lat['speedup']:.2f}x faster")
    for metric, d in swap["metrics"].items():
        click.echo(f"  {metric}: {d['from_mean']:.4g} -> {d['to_mean']:.4g}, delta "
                   f"{d['mean']:+.4g} (95% CI {d['ci_low']:+.4g} .. {d['ci_high']:+.4g}, "
                   f"n={d['n']})")
    _print_summary(summary, report)


@main.command("merge", epilog="Examples:\n\n\b\n  adapterswap merge runs/big-study")
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


@main.command("compare", epilog="""Examples:

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
    import math
    from pathlib import Path

    from adapterswap.sweep.compare import compare_runs, format_comparison

    options = _metric_options(metric_options)
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


@main.command("report", epilog="Examples:\n\n\b\n  adapterswap report runs/sdxl-tiny")
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


def run() -> None:
    """Console-script entry point."""
    main(prog_name="adapterswap")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
