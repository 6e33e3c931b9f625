"""``adapterswap generate``: one image with a backbone and (optionally) an adapter.

Every argument is checked (names, the adapter's family, values, files) before any model is
built or loaded; without ``--backbone`` the backbone comes from the configuration file or,
with ``--preset tiny``, from the installed plugins (:func:`default_backbone`).
"""

from __future__ import annotations

from typing import Any

import click

from adapterswap.cli.common import parse_options, warn_plugin_failures
from adapterswap.fastpath import ATTENTION_CHOICES


@click.command("generate", epilog="""Examples:

\b
  adapterswap generate --preset tiny
  adapterswap generate --preset tiny --backbone sdxl
  adapterswap generate --backbone flux-schnell --adapter infusenet --ref face.jpg \\
      --prompt "a portrait of a chef" --seed 0 --out out.png
  adapterswap generate --backbone flux-dev --ref face.jpg --prompt "..." --steps 28
""")
@click.option("--backbone", default=None,
              help="Backbone name (see `adapterswap list backbones`); default: [defaults] "
                   "backbone in the config file, else with --preset tiny the first installed "
                   "backbone that has a tiny preset.")
@click.option("--adapter", default=None,
              help="Adapter name, or 'none'. Default: the backbone family's built-in adapter.")
@click.option("--ref", "reference", default=None,
              help="Reference image for the adapter, or an embedding .npy it takes.")
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
              help="SDPA kernel preference (default auto: cuDNN first on Hopper); fa3: "
                   "FlashAttention-3 (Hopper, pip install fa3-fwd); fa3-fp8: its float8 "
                   "kernel (approximation).")
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

    from adapterswap.denoise import denoise
    from adapterswap.errors import InvalidArgumentError
    from adapterswap.plugins import get_adapter, get_backbone

    warn_plugin_failures()
    if backbone is None:
        backbone = default_backbone(preset)
    backbone_cls = get_backbone(backbone)
    adapter_name = adapter if adapter is not None else backbone_cls.default_adapter
    if adapter_name in ("none", ""):
        adapter_name = None
    adapter_cls = get_adapter(adapter_name) if adapter_name else None
    if adapter_cls is not None:  # before any builder runs: a tiny one assumes its family
        check_family(adapter_cls, backbone_cls)
    b_opts = parse_options(backbone_options, "--option")
    a_opts = parse_options(adapter_options, "--adapter-option")
    if adapter_cls is not None:  # backbone options the adapter's options require
        from adapterswap.adapter import with_backbone_options

        b_opts = with_backbone_options(b_opts, adapter_cls, a_opts, backbone=backbone_cls.name)
    tiny = preset == "tiny"
    if not tiny and prompt is None:
        raise InvalidArgumentError("--prompt", None, "required (or use --preset tiny)")
    if prompt is None:
        from adapterswap.sweep.spec import DEFAULT_PROMPTS

        prompt = DEFAULT_PROMPTS[0]
    from adapterswap.sweep import spec as checks

    if adapter_cls is not None:  # what the adapter's options ask where the user gave none
        from adapterswap.run_defaults import apply_run_defaults

        height, width, num_inference_steps, notes = apply_run_defaults(
            backbone_cls, adapter_cls.run_defaults(a_opts, backbone_cls), height=height,
            width=width, steps=num_inference_steps, preset=preset,
            names=("--height", "--width", "--steps"))
        for note in notes:
            click.echo(f"note: {note}", err=True)
    # every argument checked before anything loads or is written (the sweep's own checks)
    checks.check_seed("--seed", seed)
    checks.check_device("--device", device)
    checks.check_dtype("--dtype", dtype)
    from adapterswap.devices import default_device
    from adapterswap.fastpath import FastPath
    from adapterswap.fastpath.flash import check_attention

    # where the models run: the tiny preset stays on the CPU unless told (as in a sweep)
    run_device = device or ("cpu" if tiny else default_device())
    check_attention(attention, run_device)
    fast = FastPath(attention=attention, fp8=fp8, cache=cache)
    check_device = getattr(backbone_cls, "check_run_device", None)  # a budget's conflicts
    if check_device is not None:
        check_device(b_opts, run_device, fast=fast)
    if num_inference_steps is not None:
        if num_inference_steps < 1:
            raise InvalidArgumentError("--steps", num_inference_steps, "must be an integer >= 1")
        checks.check_steps("--steps", [num_inference_steps], backbone_cls)
    from adapterswap.sweep.cells import preset_size

    checks.check_size(backbone_cls, height, width, names=("--height", "--width"),
                      default=preset_size(preset, backbone_cls))
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
            # readable? an image, or an embedding the adapter takes (before loading models)
            checks.check_reference("--ref", reference, adapter_cls)
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
        ad.check_references([reference])  # e.g. face models for an image, before loading
    loaded = models.backbone(backbone)
    if adapter_cls is not None and ad is None:
        ad = models.adapter(adapter_cls.name, loaded)  # tiny weights that fit the backbone
    if ad is not None:
        ad.attach(loaded)
    accelerator = models.accelerator(loaded)
    accelerator.enable(fast, adapters=[ad] if ad is not None else [])
    result = denoise(loaded, prompt, num_inference_steps=num_inference_steps, seeds=[seed],
                     height=height, width=width, guidance_scale=guidance_scale, adapter=ad,
                     reference=image, accelerator=accelerator)
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


