"""Stable Diffusion UNet plumbing shared by the SDXL and SD 1.5 backbones and their IP-Adapters.

Two halves, both thin layers over diffusers:

* **Scheduler steps.** The engine drives the loop one step at a time, possibly with samples of
  different step counts in one batch. A diffusers scheduler keeps per-run state (its step index,
  LCM's noise), so every run gets a scheduler copy of its own, and every call pins the step index
  explicitly instead of trusting the copy's counter. ``scale_model_input`` is applied row by row
  with a scheduler set up for that row's step count, so per-sample timesteps are exact.
  Two pipeline details need care outside the pipeline: SDXL-base's initial noise scale
  depends on the step count, so it is applied at the first step
  (:meth:`StepSchedulers.first_step_latents`), and LCM draws noise from each sample's generator
  at every step (:class:`SampleGenerators`).
* **IP-Adapter.** Weights load through diffusers' native path (``pipe.load_ip_adapter`` with the
  h94 state dict), which installs ``IPAdapterAttnProcessor2_0`` processors and the image
  projection on the UNet. The modules built there are kept and re-installed on the next backbone,
  so moving the adapter never reloads it; uninstalling puts back the very processor objects that
  were there before, so the base output returns bit for bit.

Both UNet plugins (``adapterswap-sdxl`` and ``adapterswap-sd15``) build on this module, and a
third-party UNet backbone or IP-Adapter can too. torch and diffusers are imported lazily.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.adapter import Adapter, load_image
from adapterswap.backbone import Backbone
from adapterswap.errors import InvalidArgumentError, UsageError, WeightsNotFoundError
from adapterswap.fastpath import device_tensor
from adapterswap.hub import resolve_source

if TYPE_CHECKING:
    import torch

    from adapterswap.denoise import Schedule, StepContext, TensorBundle

#: Keys a backbone's ``predict`` accepts in ``adapter_inputs`` (see :func:`split_ip_inputs`).
IP_INPUT_KEYS = ("ip_adapter_image_embeds", "negative_ip_adapter_image_embeds",
                 "ip_adapter_scales")


# ---------------------------------------------------------------------------------- schedulers
def uses_cfg(guidance_scale: float | None) -> bool:
    """Classifier-free guidance runs only above 1, as in diffusers (``guidance_scale > 1``)."""
    return guidance_scale is not None and guidance_scale > 1.0


def at_step(scheduler: Any, step_index: int) -> Any:
    """Pin a scheduler's step counter (Euler, LCM) so ``step``/``scale_model_input`` act at
    ``step_index`` whatever was called before; schedulers without one (DDIM) are unchanged."""
    if hasattr(scheduler, "_step_index"):
        scheduler._step_index = step_index
    return scheduler


def run_scheduler(scheduler: Any, num_inference_steps: int, device: Any) -> Any:
    """A copy of ``scheduler`` set up for one run of ``num_inference_steps`` steps."""
    run = copy.deepcopy(scheduler)
    run.set_timesteps(num_inference_steps, device=device)
    return run


def scheduler_start_noise(run: Any, sigmas: Any) -> float | None:
    """The noise share of the UNet's input at the first step as a scheduler set up for a run
    assumes it (:attr:`adapterswap.denoise.Schedule.start_noise`): from the first sigma for
    Euler-type schedulers (``sigmas`` of the run, else ``None``), from ``alphas_cumprod`` at the
    first timestep for DDIM/DDPM/LCM; ``None`` for a scheduler with neither."""
    from adapterswap.denoise import start_noise_from_alpha_cumprod, start_noise_from_sigma

    if sigmas is not None:
        return start_noise_from_sigma(float(sigmas[0]))
    alphas_cumprod = getattr(run, "alphas_cumprod", None)
    if alphas_cumprod is None:
        return None
    return start_noise_from_alpha_cumprod(float(alphas_cumprod[int(run.timesteps[0])]))


#: The values of the ``timestep_spacing`` backbone option, as diffusers' DDIM and Euler
#: schedulers take them (Table 2 of Lin et al., "Common Diffusion Noise Schedules and Sample
#: Steps are Flawed", arXiv 2305.08891): "leading" starts at
#: ``t = (N - 1) * (1000 // N) + steps_offset`` (t = 1 at N = 1 for SD: far from noise at low
#: N), "trailing" at t = 999 for every N, "linspace" at 999 from N = 2 on (at 0 for N = 1).
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


#: Schedulers whose ``scale_model_input`` at step 0 depends only on the first timestep and
#: sigma (or is the identity), so :meth:`StepSchedulers.first_step_key` can vouch for equal
#: first-step inputs across step counts.
SHAREABLE_FIRST_STEP = frozenset({
    "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler"})


class StepSchedulers:
    """Reference schedulers per step count, for per-row ``scale_model_input`` and the
    initial noise scale. Cached: ``set_timesteps`` runs once per step count.

    The schedulers live on the CPU: their per-step arithmetic is on scalars (DDIM indexes
    ``alphas_cumprod`` by the timestep, LCM compares timesteps), and doing it with device
    tensors would copy each scalar back to the host, synchronising the loop at every step.
    Only the timesteps the denoiser takes are copied to the device, once per schedule."""

    def __init__(self, scheduler: Any, device: Any) -> None:
        self.scheduler = scheduler
        self.device = device
        self._by_steps: dict[int, Any] = {}
        self._sigma_varies: bool | None = None

    def __call__(self, num_inference_steps: int) -> Any:
        if num_inference_steps not in self._by_steps:
            self._by_steps[num_inference_steps] = run_scheduler(
                self.scheduler, num_inference_steps, "cpu")
        return self._by_steps[num_inference_steps]

    def schedule(self, num_inference_steps: int) -> Schedule:
        """A :class:`Schedule` whose ``state`` is a (CPU) scheduler of its own; its
        ``timesteps`` are on the device."""
        from adapterswap.denoise import Schedule

        run = run_scheduler(self.scheduler, num_inference_steps, "cpu")
        sigmas = getattr(run, "sigmas", None)
        # Euler-type schedulers have N + 1 sigmas ending in 0; DDIM/LCM have none
        if sigmas is None or len(sigmas) != num_inference_steps + 1:
            sigmas = None
        from adapterswap.fastpath import host_to_device

        return Schedule(num_inference_steps, host_to_device(run.timesteps, self.device),
                        sigmas=sigmas, state=run,
                        first_step_key=self.first_step_key(run, num_inference_steps),
                        start_noise=scheduler_start_noise(run, sigmas))

    def first_step_key(self, run: Any, num_inference_steps: int) -> Any:
        """What the UNet's input at step 0 depends on besides the noise: the first timestep,
        the input scaling (Euler: the first sigma) and a step-count-dependent noise scale
        (:meth:`first_step_latents`); ``None`` for schedulers whose input scaling this does
        not know (:data:`SHAREABLE_FIRST_STEP`). Schedules with "trailing" spacing
        (SDXL-Lightning, LCM) start at the same timestep whatever the step count, so a sweep
        computes their first step once; "leading" ones (SD1.5's DDIM, SDXL-base) do not."""
        if type(run).__name__ not in SHAREABLE_FIRST_STEP:
            return None
        sigmas = getattr(run, "sigmas", None)
        sigma = float(sigmas[0]) if sigmas is not None and len(sigmas) else None
        noise = float(self(num_inference_steps).init_noise_sigma) \
            if self.noise_sigma_depends_on_steps else None
        return ("unet", type(run).__name__, float(run.timesteps[0]), sigma, noise)

    @property
    def noise_sigma_depends_on_steps(self) -> bool:
        """True when ``init_noise_sigma`` changes with the step count (Euler with "leading"
        spacing, SDXL-base's scheduler): then the first step, not ``prepare_latents``, scales
        the noise (see :meth:`first_step_latents`)."""
        if self._sigma_varies is None:
            first = self(1).init_noise_sigma
            self._sigma_varies = any(bool(self(n).init_noise_sigma != first) for n in (2, 30))
        return self._sigma_varies

    def init_noise_sigma(self) -> Any:
        """The step-count-independent ``init_noise_sigma`` (only when it is one)."""
        return self(1).init_noise_sigma

    def first_step_latents(self, latents: torch.Tensor, step_indices: Sequence[int],
                           num_steps: Sequence[int]) -> torch.Tensor:
        """Rows at step 0 times their run's ``init_noise_sigma`` when it depends on the step
        count (so ``prepare_latents`` could not apply it); other rows unchanged."""
        import torch

        if not self.noise_sigma_depends_on_steps or all(i != 0 for i in step_indices):
            return latents
        rows = [row * self(n).init_noise_sigma if i == 0 else row
                for row, i, n in zip(latents.split(1), step_indices, num_steps)]
        return torch.cat(rows)

    def scale_model_input(self, latents: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The scheduler's ``scale_model_input`` for each row at its own step."""
        import torch

        rows = []
        for row, t, i, n in zip(latents.split(1), ctx.timesteps, ctx.step_indices,
                                ctx.num_steps):
            rows.append(at_step(self(n), i).scale_model_input(row, t))
        return torch.cat(rows)


def scheduler_step(schedule: Schedule, model_output: torch.Tensor, latents: torch.Tensor,
                   step_index: int, generators: Sequence[torch.Generator] | None) -> Any:
    """``schedule.state.step`` at ``step_index``; returns diffusers' step output."""
    scheduler = at_step(schedule.state, step_index)
    if hasattr(scheduler, "is_scale_input_called"):
        scheduler.is_scale_input_called = True  # done per row by StepSchedulers
    kwargs: dict[str, Any] = {}
    if generators is not None:
        kwargs["generator"] = list(generators)
    # the scheduler's own (CPU) timestep: no device-to-host copy inside the loop
    return scheduler.step(model_output, scheduler.timesteps[step_index], latents, **kwargs,
                          return_dict=True)


def predicted_x0(schedule: Schedule, model_output: torch.Tensor, latents: torch.Tensor,
                 step_index: int) -> torch.Tensor:
    """The scheduler's own clean-sample estimate at ``step_index`` (Euler/DDIM
    ``pred_original_sample``, LCM ``denoised``) without advancing the run."""
    import torch

    scheduler = schedule.state
    before = getattr(scheduler, "_step_index", None)
    # LCM draws noise inside step(); a throwaway generator keeps every real stream untouched
    scratch = [torch.Generator("cpu").manual_seed(0) for _ in range(latents.shape[0])]
    try:
        out = scheduler_step(schedule, model_output, latents, step_index, scratch)
    finally:
        if hasattr(scheduler, "_step_index"):
            scheduler._step_index = before
    x0 = getattr(out, "denoised", None)
    if x0 is None:
        x0 = out.pred_original_sample
    return x0.to(latents.dtype)


def check_prompt(prompt: Any, cfg: bool, backbone: str) -> None:
    """A prompt encoding without negative rows cannot drive CFG: say so."""
    if cfg and prompt.get("negative_prompt_embeds") is None:
        raise UsageError(
            f"backbone {backbone!r}: the prompt was encoded without guidance, but predict was "
            "called with guidance_scale > 1; encode it with the same guidance_scale")


def guided(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over ``[uncond; cond]`` rows, as diffusers combines them."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


# ---------------------------------------------------------------------------------- IP-Adapter
def ip_processor_types() -> tuple[type, ...]:
    from diffusers.models.attention_processor import (
        IPAdapterAttnProcessor,
        IPAdapterAttnProcessor2_0,
        IPAdapterXFormersAttnProcessor,
    )

    return IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor


#: Attribute under which :func:`install_ip_adapter` keeps the installed IP processors, so the
#: per-step path need not walk the UNet's ~2000 modules (``unet.attn_processors`` costs ~5 ms
#: on SDXL, every step).
_IP_CACHE = "_adapterswap_ip_processors"


def ip_processors(unet: Any) -> dict[str, Any]:
    """The UNet's IP-Adapter attention processors by name (empty when none is installed)."""
    cached = getattr(unet, _IP_CACHE, None)
    if cached is not None:
        return cached
    types = ip_processor_types()
    return {name: proc for name, proc in unet.attn_processors.items() if isinstance(proc, types)}


def has_ip_adapter(unet: Any) -> bool:
    """Whether an IP-Adapter is installed (diffusers marks it in the UNet's config)."""
    return getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj" \
        or bool(getattr(unet, _IP_CACHE, None))


def cross_attention_names(unet: Any) -> list[str]:
    """Processors an IP-Adapter replaces (every attention that is not self-attention), in the
    order diffusers numbers their weights (``1.to_k_ip``, ``3.to_k_ip``, ...)."""
    return [name for name in unet.attn_processors
            if not name.endswith("attn1.processor") and "motion_modules" not in name]


def read_ip_adapter_file(path: str | Path, *,
                         what: str = "IP-Adapter") -> dict[str, dict[str, Any]]:
    """An h94 IP-Adapter file as ``{"image_proj": {...}, "ip_adapter": {...}}``.

    ``.safetensors`` files hold flat keys prefixed ``image_proj.`` / ``ip_adapter.``; the legacy
    ``.bin`` files a pickled dict of the two, read with ``weights_only=True`` (a pickle that
    needs more raises :class:`~adapterswap.errors.UnsafeWeightsError`). A truncated file, a file
    missing one of the two parts or with an incomplete set of ``ip_adapter`` layers raises
    :class:`~adapterswap.errors.WeightsNotFoundError` naming the file and the missing keys.
    """
    from adapterswap.weights import check_safetensors, read_pickle

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        check_safetensors(path, what=what)
        state: Any = {}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    part, _, rest = key.partition(".")
                    if part in ("image_proj", "ip_adapter"):
                        state.setdefault(part, {})[rest] = f.get_tensor(key)
                    else:
                        state.setdefault(part, None)
        except Exception as exc:  # SafetensorError: corrupt past the header
            raise WeightsNotFoundError(
                f"{what}: {str(path)!r} is a truncated or corrupt safetensors file ({exc}); "
                "download it again") from None
    else:
        state = read_pickle(path, what=what)
    parts = ("image_proj", "ip_adapter")
    if not isinstance(state, Mapping) or not any(
            isinstance(state.get(part), Mapping) and state[part] for part in parts):
        found = (sorted(map(str, state)) or "no weights") if isinstance(state, Mapping) \
            else type(state).__name__
        raise InvalidArgumentError(
            "weight_name", str(path),
            f"not an IP-Adapter file: expected 'image_proj' and 'ip_adapter' weights, found "
            f"{found}")
    for part in parts:
        if not isinstance(state.get(part), Mapping) or not state[part]:
            raise WeightsNotFoundError(
                f"{what}: {str(path)!r} is incomplete: it has no {part!r} weights (no "
                f"{part}.* keys)")
    missing = missing_ip_layer_keys(state["ip_adapter"])
    if missing:
        raise WeightsNotFoundError(
            f"{what}: {str(path)!r} is incomplete: the ip_adapter layers lack "
            f"{_listed([f'ip_adapter.{k}' for k in missing])}")
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}


def _listed(items: Sequence[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more"
                                       if len(items) > limit else "")


_IP_LAYER = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


def missing_ip_layer_keys(layers: Mapping[str, Any]) -> list[str]:
    """Keys an h94 ``ip_adapter`` state dict lacks to be complete in itself: every layer
    ``1, 3, 5, ...`` up to the highest one present has ``to_k_ip`` and ``to_v_ip``."""
    indices = {int(m.group(1)) for key in layers if (m := _IP_LAYER.match(key))}
    if not indices:
        return [] if any(".to_k_ip." in k for k in layers) else ["1.to_k_ip.weight",
                                                                  "1.to_v_ip.weight"]
    return [f"{i}.{kind}.weight" for i in range(1, max(indices) + 1, 2)
            for kind in ("to_k_ip", "to_v_ip") if f"{i}.{kind}.weight" not in layers]


def check_ip_layers(layers: Mapping[str, Any], unet: Any, *, what: str, where: str) -> None:
    """The ``ip_adapter`` weights fit ``unet``: one ``to_k_ip``/``to_v_ip`` pair per
    cross-attention layer, shaped ``(hidden size, cross_attention_dim)``; else
    :class:`~adapterswap.errors.WeightsNotFoundError` naming ``where`` and the keys."""
    cross = unet.config.cross_attention_dim
    missing, wrong = [], []
    shapes = ip_layer_shapes(unet)
    for index, (_, hidden) in enumerate(shapes):
        for kind in ("to_k_ip", "to_v_ip"):
            key = f"{2 * index + 1}.{kind}.weight"
            if key not in layers:
                missing.append(f"ip_adapter.{key}")
            elif tuple(layers[key].shape) != (hidden, cross):
                wrong.append(f"ip_adapter.{key} is {tuple(layers[key].shape)} but the UNet "
                             f"needs {(hidden, cross)}")
    extra = sorted(k for k in layers if (m := _IP_LAYER.match(k))
                   and int(m.group(1)) > 2 * len(shapes) - 1)
    if missing:
        raise WeightsNotFoundError(
            f"{what}: {where!r} lacks {_listed(missing)}, which this UNet's {len(shapes)} "
            "cross-attention layers need: the file is incomplete or for another model")
    if wrong or extra:
        detail = _listed(wrong) if wrong else (
            f"it has IP layers up to {extra[-1]}, the UNet {len(shapes)} cross-attention layers")
        raise WeightsNotFoundError(
            f"{what}: {where!r} was made for another UNet: {detail}")


_PLAIN_PROJ = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
_PLUS_PROJ = ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias",
              "norm_out.weight", "norm_out.bias")
_PLUS_LAYER = ("0.norm1.weight", "0.norm1.bias", "0.norm2.weight", "0.norm2.bias",
               "0.to_q.weight", "0.to_kv.weight", "0.to_out.weight", "1.0.weight", "1.0.bias",
               "1.1.weight", "1.3.weight")


def missing_image_proj_keys(image_proj: Mapping[str, Any], *, plus: bool) -> list[str]:
    """Keys an h94 ``image_proj`` state dict lacks for its layout: the plain IP-Adapter's linear
    projection + norm, or IP-Adapter Plus's resampler (``layers.<i>`` from 0 to the highest).
    A file of another layout (sharing no key with this one) is left to diffusers."""
    if not plus:
        expected = list(_PLAIN_PROJ)
    else:
        depth = {int(m.group(1)) for k in image_proj if (m := re.match(r"^layers\.(\d+)\.", k))}
        expected = list(_PLUS_PROJ) + [f"layers.{i}.{key}" for i in range(max(depth, default=0)
                                                                          + 1)
                                       for key in _PLUS_LAYER]
    if not any(key in image_proj for key in expected):
        return []
    return [key for key in expected if key not in image_proj]


@dataclass
class IPAdapterModules:
    """What diffusers' loader built from an IP-Adapter state dict, kept to move between UNets:
    the IP attention processors by name and the image projection."""

    processors: dict[str, Any]
    image_projection: Any


@dataclass
class InstalledIPAdapter:
    """What a UNet and its pipeline held before :func:`install_ip_adapter`, to put back."""

    pipe: Any
    processors: dict[str, Any]
    encoder_hid_proj: Any
    encoder_hid_dim_type: Any
    pipeline_modules: dict[str, Any] = field(default_factory=dict)


def install_ip_adapter(pipe: Any, state_dict: dict[str, dict[str, Any]], *,
                       image_encoder: Any, feature_extractor: Any,
                       modules: IPAdapterModules | None) -> tuple[IPAdapterModules,
                                                                  InstalledIPAdapter]:
    """Install an IP-Adapter on ``pipe`` and register its image encoder and feature extractor.

    The first time (``modules is None``) diffusers' ``pipe.load_ip_adapter`` builds the
    processors and the image projection from ``state_dict``; later calls re-install those
    ``modules`` (moved to this UNet's device and dtype), so the adapter is never reloaded.
    Returns the modules and what to restore with :func:`uninstall_ip_adapter`.
    """
    unet = pipe.unet
    if has_ip_adapter(unet):
        raise UsageError("this pipeline already has an IP-Adapter installed; detach it first")
    saved = InstalledIPAdapter(
        pipe=pipe,
        processors=dict(unet.attn_processors),
        encoder_hid_proj=unet.encoder_hid_proj,
        encoder_hid_dim_type=getattr(unet.config, "encoder_hid_dim_type", None),
        pipeline_modules={name: getattr(pipe, name, None)
                          for name in ("image_encoder", "feature_extractor")},
    )
    pipe.register_modules(image_encoder=image_encoder, feature_extractor=feature_extractor)
    try:
        if modules is None:
            # diffusers' own loader: converts h94's layout, sets processors and projection
            pipe.load_ip_adapter(state_dict, subfolder="", weight_name="",
                                 image_encoder_folder=None)
            modules = IPAdapterModules(processors=ip_processors(unet),
                                       image_projection=unet.encoder_hid_proj)
        else:
            shapes = dict(ip_layer_shapes(unet))
            cross = unet.config.cross_attention_dim
            misfits = sorted(name for name, proc in modules.processors.items()
                             if (proc.to_k_ip[0].out_features, proc.to_k_ip[0].in_features)
                             != (shapes.get(name), cross))
            if misfits:
                raise UsageError(
                    "the IP-Adapter was built for a UNet with other attention layers; these do "
                    f"not fit: {', '.join(misfits[:3])}{' ...' if len(misfits) > 3 else ''}")
            param = next(unet.parameters())
            for module in (*modules.processors.values(), modules.image_projection):
                module.to(device=param.device, dtype=param.dtype)
            processors = dict(unet.attn_processors)
            processors.update(modules.processors)
            unet.set_attn_processor(processors)  # before encoder_hid_proj, as diffusers does
            unet.encoder_hid_proj = modules.image_projection
            unet.config.encoder_hid_dim_type = "ip_image_proj"
        setattr(unet, _IP_CACHE, dict(modules.processors))
    except Exception:
        uninstall_ip_adapter(saved)
        raise
    return modules, saved


def uninstall_ip_adapter(saved: InstalledIPAdapter) -> None:
    """Put back exactly the processors, projection and pipeline modules that were there."""
    pipe = saved.pipe
    unet = pipe.unet
    # the projection goes first: IP-Adapter Plus's resampler has attention processors of its
    # own, and set_attn_processor wants one processor per attention layer present
    unet.encoder_hid_proj = saved.encoder_hid_proj
    unet.config.encoder_hid_dim_type = saved.encoder_hid_dim_type
    if hasattr(unet, _IP_CACHE):
        delattr(unet, _IP_CACHE)
    unet.set_attn_processor(dict(saved.processors))
    pipe.register_modules(**saved.pipeline_modules)


# InstantStyle (arXiv 2404.02733) targets as diffusers' set_ip_adapter_scale takes them.
_BLOCK = re.compile(r"^block_(\d+)$")
_PROCESSOR = re.compile(r"^(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.")


def _number(value: Any) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0


def block_scales(unet: Any, target: float | Mapping[str, Any], *,
                 argument: str = "target", shown: Any = None) -> dict[str, float]:
    """Per-processor IP-Adapter scales for ``target`` on this UNet.

    ``target`` is a number (every cross-attention layer) or an InstantStyle dict as diffusers'
    ``set_ip_adapter_scale`` takes it: ``{"down": ..., "mid": ..., "up": ...}`` where ``down``
    and ``up`` are a number or ``{"block_<i>": number or [one per attention of the block]}``;
    layers it does not name get 0. A block the UNet lacks, a block without attention or a list
    of the wrong length raises :class:`InvalidArgumentError` naming ``argument`` and ``shown``
    (default: ``target``), where diffusers would silently ignore or fail later.
    """
    names = cross_attention_names(unet)
    shown = target if shown is None else shown
    if _number(target):
        return {name: float(target) for name in names}
    if not isinstance(target, Mapping):
        raise InvalidArgumentError(argument, shown, "expected a number or an InstantStyle dict")

    def bad(reason: str) -> InvalidArgumentError:
        return InvalidArgumentError(argument, shown, reason)

    unknown = sorted(set(target) - {"down", "mid", "up"})
    if unknown:
        raise bad(f"unknown key(s) {', '.join(map(repr, unknown))}; use 'down', 'mid', 'up'")
    blocks = {"down": unet.down_blocks, "up": unet.up_blocks}
    per_attention: dict[tuple[str, int, int], float] = {}
    for side in ("down", "up"):
        with_attention = {i: len(b.attentions) for i, b in enumerate(blocks[side])
                          if getattr(b, "attentions", None)}
        available = ", ".join(f"block_{i} ({n} attentions)" for i, n in with_attention.items())
        spec = target.get(side, 0.0)
        if _number(spec):
            spec = {f"block_{i}": spec for i in with_attention}
        if not isinstance(spec, Mapping):
            raise bad(f"{side!r} must be a number or a dict of block_<i> entries")
        for key, value in spec.items():
            match = _BLOCK.match(str(key))
            if match is None:
                raise bad(f"{side}.{key}: block keys are named block_<i>")
            index = int(match.group(1))
            if index not in with_attention:
                raise bad(f"this UNet has no {side}_blocks.{index} with attention layers "
                          f"({side} blocks with attention: {available or 'none'})")
            count = with_attention[index]
            values = [value] * count if _number(value) else value
            if not (isinstance(values, (list, tuple)) and len(values) == count
                    and all(_number(v) for v in values)):
                raise bad(f"{side}.{key} needs a number or a list of {count} numbers >= 0 "
                          f"(one per attention of {side}_blocks.{index}), got {value!r}")
            for j, v in enumerate(values):
                per_attention[(side, index, j)] = float(v)
    mid = target.get("mid", 0.0)
    if isinstance(mid, (list, tuple)) and len(mid) == 1:
        mid = mid[0]
    if not _number(mid):
        raise bad(f"'mid' must be a number >= 0, got {mid!r}")
    scales = {}
    for name in names:
        match = _PROCESSOR.match(name)
        if match:
            side, i, j = match.group(1), int(match.group(2)), int(match.group(3))
            scales[name] = per_attention.get((side, i, j), 0.0)
        else:  # mid_block
            scales[name] = float(mid)
    return scales


def set_ip_scales(unet: Any, scales: Mapping[str, float] | None) -> None:
    """Set every IP processor's scale (``None``: all 0, which diffusers' processors skip, so the
    output is exactly the no-adapter one)."""
    for name, proc in ip_processors(unet).items():
        value = float(scales.get(name, 0.0)) if scales else 0.0
        if proc.scale != [value] * len(proc.scale):
            proc.scale = [value] * len(proc.scale)


def split_ip_inputs(adapter_inputs: Mapping[str, Any] | None, unet: Any, batch: int,
                    backbone: str) -> tuple[Any, Any, list[list[int]], list[Any]]:
    """Validate IP-Adapter inputs for ``predict`` and group the rows by their scales.

    ``adapter_inputs`` (from an IP-Adapter's ``denoiser_inputs``) holds
    ``ip_adapter_image_embeds`` and ``negative_ip_adapter_image_embeds`` (lists with one
    ``(B, ...)`` tensor per IP-Adapter) and ``ip_adapter_scales`` (one per row: a
    ``{processor name: scale}`` dict, or ``None`` outside the adapter's window).
    Returns ``(embeds, negative_embeds, groups, group_scales)``: rows that share scales form
    one group and one UNet forward. Without inputs there is one group and no embeddings.
    """
    if not adapter_inputs:
        if has_ip_adapter(unet):
            raise UsageError(
                f"backbone {backbone!r} has an IP-Adapter attached but predict got no adapter "
                "inputs: pass the adapter's denoiser_inputs, or detach the adapter")
        return None, None, [list(range(batch))], [None]
    unknown = sorted(set(adapter_inputs) - set(IP_INPUT_KEYS))
    if unknown:
        raise InvalidArgumentError("adapter_inputs", unknown,
                                   f"backbone {backbone!r} takes {', '.join(IP_INPUT_KEYS)}")
    if not has_ip_adapter(unet):
        raise UsageError(f"backbone {backbone!r} got IP-Adapter inputs but no IP-Adapter is "
                         "attached: call adapter.attach(backbone) first")
    for key in ("ip_adapter_image_embeds", "ip_adapter_scales"):
        if adapter_inputs.get(key) is None:
            raise InvalidArgumentError("adapter_inputs", sorted(adapter_inputs),
                                       f"backbone {backbone!r} needs {key!r}")
    embeds = list(adapter_inputs["ip_adapter_image_embeds"])
    negative = adapter_inputs.get("negative_ip_adapter_image_embeds")
    scales = list(adapter_inputs["ip_adapter_scales"])
    if len(scales) != batch or any(e.shape[0] != batch for e in embeds):
        raise InvalidArgumentError("adapter_inputs", {k: len(v) for k, v in
                                                      adapter_inputs.items() if v is not None},
                                   f"need one row per sample ({batch})")
    keys = [None if not s or not any(s.values()) else tuple(sorted(s.items())) for s in scales]
    groups: dict[Any, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    group_scales = [None if key is None else dict(key) for key in groups]
    return embeds, negative, list(groups.values()), group_scales


def select_rows(values: Sequence[Any] | None, rows: list[int], batch: int) -> Any:
    """``values`` (a list of batch-first tensors) restricted to ``rows``."""
    if values is None or len(rows) == batch:
        return values
    index = device_tensor(rows, values[0].device)
    return [v.index_select(0, index) for v in values]


def merge_rows(parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Put group outputs back in batch order."""
    if len(parts) == 1:
        return parts[0][1]
    batch = sum(len(rows) for rows, _ in parts)
    first = parts[0][1]
    out = first.new_empty((batch, *first.shape[1:]))
    for rows, value in parts:
        out[device_tensor(rows, out.device)] = value
    return out


def ip_layer_shapes(unet: Any) -> list[tuple[str, int]]:
    """``(processor name, hidden size)`` of every layer an IP-Adapter adds ``to_k_ip`` /
    ``to_v_ip`` to, sized as diffusers sizes them (from ``block_out_channels``)."""
    channels = list(unet.config.block_out_channels)
    shapes = []
    for name in cross_attention_names(unet):
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        shapes.append((name, hidden))
    return shapes


class ProbeHooks:
    """Forward hooks that measure, in every IP-Adapter attention with a non-zero scale,
    ``||scale * IP-branch attention|| / ||text-branch attention||`` per row (before ``to_out``,
    as :mod:`adapterswap.probes` defines it). They recompute the two attentions from the
    layer's own modules and return nothing, so outputs are untouched."""

    def __init__(self, unet: Any, record: Any) -> None:
        self.handles = []
        types = ip_processor_types()
        for name, module in unet.named_modules():
            if isinstance(getattr(module, "processor", None), types):
                hook = self._hook(name, record)
                self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    @staticmethod
    def _hook(block: str, record: Any) -> Any:
        def measure(attn: Any, args: tuple, kwargs: dict, output: Any) -> None:
            import torch
            import torch.nn.functional as F

            from adapterswap.probes import relative_norm

            processor = attn.processor
            scale = processor.scale[0]
            states = kwargs.get("encoder_hidden_states")
            if not scale or not isinstance(states, tuple):
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            text, images = states
            if attn.norm_cross:
                text = attn.norm_encoder_hidden_states(text)
            batch, heads = hidden.shape[0], attn.heads

            def split(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

            with torch.no_grad():
                query = split(attn.to_q(hidden))
                text_out = F.scaled_dot_product_attention(
                    query, split(attn.to_k(text)), split(attn.to_v(text)))
                image = images[0]
                image_out = F.scaled_dot_product_attention(
                    query, split(processor.to_k_ip[0](image)), split(processor.to_v_ip[0](image)))
                record(block, relative_norm(scale * image_out, text_out))

        return measure

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


# ---------------------------------------------------------------------------------- tiny presets
def build_once(path: Path, build: Any) -> Path:
    """Create ``path`` with ``build(tmp_path)`` unless it exists; atomic, so two processes
    racing for the same tiny preset never see a half-written directory."""
    import os
    import shutil
    import tempfile

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(tmp)
        os.replace(tmp, path)
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def fp16_rounded(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors stored in float16, as h94's published files are."""
    import torch

    return {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}


def save_tiny_image_encoder(path: Path, seed: int, *, hidden_size: int,
                            projection_dim: int) -> None:
    """A tiny CLIP image encoder in the layout of h94's ``image_encoder`` folders
    (``config.json`` + float16 ``model.safetensors``, no preprocessor config), taking 224 px
    inputs like the real ViT-H / ViT-bigG so the default ``CLIPImageProcessor`` fits."""
    import torch

    from adapterswap.tiny import tiny_clip_vision_encoder

    encoder, _ = tiny_clip_vision_encoder(seed, projection_dim=projection_dim,
                                          hidden_size=hidden_size, image_size=224)
    encoder.to(torch.float16).save_pretrained(str(path), safe_serialization=True)


def save_ip_adapter_files(folder: Path, stem: str, state: dict[str, dict[str, Any]]) -> None:
    """Write ``<stem>.safetensors`` (flat ``image_proj.`` / ``ip_adapter.`` keys) and the legacy
    ``<stem>.bin`` (a dict of the two), float16, as h94 publishes them."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {part: fp16_rounded(tensors) for part, tensors in state.items()}
    flat = {f"{part}.{key}": value for part, tensors in state.items()
            for key, value in tensors.items()}
    save_file(flat, str(folder / f"{stem}.safetensors"))
    torch.save(state, str(folder / f"{stem}.bin"))


def random_ip_layers(unet: Any, generator: torch.Generator) -> dict[str, Any]:
    """Random ``to_k_ip`` / ``to_v_ip`` weights for every cross-attention of ``unet``, keyed as
    in h94's files (``1.to_k_ip.weight``, ``3.to_k_ip.weight``, ...)."""
    import torch

    cross = unet.config.cross_attention_dim
    layers = {}
    for index, (_, hidden) in enumerate(ip_layer_shapes(unet)):
        for kind in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * index + 1}.{kind}.weight"] = \
                torch.randn(hidden, cross, generator=generator) / cross ** 0.5
    return layers


class SampleGenerators:
    """Which generator each latent row belongs to, for schedulers that draw noise at every
    step (LCM): diffusers passes the pipeline's generator to ``scheduler.step``, so a sample's
    step noise is the next draw of the generator that drew its initial noise.

    ``Backbone.step`` receives rows, not sample ids (the engine steps whichever rows share a
    schedule), so rows are recognised by their exact bytes: ``prepare_latents`` registers each
    noise row with its generator, each ``step`` looks its input rows up and registers its
    output rows. Identical rows (a repeated seed) have generators in identical states, so any
    of them serves.
    """

    def __init__(self, capacity: int = 4096) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self._rows: OrderedDict[bytes, list[Any]] = OrderedDict()

    @staticmethod
    def key(row: torch.Tensor) -> bytes:
        import hashlib

        import torch

        data = row.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
        return hashlib.blake2b(data, digest_size=16).digest()

    def add(self, rows: torch.Tensor, generators: Sequence[Any]) -> None:
        for row, generator in zip(rows, generators):
            self._rows.setdefault(self.key(row), []).append(generator)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def take(self, rows: torch.Tensor, backbone: str) -> list[Any]:
        keys = [self.key(row) for row in rows]
        if any(not self._rows.get(k) for k in keys):
            raise UsageError(
                f"backbone {backbone!r}: its scheduler draws noise at every step from the "
                "generator that drew each sample, but these latents did not come from its "
                "prepare_latents or step; start from prepare_latents")
        generators = []
        for k in keys:
            generators.append(self._rows[k].pop())
            if not self._rows[k]:
                del self._rows[k]
        return generators


# ---------------------------------------------------------------------------------- base classes
class UNetBackbone(Backbone):
    """What the SDXL and SD 1.5 backbones share: noise, schedules, guidance batching, scheduler
    steps and IP-Adapter inputs. A subclass loads its pipeline, encodes prompts, runs the UNet
    on a group of rows (:meth:`denoise_rows`) and decodes.

    ``predict`` takes IP-Adapter inputs as documented in :func:`split_ip_inputs`; rows whose
    adapter window is closed run with every IP scale at 0 (diffusers then skips the IP branch),
    so they get exactly the no-adapter output; rows with different scales run as separate UNet
    forwards.
    """

    option_docs: ClassVar[dict[str, str]] = {
        "variant": "weights variant to read, e.g. 'fp16' for the repo's half-precision files",
        "timestep_spacing": "where the scheduler's timesteps start: 'leading', 'trailing' "
                            "(from t=999 at every step count) or 'linspace' (default: the "
                            "model card's)",
    }
    #: True when the scheduler draws fresh noise at every step (LCM).
    stochastic_steps: ClassVar[bool] = False
    #: UNets at their usual batch are bound by kernel launches: the fast path compiles the
    #: whole UNet with CUDA graphs (``reduce-overhead``).
    compile_mode: ClassVar[str] = "reduce-overhead"
    compile_scope: ClassVar[str] = "model"
    #: SD1.5 + IP-Adapter Plus on an H100 (fp16, 4 seeds with CFG per forward): compiling the
    #: UNet and the VAE decoder took ~98 s (first sweep 99.6 s against 1.6 s warm) and saved
    #: ~33 ms per forward (59 forwards: 3.56 s eager against 1.61 s compiled).
    compile_pays_after: ClassVar[int | None] = 3000

    def __init__(self, source: str | None = None, *, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        super().__init__(source, device=device, dtype=dtype, **options)
        self._sample_generators = SampleGenerators()
        self._step_schedulers: StepSchedulers | None = None

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        if name == "timestep_spacing" and value not in TIMESTEP_SPACINGS:
            raise InvalidArgumentError(name, value,
                                       f"choose one of {', '.join(TIMESTEP_SPACINGS)}")
        if name == "variant" and value is not None and not isinstance(value, str):
            raise InvalidArgumentError(name, value, "must be a string such as 'fp16'")
        return super().check_option(name, value)

    # -- loading ---------------------------------------------------------------------------
    def pretrained_kwargs(self, local_files_only: bool) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained``: dtype, safetensors only, offline flag."""
        kwargs = {"dtype": self.dtype, "use_safetensors": True,
                  "local_files_only": local_files_only}
        if self.options.get("variant"):
            kwargs["variant"] = self.options["variant"]
        return kwargs

    def from_pretrained(self, pipeline_class: type, source: str, *, local_files_only: bool,
                        **kwargs: Any) -> Any:
        """``pipeline_class`` loaded from ``source`` with :func:`adapterswap.weights.load_pipeline`
        (safetensors only, every model component checked against its config, one clear error
        naming the file when something is broken); ``kwargs`` go to ``from_pretrained``."""
        from adapterswap.weights import load_pipeline

        options = self.pretrained_kwargs(local_files_only)
        options.pop("use_safetensors", None)
        return load_pipeline(pipeline_class, source, what=f"backbone {self.name!r}",
                             **options, **kwargs)

    def configure_pipeline(self, pipe: Any) -> Any:
        """Last touches on a loaded pipeline (a distilled backbone swaps the scheduler first):
        the ``timestep_spacing`` option goes into the scheduler's config, as
        ``pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
        timestep_spacing=...)`` would put it."""
        spacing = self.options.get("timestep_spacing")
        if spacing is not None:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                              timestep_spacing=spacing)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def from_pipeline(cls, pipe: Any, *, source: str = "<in-memory>", device: str | None = None,
                      **options: Any) -> Backbone:
        backbone = super().from_pipeline(pipe, source=source, device=device, **options)
        backbone.pipe = backbone.configure_pipeline(pipe)
        return backbone

    def clear_caches(self) -> None:
        self._step_schedulers = None
        self.__dict__.pop("_w_embeddings", None)

    @property
    def step_schedulers(self) -> StepSchedulers:
        """Reference schedulers of the pipeline's current scheduler, per step count."""
        self.require_loaded()
        cache = self._step_schedulers
        if cache is None or cache.scheduler is not self.pipe.scheduler:
            cache = self._step_schedulers = StepSchedulers(self.pipe.scheduler, self.device)
        return cache

    # -- pipeline steps --------------------------------------------------------------------
    @classmethod
    def random(cls, *, device: str | None = None, dtype: Any = None, seed: int = 0,
               **options: Any) -> UNetBackbone:
        """Random weights at the published size (the ``random`` preset); the subclass
        supplies :meth:`random_pipeline`, this configures it as :meth:`load` would, with
        ``options`` (options that pick weight files, such as ``variant``, have nothing to pick
        here)."""
        from adapterswap.backbone import default_device, default_dtype, parse_dtype

        options = cls.check_options(options)  # before building billions of parameters
        device = device or default_device()
        dtype = parse_dtype(dtype) or default_dtype(device)
        backbone = cls.from_pipeline(cls.random_pipeline(device, dtype, seed), source="random",
                                     device=device, **options)
        backbone.dtype = dtype
        backbone.pipe = backbone.configure_pipeline(backbone.pipe)
        return backbone

    @staticmethod
    def random_pipeline(device: Any, dtype: Any, seed: int) -> Any:
        """The diffusers pipeline at the published size with random weights."""
        raise UsageError("this backbone has no random (published-size) preset")

    def uses_cfg(self, guidance_scale: float | None) -> bool:
        """Whether ``predict`` runs the unconditional branch for this scale."""
        return uses_cfg(guidance_scale)

    def prepare_latents(self, generators: Sequence[torch.Generator], *, height: int,
                        width: int) -> torch.Tensor:
        """Noise drawn as the diffusers pipeline draws it, one row per generator, times
        ``init_noise_sigma``. When that depends on the step count (SDXL-base's "leading"
        Euler schedule) it is applied at the first step instead, where the count is known.

        For schedulers that draw noise at every step (LCM) each row's generator is kept for
        its steps (see :class:`SampleGenerators`), as the pipeline passes its generator to
        ``scheduler.step``.
        """
        self.require_loaded()
        factor = self.pipe.vae_scale_factor
        shape = (self.pipe.unet.config.in_channels, height // factor, width // factor)
        from adapterswap.denoise import draw_noise

        latents = draw_noise(generators, shape, device=self.device, dtype=self.dtype)
        steps = self.step_schedulers
        if not steps.noise_sigma_depends_on_steps:
            latents = latents * steps.init_noise_sigma()
        if self.stochastic_steps:
            self._sample_generators.add(latents, list(generators))
        return latents

    def schedule(self, num_inference_steps: int, *, height: int, width: int) -> Schedule:
        return self.step_schedulers.schedule(num_inference_steps)

    def predict(self, latents: torch.Tensor, ctx: StepContext, prompt: Any, *,
                guidance_scale: float | None,
                adapter_inputs: dict[str, Any] | None = None) -> torch.Tensor:
        import torch

        self.require_loaded()
        cfg = self.uses_cfg(guidance_scale)
        check_prompt(prompt, cfg, self.name)
        unet = self.pipe.unet
        batch = latents.shape[0]
        embeds, negative, groups, group_scales = split_ip_inputs(adapter_inputs, unet, batch,
                                                                 self.name)
        if embeds is not None and cfg and negative is None:
            raise UsageError(f"backbone {self.name!r}: classifier-free guidance needs "
                             "negative_ip_adapter_image_embeds")
        steps = self.step_schedulers
        latents = steps.first_step_latents(latents, ctx.step_indices, ctx.num_steps)
        model_input = steps.scale_model_input(latents, ctx)
        timesteps = torch.as_tensor(ctx.timesteps).to(self.device)
        parts = []
        with torch.no_grad():
            for rows, scales in zip(groups, group_scales):
                if embeds is not None:
                    set_ip_scales(unet, scales)
                whole = len(rows) == batch
                index = device_tensor(rows, self.device)
                image_embeds = None
                if embeds is not None:
                    image_embeds = select_rows(embeds, rows, batch)
                    if cfg:
                        uncond = select_rows(negative, rows, batch)
                        image_embeds = [torch.cat([u, c]) for u, c in zip(uncond, image_embeds)]
                out = self.denoise_rows(
                    model_input if whole else model_input.index_select(0, index),
                    timesteps if whole else timesteps.index_select(0, index),
                    prompt if whole else prompt.select(rows),
                    cfg=cfg, guidance_scale=guidance_scale, height=ctx.height, width=ctx.width,
                    image_embeds=image_embeds)
                parts.append((rows, out))
        return merge_rows(parts)

    def denoise_rows(self, model_input: torch.Tensor, timesteps: torch.Tensor, prompt: Any, *,
                     cfg: bool, guidance_scale: float | None, height: int, width: int,
                     image_embeds: list[torch.Tensor] | None) -> torch.Tensor:
        """The guided UNet output for these rows (already scaled for the scheduler; with
        ``cfg`` the image embeddings are ``[uncond; cond]`` already)."""
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, latents: torch.Tensor, schedule: Schedule,
             step_index: int) -> torch.Tensor:
        import torch

        batch = latents.shape[0]
        generators = None
        if self.stochastic_steps:
            generators = self._sample_generators.take(latents, self.name)
        latents = self.step_schedulers.first_step_latents(
            latents, (step_index,) * batch, (len(schedule),) * batch)
        with torch.no_grad():
            out = scheduler_step(schedule, model_output, latents, step_index, generators)
        if generators is not None and step_index + 1 < len(schedule):
            self._sample_generators.add(out.prev_sample, generators)
        return out.prev_sample

    def predict_x0(self, model_output: torch.Tensor, latents: torch.Tensor,
                   schedule: Schedule, step_index: int) -> torch.Tensor:
        import torch

        batch = latents.shape[0]
        latents = self.step_schedulers.first_step_latents(
            latents, (step_index,) * batch, (len(schedule),) * batch)
        with torch.no_grad():
            return predicted_x0(schedule, model_output, latents, step_index)


class DiffusersIPAdapter(Adapter):
    """An h94 IP-Adapter run through diffusers' native IP-Adapter support.

    ``load`` reads the weight file (safetensors, or the legacy ``.bin`` with
    ``weights_only=True``) and the CLIP image encoder once. ``attach`` installs it on a
    backbone's UNet (diffusers builds the modules on the first attach; later attaches move the
    same modules) and registers the image encoder and feature extractor on the pipeline;
    ``detach`` restores the UNet exactly. A reference is encoded once (:meth:`encode_reference`)
    and its embeddings are passed to the backbone at every step with per-layer scales.

    Options: ``weight_name`` (file inside the source, default :attr:`default_weight_name`),
    ``image_encoder_folder`` (default :attr:`default_image_encoder_folder`).
    """

    default_source = "h94/IP-Adapter"
    default_weight_name: ClassVar[str]
    default_image_encoder_folder: ClassVar[str]
    #: True for IP-Adapter Plus (penultimate hidden states), False for the projected embedding.
    uses_hidden_states: ClassVar[bool] = False
    option_names: ClassVar[tuple[str, ...]] = ("weight_name", "image_encoder_folder")
    supports_probes = True
    probe_quantity = "ip/text"

    def __init__(self, source: str | None = None, *, scale: float | None = None,
                 start: float = 0.0, end: float = 1.0, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        for key, value in options.items():
            if key not in self.option_names:
                raise InvalidArgumentError(
                    key, value, f"adapter {self.name!r} takes the options "
                                f"{', '.join(self.option_names)}")
        self._probe_rows: tuple[list[int], int] = ([], 0)
        super().__init__(source, scale=scale, start=start, end=end, device=device,
                         dtype=dtype, **options)
        self.weight_name = str(options.get("weight_name") or self.default_weight_name)
        self.image_encoder_folder = str(options.get("image_encoder_folder")
                                        or self.default_image_encoder_folder)
        self.state_dict: dict[str, dict[str, Any]] | None = None
        self.weight_file: str | None = None
        self.image_encoder: Any = None
        self.feature_extractor: Any = None
        self._modules: IPAdapterModules | None = None
        self._installed: InstalledIPAdapter | None = None
        self._layer_scales: dict[str, float] | None = None

    # -- loading ---------------------------------------------------------------------------
    def load_weights(self) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from adapterswap.weights import load_model

        encoder_config = f"{self.image_encoder_folder}/config.json"
        resolved = resolve_source(self.source, what=f"adapter {self.name!r}",
                                  required=(self.weight_name, encoder_config),
                                  how_to_get=self.how_to_get)
        what = f"adapter {self.name!r}"
        if resolved.local:
            weight_file = str(Path(resolved.source) / self.weight_name)
        else:
            from huggingface_hub import hf_hub_download

            weight_file = hf_hub_download(resolved.source, self.weight_name,
                                          local_files_only=resolved.local_files_only)
        state_dict = read_ip_adapter_file(weight_file, what=what)
        missing = missing_image_proj_keys(state_dict["image_proj"],
                                          plus=self.uses_hidden_states)
        if missing:
            raise WeightsNotFoundError(
                f"{what}: {weight_file!r} is incomplete: the image projection lacks "
                f"{_listed([f'image_proj.{k}' for k in missing])}")
        self.state_dict, self.weight_file = state_dict, weight_file
        self.image_encoder = load_model(
            CLIPVisionModelWithProjection, resolved.source, what=what,
            subfolder=self.image_encoder_folder, dtype=self.dtype,
            local_files_only=resolved.local_files_only).to(self.device).eval()
        # h94's encoder folders have no preprocessor config: diffusers then builds this one
        size = self.image_encoder.config.image_size
        self.feature_extractor = CLIPImageProcessor(size=size, crop_size=size)

    @classmethod
    def random(cls, backbone: Backbone, seed: int = 0, **kwargs: Any) -> DiffusersIPAdapter:
        """Random weights at the published size fitting ``backbone``'s UNet, with its image
        encoder (the ``random`` preset); the subclass supplies :meth:`random_weights`."""
        kwargs.setdefault("device", backbone.device)
        kwargs.setdefault("dtype", backbone.dtype)
        adapter = cls(**kwargs)
        adapter.state_dict, adapter.image_encoder, adapter.feature_extractor = \
            cls.random_weights(backbone.pipe.unet, adapter.device, adapter.dtype, seed + 1)
        adapter.loaded = True
        return adapter

    @staticmethod
    def random_weights(unet: Any, device: Any, dtype: Any, seed: int) -> tuple[Any, ...]:
        """(h94-style state dict, image encoder, image processor) with random weights at the
        published size for ``unet``."""
        raise UsageError("this IP-Adapter has no random (published-size) preset")

    # -- attach / detach -------------------------------------------------------------------
    def layer_scales(self, unet: Any) -> dict[str, float]:
        """Scale per IP processor at adapter scale 1 (all 1: a plain IP-Adapter)."""
        return block_scales(unet, 1.0)

    def _attach(self, backbone: Backbone) -> None:
        pipe = backbone.pipe
        layer_scales = self.layer_scales(pipe.unet)  # validate before touching the UNet
        what, where = f"adapter {self.name!r}", str(self.weight_file or self.source)
        if self._modules is None:
            check_ip_layers(self.state_dict["ip_adapter"], pipe.unet, what=what, where=where)
        self.image_encoder.to(device=backbone.device, dtype=backbone.dtype)
        try:
            self._modules, self._installed = install_ip_adapter(
                pipe, self.state_dict, image_encoder=self.image_encoder,
                feature_extractor=self.feature_extractor, modules=self._modules)
        except (KeyError, RuntimeError, ValueError) as exc:  # diffusers building the modules
            if isinstance(exc, UsageError):
                raise
            from adapterswap.weights import first_line

            raise WeightsNotFoundError(
                f"{what}: {where!r} does not fit backbone {backbone.name!r}'s UNet "
                f"({type(exc).__name__}: {first_line(exc)})") from None
        self._layer_scales = layer_scales
        self._install_probe_hooks(backbone)

    def _detach(self, backbone: Backbone) -> None:
        self._install_probe_hooks(None)
        if self._installed is not None:
            uninstall_ip_adapter(self._installed)
        self._installed = None
        self._layer_scales = None

    # -- probes ----------------------------------------------------------------------------
    def set_probe(self, recorder: Any) -> None:
        """Measure ``ip/text`` (``||scale * IP attention|| / ||text attention||``) in every
        IP layer with a non-zero scale, one value per sample; samples outside the adapter's
        window record 0 (the adapter adds nothing there)."""
        super().set_probe(recorder)
        self._install_probe_hooks(self.attached_to)

    def _make_probe_hooks(self, backbone: Backbone) -> ProbeHooks:
        return ProbeHooks(backbone.pipe.unet, self._record_probe)

    def _record_probe(self, layer: str, values: Any) -> None:
        """Spread one UNet forward's values (the active rows, ``[uncond; cond]`` with CFG) over
        the batch ``predict`` got: the conditional rows where active, 0 elsewhere."""
        rows, batch = self._probe_rows
        if self.probe is None or not rows:
            return
        values = values.detach().float().cpu().reshape(-1)[-len(rows):].tolist()
        full = [0.0] * batch
        for row, value in zip(rows, values):
            full[row] = value
        self.probe.record(layer, self.probe_quantity, full)

    # -- reference / steps -----------------------------------------------------------------
    def encode_reference(self, image: Any, backbone: Backbone) -> TensorBundle:
        """CLIP embeddings of the reference and of the unconditional input, as diffusers'
        ``encode_image`` makes them: the projected image embedding and zeros, or (Plus) the
        penultimate hidden states of the image and of an all-zero image. Shape ``(1, 1, ...)``
        (one row, one image)."""
        import torch

        from adapterswap.denoise import TensorBundle

        picture = load_image(image)
        if not self.loaded:
            self.load()
        encoder = self.image_encoder
        param = next(encoder.parameters())
        pixels = self.feature_extractor(picture, return_tensors="pt").pixel_values
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            if self.uses_hidden_states:
                cond = encoder(pixels, output_hidden_states=True).hidden_states[-2]
                uncond = encoder(torch.zeros_like(pixels),
                                 output_hidden_states=True).hidden_states[-2]
            else:
                cond = encoder(pixels).image_embeds
                uncond = torch.zeros_like(cond)
        device = backbone.device or param.device
        dtype = backbone.dtype or param.dtype
        return TensorBundle({"image_embeds": cond[:, None].to(device=device, dtype=dtype),
                             "negative_image_embeds": uncond[:, None].to(device=device,
                                                                         dtype=dtype)})

    def denoiser_inputs(self, backbone: Backbone, conditioning: TensorBundle,
                        latents: torch.Tensor, ctx: StepContext,
                        prompt: TensorBundle) -> dict[str, Any]:
        if self._layer_scales is None or self.attached_to is not backbone:
            raise UsageError(f"adapter {self.name!r} is not attached to backbone "
                             f"{backbone.name!r}: call adapter.attach(backbone) first")
        batch = latents.shape[0]
        if conditioning.batch_size == 1 and batch > 1:
            conditioning = conditioning.repeat(batch)
        active = {name: scale * self.scale for name, scale in self._layer_scales.items()}
        mask = self.active_mask(ctx)
        self._probe_rows = ([row for row, on in enumerate(mask) if on], batch)
        return {
            "ip_adapter_image_embeds": [conditioning["image_embeds"]],
            "negative_ip_adapter_image_embeds": [conditioning["negative_image_embeds"]],
            "ip_adapter_scales": [active if on else None for on in mask],
        }
