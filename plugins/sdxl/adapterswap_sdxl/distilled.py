"""Distilled SDXL backbones, each run as its model card runs it (guidance off in every one).

* ``sdxl-turbo``: ``stabilityai/sdxl-turbo`` (adversarial diffusion distillation), a whole
  pipeline with the scheduler its repo ships: ``EulerAncestralDiscreteScheduler`` with
  "trailing" timesteps. 1 step by default (the card: 1-4), 512 x 512 px.
* ``sdxl-hyper``: a Hyper-SD LoRA (``ByteDance/Hyper-SD``, ``Hyper-SDXL-8steps-lora.safetensors``
  or ``Hyper-SDXL-4steps-lora.safetensors``) fused into SDXL base; DDIM with "trailing"
  timesteps (the card: ``DDIMScheduler.from_config(config, timestep_spacing="trailing")``),
  8 or 4 steps as the file was distilled for.
* ``sdxl-dmd2``: DMD2's 4-step UNet (``tianweiy/DMD2``, ``dmd2_sdxl_4step_unet_fp16.bin``, a
  pickled state dict read with ``torch.load(weights_only=True)``) in the SDXL-base pipeline;
  ``LCMScheduler`` with the card's timesteps [999, 749, 499, 249] (:func:`dmd2_timesteps`).
* ``sdxl-tcd``: the TCD LoRA (``h1t/TCD-SDXL-LoRA``) fused into SDXL base, ``TCDScheduler``
  with ``eta`` 0.3, 4 steps.

Each runs ``StableDiffusionXLPipeline``'s steps one at a time (:class:`SDXLBackbone`); the
parity tests hold :func:`adapterswap.denoise.denoise` to the card's own pipeline call. Samplers
that draw noise at every step (ancestral Euler, LCM, TCD with eta > 0) get each sample's own
generator (:func:`adapterswap.kit.schedules.injects_noise`), so a batch of seeds gives what
each seed gives alone.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, ClassVar

from adapterswap.errors import InvalidArgumentError
from adapterswap.kit.lora import FusedLoRA, LoRAStepFiles
from adapterswap.kit.tiny import build_once
from adapterswap.kit.unet_backbone import UNetBackbone
from adapterswap_sdxl.backbones import SDXLBackbone, SDXLLightningBackbone, tiny_sdxl_dir

SDXL_TURBO = "stabilityai/sdxl-turbo"
HYPER_SD = "ByteDance/Hyper-SD"
HYPER_SDXL_8STEP = "Hyper-SDXL-8steps-lora.safetensors"
HYPER_SDXL_4STEP = "Hyper-SDXL-4steps-lora.safetensors"
#: Hyper-SDXL LoRA files in ByteDance/Hyper-SD, by the step count they were distilled for.
HYPER_SDXL_FILES: dict[int, str] = {8: HYPER_SDXL_8STEP, 4: HYPER_SDXL_4STEP}
DMD2 = "tianweiy/DMD2"
DMD2_UNET = "dmd2_sdxl_4step_unet_fp16.bin"
TCD_SDXL = "h1t/TCD-SDXL-LoRA"
TCD_LORA_FILE = "pytorch_lora_weights.safetensors"
#: The TCD card's ``eta`` ("gamma" in the paper): 0 is deterministic, 1 fully stochastic.
TCD_ETA = 0.3

_BASE_HOW_TO_GET = ("Needs SDXL base (`hf download stabilityai/stable-diffusion-xl-base-1.0`, "
                    "CreativeML Open RAIL++-M)")


# --------------------------------------------------------------------------------- SDXL-Turbo
class SDXLTurboBackbone(SDXLBackbone):
    """SDXL-Turbo (Sauer et al., "Adversarial Diffusion Distillation"): the whole pipeline,
    its ancestral Euler sampler with "trailing" timesteps, no guidance, 1 step at 512 px.

    ``source`` is the SDXL-Turbo pipeline. Options: ``variant`` (``"fp16"`` for the repo's
    half-precision files), ``timestep_spacing`` (default "trailing", the card's).
    """

    name = "sdxl-turbo"
    default_source = SDXL_TURBO
    default_steps = 1
    guidance_mode = "none"
    default_guidance_scale = None
    default_height = 512
    default_width = 512
    how_to_get = ("Accept the Stability AI Non-Commercial Research Community licence and run "
                  "`hf download stabilityai/sdxl-turbo`, or pass a local copy as source.")
    description = "SDXL-Turbo (1-4 ancestral Euler steps, no guidance, 512 px)"

    def configure_pipeline(self, pipe: Any) -> Any:
        """``EulerAncestralDiscreteScheduler`` with "trailing" timesteps: what the repo ships
        (``scheduler/scheduler_config.json``) and the diffusers docs prescribe; set here too so
        a copy with another scheduler runs the card's."""
        from diffusers import EulerAncestralDiscreteScheduler

        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing")
        return super().configure_pipeline(pipe)

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None,
             **options: Any) -> SDXLTurboBackbone:
        """A tiny SDXL pipeline saved with SDXL-Turbo's scheduler (ancestral Euler,
        "trailing"), loaded through ``load`` as the real repo is."""
        options = cls.check_options(options)  # before building anything
        from adapterswap.presets import tiny_dir

        source = build_once(tiny_dir(cls.name, seed, cache_dir),
                            lambda tmp: save_tiny_turbo_pipeline(tmp, seed))
        backbone = cls(str(source), device="cpu", dtype="fp32", **options).load()
        backbone.default_height, backbone.default_width = cls.tiny_size
        return backbone