def default_backbone(preset: str | None) -> str:
    """The backbone ``generate`` uses without ``--backbone``: the configuration file's
    ``[defaults] backbone``; else, with ``--preset tiny``, the first installed backbone (by
    name) whose class has a tiny preset, announced in one stderr line so that the choice is
    never silent. The CLI names no backbone itself: which ones exist is up to the plugins."""
    from adapterswap.config import config_path, configured_default
    from adapterswap.errors import InvalidArgumentError, UnknownNameError, UsageError
    from adapterswap.plugins import backbones

    configured = configured_default("backbone")
    if configured is not None:
        if configured not in backbones():
            error = UnknownNameError("backbone", configured, backbones().names())
            raise UsageError(f"[defaults] backbone in {str(config_path())!r}: {error}")
        return configured
    if preset != "tiny":
        raise InvalidArgumentError("--backbone", None, "required (or use --preset tiny)")
    for entry in backbones().entries():
        if has_tiny_preset(entry.cls):
            click.echo(f"using backbone {entry.name!r} (give --backbone to choose)", err=True)
            return entry.name
    raise InvalidArgumentError("--backbone", None,
                               "required: no installed backbone has a tiny preset (install a "
                               "backbone plugin; see `adapterswap list backbones`)")


def has_tiny_preset(backbone_cls: type) -> bool:
    """Whether ``backbone_cls`` overrides :meth:`Backbone.tiny` (the base class refuses)."""
    from adapterswap.backbone import Backbone

    own = getattr(backbone_cls.tiny, "__func__", None)  # type: ignore[attr-defined]
    return own is not None and own is not Backbone.tiny.__func__  # type: ignore[attr-defined]


def check_family(adapter_cls: Any, backbone_cls: Any) -> None:
    """:class:`~adapterswap.errors.IncompatibleAdapterError` (the one-line error ``sweep``
    gives, listing the installed backbones the adapter supports) when the adapter does not
    support the backbone's family. Checked on the classes, before any object is built."""
    from adapterswap.errors import IncompatibleAdapterError
    from adapterswap.plugins import backbones

    if backbone_cls.family in adapter_cls.families:
        return
    supported = [e.name for e in backbones().entries() if e.cls.family in adapter_cls.families]
    raise IncompatibleAdapterError(adapter_cls.name, adapter_cls.families, backbone_cls.name,
                                   backbone_cls.family, supported)
