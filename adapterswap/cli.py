"""The ``adapterswap`` command line.

Exit codes: 0 success, 1 the work failed, 2 bad usage. Errors are one line on stderr;
``--debug`` shows the traceback. Paths that only list things never import torch.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from adapterswap import __version__
from adapterswap.errors import AdapterswapError


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
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Move adapters across diffusion backbones and measure how many steps they need."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _warn_plugin_failures() -> None:
    from adapterswap.plugins import plugin_failures

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
    """Check the environment and whether each backbone's and adapter's weights are present
    locally (path or Hugging Face cache). Uses no network; missing weights are reported, not
    an error."""
    from adapterswap.doctor import collect

    report = collect()
    _warn_plugin_failures()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    env = report["environment"]
    click.echo("environment:")
    for key, value in env.items():
        click.echo(f"  {key}: {value}")
    for section in ("backbones", "adapters", "metrics"):
        click.echo(f"{section}:")
        for row in report[section]:
            click.echo(f"  {row['name']}: {row['status']}")
            if row.get("hint") and not row.get("present", True):
                click.echo(f"    {row['hint']}")


DEFAULT_PROMPT = "a portrait photo of a person, soft studio light"


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
def generate_command(backbone: str | None, adapter: str | None, reference: str | None,
                     prompt: str | None, seed: int, num_inference_steps: int | None,
                     guidance_scale: float | None, scale: float | None, start: float, end: float,
                     height: int | None, width: int | None, source: str | None,
                     adapter_source: str | None, backbone_options: tuple[str, ...],
                     adapter_options: tuple[str, ...], device: str | None, dtype: str | None,
                     preset: str | None, out: str | None) -> None:
    """Generate one image with a backbone and (optionally) an adapter."""
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
    prompt = prompt or DEFAULT_PROMPT
    image = None
    if adapter_cls is not None:
        if reference is not None:
            image = load_image(reference, argument="--ref")
        elif tiny:
            image = adapter_cls.tiny_reference(seed=0)
        else:
            raise InvalidArgumentError("--ref", None,
                                       f"adapter {adapter_cls.name!r} needs a reference image")
    adapter_kwargs = {"scale": scale, "start": start, "end": end, **a_opts}
    ad = None
    if tiny:
        loaded = backbone_cls.tiny(seed=0)
        if adapter_cls is not None:
            ad = adapter_cls.tiny(loaded, seed=0, **adapter_kwargs)
    else:
        loaded = backbone_cls(source, device=device, dtype=dtype, **b_opts)
        if adapter_cls is not None:
            # validate the adapter's settings and family before loading anything heavy
            ad = adapter_cls(adapter_source, **adapter_kwargs)
            ad.check_backbone(backbone_cls)
        loaded.load()
    result = denoise(loaded, prompt, num_inference_steps=num_inference_steps, seeds=[seed],
                     height=height, width=width, guidance_scale=guidance_scale, adapter=ad,
                     reference=image)
    if out is None:
        out = f"adapterswap-{backbone_cls.name}-{adapter_name or 'none'}-s{seed}.png"
    path = Path(out)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(path)
    t = result.timings
    click.echo(f"wrote {path} ({backbone_cls.name}"
               f"{' + ' + adapter_name if adapter_name else ''}, seed {seed}; "
               f"total {t['total_s']:.2f} s, denoising {t['denoise_s']:.2f} s)")


def run() -> None:
    """Console-script entry point."""
    main(prog_name="adapterswap")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
