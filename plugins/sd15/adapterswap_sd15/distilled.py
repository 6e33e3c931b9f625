"""Distilled Stable Diffusion 1.5 backbones beyond LCM-LoRA, each run as its model card runs it.

* ``sd15-hyper``: a Hyper-SD N-step LoRA (``ByteDance/Hyper-SD``,
  ``Hyper-SD15-8steps-lora.safetensors`` by default; the 4- and 2-step files too) fused into
  SD 1.5; DDIM with "trailing" timesteps (the card:
  ``DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")``), no
  guidance, 8 steps (4 with the 4-step file).

It runs ``StableDiffusionPipeline``'s steps one at a time (:class:`SD15Backbone`); the parity
test holds :func:`adapterswap.denoise.denoise` to the card's own pipeline call. The safety
checker is not loaded, as for ``sd15``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterswap.kit.lora import FusedLoRA, LoRAStepFiles
from adapterswap.kit.tiny import build_once
from adapterswap.kit.unet_backbone import UNetBackbone
from adapterswap_sd15.backbones import SD15Backbone, tiny_sd15_dir

HYPER_SD = "ByteDance/Hyper-SD"
HYPER_SD15_8STEP = "Hyper-SD15-8steps-lora.safetensors"
HYPER_SD15_4STEP = "Hyper-SD15-4steps-lora.safetensors"
#: Hyper-SD15 LoRA files in ByteDance/Hyper-SD, by the step count they were distilled for.
HYPER_SD15_FILES: dict[int, str] = {8: HYPER_SD15_8STEP, 4: HYPER_SD15_4STEP}


class SD15HyperBackbone(LoRAStepFiles, FusedLoRA, SD15Backbone):
    """Hyper-SD (Ren et al., arXiv 2404.13686) N-step LoRA on SD 1.5: DDIM with "trailing"
    timesteps, no guidance, 8 steps with the default 8-step LoRA.

    ``source`` is the SD 1.5 pipeline. Options: ``lora`` (a Hub repo id, a local directory,
    the ``.safetensors`` file itself, or ``None`` when ``source`` has it fused already;
    default ``ByteDance/Hyper-SD``), ``lora_steps`` (8 or 4: the file distilled for that many
    steps, and this instance's default step count), ``lora_file`` (any other file name; not
    both; default ``Hyper-SD15-8steps-lora.safetensors``; the 2-step file loads too, with
    its 2 steps passed by the caller), ``variant``, ``timestep_spacing`` (default
    "trailing", the card's). An instance whose LoRA file is one of :data:`HYPER_SD15_FILES`
    (by ``lora_steps``, ``lora_file`` or the name of the file ``lora`` gives) runs at that
    file's step count by default, as the card does; a sweep keeps the class's grid up to 8
    steps (pass ``--steps``). The 1-step "unified" LoRA is meant for ``TCDScheduler`` and is
    not this recipe. The LoRA is fused into the UNet and its layers removed.
    """

    name = "sd15-hyper"
    lora_repo, lora_file = HYPER_SD, HYPER_SD15_8STEP
    lora_step_files = HYPER_SD15_FILES
    lora_title, lora_model = "Hyper-SD LoRA", "an SD 1.5 LoRA"
    default_steps = 8
    guidance_mode = "none"
    default_guidance_scale = None
    option_docs = {
        "lora": "where the Hyper-SD LoRA comes from: a Hub repo id, a local directory, the "
                ".safetensors file, or None when the source has it fused (default "
                "ByteDance/Hyper-SD)",
        "lora_steps": "8 or 4: the Hyper-SD15 file distilled for that many steps, and this "
                      "instance's default step count (default 8)",
        "lora_file": f"the LoRA file inside it (default {HYPER_SD15_8STEP}; "
                     f"{HYPER_SD15_4STEP} runs at 4 steps by default)",
        **SD15Backbone.option_docs,
    }
    how_to_get = ("Needs SD 1.5 (`hf download stable-diffusion-v1-5/stable-diffusion-v1-5`, "
                  f"CreativeML OpenRAIL-M) and the Hyper-SD LoRA (`hf download {HYPER_SD} "
                  f"{HYPER_SD15_8STEP}` or the 4-step file, OpenRAIL++), or local copies.")
    description = "Hyper-SD 8-step (or 4-step) LoRA on Stable Diffusion 1.5 (trailing DDIM)"

    def configure_pipeline(self, pipe: Any) -> Any:
        """DDIM from the repo's scheduler config with "trailing" timesteps, exactly the card's
        call (``sd15``'s own DDIM settings are not applied: the card's DDIM takes
        ``clip_sample`` and the rest from the repo's config); the ``timestep_spacing`` option,
        applied after, can change the spacing."""
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config,
                                                   timestep_spacing="trailing")
        return UNetBackbone.configure_pipeline(self, pipe)

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None,
             **options: Any) -> SD15HyperBackbone:
        """The tiny SD 1.5 pipeline plus tiny 8- and 4-step "Hyper-SD" LoRAs (random, one
        each) in the published key layout (``lora_unet_*`` with ``lora_down`` / ``lora_up`` /
        ``alpha``: :mod:`adapterswap.kit.tiny_lora`), fused through ``load``."""
        options = cls.check_options(options)  # before building anything
        from adapterswap.presets import tiny_dir

        base = tiny_sd15_dir(seed, cache_dir)

        def build(tmp: Path) -> None:
            from diffusers import UNet2DConditionModel

            from adapterswap.kit.tiny_lora import save_tiny_unet_lora

            unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
            for offset, filename in enumerate((HYPER_SD15_8STEP, HYPER_SD15_4STEP), start=1):
                save_tiny_unet_lora(unet, tmp / filename, seed + offset, layout="kohya")

        lora_dir = build_once(tiny_dir("sd15-hyper-lora", seed, cache_dir), build)
        options.setdefault("lora", str(lora_dir))
        backbone = cls(str(base), device="cpu", dtype="fp32", **options).load()
        backbone.default_height, backbone.default_width = cls.tiny_size
        return backbone