def save_tiny_turbo_pipeline(path: Path, seed: int) -> Path:
    """The tiny SDXL pipeline (:mod:`adapterswap_sdxl.tiny`) with SDXL-Turbo's scheduler,
    saved in diffusers' layout at ``path``."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from adapterswap.kit.tiny import save_pipeline
    from adapterswap_sdxl.tiny import SDXL_SCHEDULER_CONFIG, tiny_sdxl_components

    components = tiny_sdxl_components(seed)
    components["scheduler"] = EulerAncestralDiscreteScheduler(
        num_train_timesteps=SDXL_SCHEDULER_CONFIG["num_train_timesteps"],
        beta_start=SDXL_SCHEDULER_CONFIG["beta_start"],
        beta_end=SDXL_SCHEDULER_CONFIG["beta_end"],
        beta_schedule=SDXL_SCHEDULER_CONFIG["beta_schedule"],
        prediction_type="epsilon", steps_offset=1, timestep_spacing="trailing")
    return save_pipeline(StableDiffusionXLPipeline(**components), path)


# ------------------------------------------------------------------------ LoRAs on SDXL base
class SDXLLoRABackbone(FusedLoRA, SDXLBackbone):
    """SDXL base with a distilled LoRA fused into its UNet (:mod:`adapterswap.kit.lora`);
    a subclass names the LoRA (:attr:`lora_repo`, :attr:`lora_file`) and sets the card's
    scheduler in :meth:`configure_pipeline`.

    ``source`` is the SDXL-base pipeline. Options: ``lora`` (a Hub repo id, a local directory,
    the ``.safetensors`` file itself, or ``None`` when ``source`` has the LoRA fused already),
    ``lora_file`` (the file inside it), ``variant``.
    """

    guidance_mode = "none"
    default_guidance_scale = None
    lora_model = "an SDXL LoRA"
    #: Files the tiny preset writes into its LoRA directory (the published names).
    tiny_lora_files: ClassVar[tuple[str, ...]]

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None,
             **options: Any) -> SDXLLoRABackbone:
        """The tiny SDXL pipeline plus tiny LoRAs (:attr:`tiny_lora_files`, one random LoRA
        each) in the published key layout (``lora_unet_*`` with ``lora_down`` / ``lora_up``
        / ``alpha``: :mod:`adapterswap.kit.tiny_lora`), fused through ``load``."""
        options = cls.check_options(options)  # before building anything
        from adapterswap.presets import tiny_dir

        base = tiny_sdxl_dir(seed, cache_dir)

        def build(tmp: Path) -> None:
            from diffusers import UNet2DConditionModel

            from adapterswap.kit.tiny_lora import save_tiny_unet_lora

            unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
            for offset, filename in enumerate(cls.tiny_lora_files, start=1):
                save_tiny_unet_lora(unet, tmp / filename, seed + offset, layout="kohya")

        lora_dir = build_once(tiny_dir(f"{cls.name}-lora", seed, cache_dir), build)
        options.setdefault("lora", str(lora_dir))
        backbone = cls(str(base), device="cpu", dtype="fp32", **options).load()
        backbone.default_height, backbone.default_width = cls.tiny_size
        return backbone


class SDXLHyperBackbone(LoRAStepFiles, SDXLLoRABackbone):
    """Hyper-SD (Ren et al., arXiv 2404.13686) N-step LoRA on SDXL base: DDIM with
    "trailing" timesteps, no guidance, 8 steps with the default 8-step LoRA.

    Options: ``lora`` (default ``ByteDance/Hyper-SD``), ``lora_steps`` (8 or 4: the file
    distilled for that many steps, and this instance's default step count), ``lora_file``
    (any other file name; not both; default ``Hyper-SDXL-8steps-lora.safetensors``),
    ``variant``, ``timestep_spacing`` (default "trailing", the card's). An instance whose LoRA
    file is one of :data:`HYPER_SDXL_FILES` (by ``lora_steps``, ``lora_file`` or the name of
    the file ``lora`` gives) runs at that file's step count by default, as the card does; a
    sweep keeps the class's grid up to 8 steps (pass ``--steps``).
    """

    name = "sdxl-hyper"
    default_steps = 8
    lora_repo = HYPER_SD
    lora_file = HYPER_SDXL_8STEP
    lora_step_files = HYPER_SDXL_FILES
    tiny_lora_files = (HYPER_SDXL_8STEP, HYPER_SDXL_4STEP)
    option_docs = {
        "lora": "where the Hyper-SD LoRA comes from: a Hub repo id, a local directory, the "
                ".safetensors file, or None when the source has it fused (default "
                "ByteDance/Hyper-SD)",
        "lora_steps": "8 or 4: the Hyper-SDXL file distilled for that many steps, and this "
                      "instance's default step count (default 8)",
        "lora_file": f"the LoRA file inside it (default {HYPER_SDXL_8STEP}; "
                     f"{HYPER_SDXL_4STEP} runs at 4 steps by default)",
        **SDXLBackbone.option_docs,
    }
    how_to_get = (f"{_BASE_HOW_TO_GET} and the Hyper-SD LoRA (`hf download {HYPER_SD} "
                  f"{HYPER_SDXL_8STEP}` or the 4-step file, OpenRAIL++), or local copies.")
    description = "Hyper-SD 8-step (or 4-step) LoRA on SDXL base (trailing DDIM, no guidance)"

    def configure_pipeline(self, pipe: Any) -> Any:
        """DDIM from the repo's scheduler config with "trailing" timesteps, as the card sets
        it (the ``timestep_spacing`` option, applied after, can change the spacing)."""
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config,
                                                   timestep_spacing="trailing")
        return super().configure_pipeline(pipe)


class SDXLTCDBackbone(SDXLLoRABackbone):
    """TCD (Zheng et al., "Trajectory Consistency Distillation", arXiv 2402.19159) LoRA on
    SDXL base: ``TCDScheduler``, ``eta`` 0.3, no guidance, 4 steps.

    Options: ``lora`` (default ``h1t/TCD-SDXL-LoRA``), ``lora_file`` (default
    ``pytorch_lora_weights.safetensors``), ``eta`` (0 to 1, default 0.3; the card: higher
    with more steps, at the cost of blur), ``variant``.
    """

    name = "sdxl-tcd"
    default_steps = 4
    lora_repo = TCD_SDXL
    lora_file = TCD_LORA_FILE
    tiny_lora_files = (TCD_LORA_FILE,)
    option_docs = {
        "lora": "where the TCD LoRA comes from: a Hub repo id, a local directory, the "
                ".safetensors file, or None when the source has it fused (default "
                "h1t/TCD-SDXL-LoRA)",
        "lora_file": f"the LoRA file inside it (default {TCD_LORA_FILE})",
        "eta": f"TCD's stochasticity ('gamma' in the paper) from 0 (deterministic) to 1 "
               f"(default {TCD_ETA}, the card's)",
        "variant": SDXLBackbone.option_docs["variant"],
    }
    unsupported_options = {
        "timestep_spacing": "TCDScheduler ignores it: its timesteps come from its 50-step "
                            "distillation schedule and start at t=999 at every step count",
    }
    #: TCDScheduler refuses more steps than its distillation schedule has
    #: (``original_inference_steps``, 50).
    max_steps = 50
    how_to_get = (f"{_BASE_HOW_TO_GET} and the TCD LoRA (`hf download {TCD_SDXL} "
                  f"{TCD_LORA_FILE}`, MIT), or local copies.")
    description = "TCD LoRA on SDXL base (4 TCD steps, eta 0.3, no guidance)"

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        if name == "eta":
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise InvalidArgumentError(name, value, "must be a number from 0 to 1")
            return float(value)
        return super().check_option(name, value)

    def configure_pipeline(self, pipe: Any) -> Any:
        """``TCDScheduler.from_config`` of the repo's scheduler config, as the card sets it,
        stepping with the ``eta`` option (:func:`tcd_scheduler_class`)."""
        eta = self.options.get("eta", TCD_ETA)
        pipe.scheduler = tcd_scheduler_class(eta).from_config(pipe.scheduler.config)
        return super().configure_pipeline(pipe)


@functools.cache
def tcd_scheduler_class(default_eta: float) -> type:
    """diffusers' ``TCDScheduler`` whose ``step`` takes ``eta=default_eta`` when not told
    otherwise (the engine calls ``step`` without it; :func:`~adapterswap.kit.schedules.
    injects_noise` reads the default, so eta 0 is deterministic) and also returns its clean
    estimate as ``pred_original_sample`` (the engine's predicted x0). It keeps diffusers'
    class name, so rules keyed on it (first-step sharing) apply."""
    from diffusers import TCDScheduler as DiffusersTCDScheduler

    class TCDScheduler(DiffusersTCDScheduler):
        def step(self, model_output: Any, timestep: Any, sample: Any, eta: float = default_eta,
                 generator: Any = None, return_dict: bool = True) -> Any:
            alpha = self.alphas_cumprod[timestep]  # x0 as TCD computes it inside step()
            kind = self.config.prediction_type
            if kind == "epsilon":
                x0 = (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
            elif kind == "v_prediction":
                x0 = alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
            else:
                x0 = model_output
            out = super().step(model_output, timestep, sample, eta=eta, generator=generator,
                               return_dict=True)
            if not return_dict:
                return out.prev_sample, out.pred_noised_sample
            out.pred_original_sample = x0
            return out

    return TCDScheduler


# ------------------------------------------------------------------------------------- DMD2
class SDXLDMD2Backbone(SDXLLightningBackbone):
    """DMD2 (Yin et al., "Improved Distribution Matching Distillation", arXiv 2405.14867):
    its 4-step UNet in the SDXL-base pipeline, ``LCMScheduler`` at the card's timesteps
    [999, 749, 499, 249], no guidance, 4 steps. Other step counts use the generator's training
    grid rule (:func:`dmd2_timesteps`).

    ``source`` is the SDXL-base pipeline (its UNet weights are not read). Options: ``unet``
    (a Hub repo id, a local directory or the file itself; default ``tianweiy/DMD2``),
    ``unet_file`` (default ``dmd2_sdxl_4step_unet_fp16.bin``, a pickled state dict read with
    ``torch.load(weights_only=True)``; a ``.safetensors`` file with the same keys is read as
    safetensors), ``variant``.
    """

    name = "sdxl-dmd2"
    default_steps = 4
    unet_repo = DMD2
    unet_filename = DMD2_UNET
    option_docs = {
        "unet": "where the DMD2 UNet comes from: a Hub repo id, a local directory or the "
                "file (default tianweiy/DMD2)",
        "unet_file": f"the UNet file inside it (default {DMD2_UNET}; .bin files are read "
                     "with torch.load(weights_only=True), .safetensors as safetensors)",
        "variant": SDXLBackbone.option_docs["variant"],
    }
    unsupported_options = {
        "timestep_spacing": "DMD2 runs at its own timesteps (999 - k * (1000 // N), the "
                            "card's [999, 749, 499, 249] at 4 steps)",
    }
    how_to_get = (f"{_BASE_HOW_TO_GET} and the DMD2 UNet (`hf download {DMD2} {DMD2_UNET}`, "
                  "CC BY-NC 4.0: non-commercial), or local copies.")
    description = "DMD2 4-step UNet on SDXL base (LCM sampler at 999/749/499/249, no guidance)"

    def configure_pipeline(self, pipe: Any) -> Any:
        """``LCMScheduler.from_config`` of the repo's scheduler config, as the card sets it,
        with the card's timesteps for every step count (:func:`dmd2_scheduler_class`)."""
        pipe.scheduler = dmd2_scheduler_class().from_config(pipe.scheduler.config)
        return UNetBackbone.configure_pipeline(self, pipe)


def dmd2_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DMD2's timesteps for ``num_inference_steps`` = N: ``t_k = 999 - k * (1000 // N)`` for
    k < N, the first N of the generator's training grid (``denoising_step_list =
    range(999, 0, -(1000 // N))`` in the DMD2 code). At N = 4 that is the card's
    [999, 749, 499, 249]; at N = 1, [999]."""
    if num_inference_steps < 1 or num_inference_steps > num_train_timesteps:
        raise InvalidArgumentError("num_inference_steps", num_inference_steps,
                                   f"must be from 1 to {num_train_timesteps}")
    interval = num_train_timesteps // num_inference_steps
    return [num_train_timesteps - 1 - k * interval for k in range(num_inference_steps)]


@functools.cache
def dmd2_scheduler_class() -> type:
    """diffusers' ``LCMScheduler`` whose ``set_timesteps(N)`` sets :func:`dmd2_timesteps`
    (N), as the card passes ``timesteps=[999, 749, 499, 249]`` to the pipeline; explicit
    ``timesteps`` pass through. LCM's warning that these are off its 50-step grid is muted:
    they are DMD2's own. It keeps diffusers' class name, so rules keyed on it (LCM draws
    noise at every step; first-step sharing) apply."""
    import logging

    from diffusers import LCMScheduler as DiffusersLCMScheduler

    class LCMScheduler(DiffusersLCMScheduler):
        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                          original_inference_steps: int | None = None,
                          timesteps: list[int] | None = None, strength: float = 1.0) -> None:
            if timesteps is None and num_inference_steps is not None:
                timesteps = dmd2_timesteps(num_inference_steps,
                                           self.config.num_train_timesteps)
                num_inference_steps = None
            lcm_logger = logging.getLogger(DiffusersLCMScheduler.__module__)
            level = lcm_logger.level
            lcm_logger.setLevel(logging.ERROR)
            try:
                super().set_timesteps(num_inference_steps, device, original_inference_steps,
                                      timesteps, strength)
            finally:
                lcm_logger.setLevel(level)

    return LCMScheduler
