"""Stable Diffusion 1.5 backbones: SD 1.5 with classifier-free guidance, and LCM-LoRA on it.

Both run ``StableDiffusionPipeline``'s steps one at a time (see :class:`UNetBackbone`); the parity
tests hold :func:`adapterswap.denoise.denoise` to the pipeline's own output.

* ``sd15``: ``stable-diffusion-v1-5/stable-diffusion-v1-5``, guidance 7.5, 50 DDIM steps. DDIM
  (eta 0, no x0 clipping) is the sampler the IP-Adapter authors use with SD 1.5; the repo's own
  PNDM scheduler evaluates the UNet N + 1 times for N steps, which does not fit one evaluation per
  step.
* ``sd15-lcm``: ``latent-consistency/lcm-lora-sdv1-5`` fused into SD 1.5, ``LCMScheduler``,
  4 steps, guidance 1.0 (off). The LCM-LoRA card: "either disable guidance_scale or use values
  between 1.0 and 2.0"; values above 1 turn classifier-free guidance on. With ``lora=None`` the
  source itself is an LCM-distilled checkpoint; when its UNet has ``time_cond_proj_dim`` (LCM
  Dreamshaper) guidance goes in as the w-embedding instead of CFG, as diffusers does.

The safety checker is not loaded (``safety_checker=None``): it would black out images, which
corrupts image metrics; check outputs yourself where that matters.

``predict`` takes the object IP-Adapter's inputs as an
:class:`~adapterswap.kit.ip_adapter_inputs.IPAdapterInputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError
from adapterswap.kit.guidance import guided, uses_cfg
from adapterswap.kit.lora import FusedLoRA
from adapterswap.kit.tiny import build_once
from adapterswap.kit.unet_backbone import UNetBackbone
from adapterswap_sd15.tiny import TINY_SIZE

if TYPE_CHECKING:
    import torch

    from adapterswap.denoise import TensorBundle

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"

_PIPELINE_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors|unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
)


def tiny_sd15_dir(seed: int, cache_dir: str | None) -> Path:
    """The tiny SD 1.5 pipeline (:mod:`adapterswap_sd15.tiny`) saved in diffusers' layout,
    built once."""
    from adapterswap.presets import tiny_dir
    from adapterswap_sd15.tiny import save_tiny_pipeline

    return build_once(tiny_dir("sd15", seed, cache_dir),
                      lambda tmp: save_tiny_pipeline("sd15", tmp, seed))


class SD15Backbone(UNetBackbone):
    """Stable Diffusion 1.5: CFG 7.5, 50 DDIM steps, 512 px.

    Options: ``variant`` (e.g. ``"fp16"`` for the repo's half-precision files),
    ``timestep_spacing`` (default the repo's "leading"; "trailing" starts every step count at
    t = 999, where "leading" starts N = 1 at t = 1).
    """

    name = "sd15"
    family = "sd15"
    default_source = SD15
    default_steps = 50
    guidance_mode = "cfg"
    default_guidance_scale = 7.5
    default_height = 512
    default_width = 512
    #: ``(height, width)`` of the tiny preset's images (:mod:`adapterswap_sd15.tiny`).
    tiny_size = TINY_SIZE
    required_files = _PIPELINE_FILES
    default_adapter = "object-ip-adapter"
    how_to_get = ("Accept the CreativeML OpenRAIL-M licence and run `hf download "
                  "stable-diffusion-v1-5/stable-diffusion-v1-5`, or pass a local copy as source.")
    description = "Stable Diffusion 1.5 (CFG 7.5, 50 DDIM steps)"

    def load_pipeline(self, source: str, *, local_files_only: bool) -> Any:
        from diffusers import StableDiffusionPipeline

        pipe = self.from_pretrained(StableDiffusionPipeline, source,
                                    local_files_only=local_files_only, safety_checker=None,
                                    requires_safety_checker=False)
        return self.configure_pipeline(pipe).to(self.device)

    def configure_pipeline(self, pipe: Any) -> Any:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        return super().configure_pipeline(pipe)

    @staticmethod
    def random_pipeline(device: Any, dtype: Any, seed: int) -> Any:
        """The pipeline at the published size with random weights (``random`` preset)."""
        from adapterswap_sd15.published import random_sd15_pipeline

        return random_sd15_pipeline(device, dtype, seed)

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None,
             **options: Any) -> SD15Backbone:
        """Tiny random SD 1.5 (64 px) saved in diffusers' layout and loaded through ``load``."""
        options = cls.check_options(options)  # before building anything
        backbone = cls(str(tiny_sd15_dir(seed, cache_dir)), device="cpu", dtype="fp32",
                       **options).load()
        backbone.default_height, backbone.default_width = cls.tiny_size
        return backbone

    # -- pipeline steps --------------------------------------------------------------------
    def uses_cfg(self, guidance_scale: float | None) -> bool:
        """CFG above 1, unless the UNet takes guidance as an embedding (LCM-distilled)."""
        return uses_cfg(guidance_scale) and self.pipe.unet.config.time_cond_proj_dim is None

    def encode_prompt(self, prompts: Sequence[str], *, guidance_scale: float | None = None,
                      negative_prompts: Sequence[str] | None = None) -> TensorBundle:
        """The CLIP text encoder's last hidden states, as
        ``StableDiffusionPipeline.encode_prompt``; with guidance, the negative prompts' (empty
        by default)."""
        import torch

        from adapterswap.denoise import TensorBundle

        self.require_loaded()
        prompts = list(prompts)
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise InvalidArgumentError("negative_prompts", list(negative_prompts),
                                       f"need one per prompt ({len(prompts)})")
        cfg = self.uses_cfg(guidance_scale)
        with torch.no_grad():
            embeds, negative = self.pipe.encode_prompt(
                prompts, self.device, 1, cfg,
                negative_prompt=list(negative_prompts) if negative_prompts else None)
        return TensorBundle({"prompt_embeds": embeds,
                             "negative_prompt_embeds": negative if cfg else None})

    def denoise_rows(self, model_input: torch.Tensor, timesteps: torch.Tensor, prompt: Any, *,
                     cfg: bool, guidance_scale: float | None, height: int, width: int,
                     image_embeds: list[torch.Tensor] | None) -> torch.Tensor:
        import torch

        embeds = prompt["prompt_embeds"]
        if cfg:  # [uncond; cond], as the pipeline batches them
            embeds = torch.cat([prompt["negative_prompt_embeds"], embeds])
            model_input = torch.cat([model_input, model_input])
            timesteps = torch.cat([timesteps, timesteps])
        timestep_cond = None
        proj_dim = self.pipe.unet.config.time_cond_proj_dim
        if proj_dim is not None:  # LCM-distilled UNet: guidance as the w-embedding
            key = (guidance_scale, model_input.shape[0], proj_dim, model_input.dtype)
            cache = self.__dict__.setdefault("_w_embeddings", {})
            if key not in cache:  # once: a host-to-device copy every step syncs the loop
                w = torch.tensor((guidance_scale or 1.0) - 1).repeat(model_input.shape[0])
                cache[key] = self.pipe.get_guidance_scale_embedding(
                    w, embedding_dim=proj_dim).to(device=self.device, dtype=model_input.dtype)
            timestep_cond = cache[key]
        added = {"image_embeds": image_embeds} if image_embeds is not None else None
        noise = self.pipe.unet(model_input, timesteps, encoder_hidden_states=embeds,
                               timestep_cond=timestep_cond, added_cond_kwargs=added,
                               return_dict=False)[0]
        return guided(noise, guidance_scale) if cfg else noise

    def decode(self, latents: torch.Tensor, *, height: int, width: int,
               output_type: str = "pil") -> Any:
        """The pipeline's decode (latents divided by the VAE's scaling factor)."""
        import torch

        self.require_loaded()
        if output_type not in ("pil", "np", "pt"):
            raise InvalidArgumentError("output_type", output_type, "choose pil, np or pt")
        vae = self.pipe.vae
        with torch.no_grad():
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor,
                               return_dict=False)[0]
            return self.pipe.image_processor.postprocess(
                image, output_type=output_type, do_denormalize=[True] * image.shape[0])


class SD15LCMBackbone(FusedLoRA, SD15Backbone):
    """LCM-LoRA (Luo et al., arXiv 2311.05556) on SD 1.5: ``LCMScheduler``, 4 steps, guidance
    1.0 (off; the authors allow 1.0-2.0).

    ``source`` is the SD 1.5 pipeline. Options: ``lora`` (where the LCM-LoRA comes from: a Hub
    repo id, a local directory, the ``.safetensors`` file itself, or ``None`` when ``source`` is
    already LCM-distilled; default ``latent-consistency/lcm-lora-sdv1-5``), ``lora_file`` (file
    name inside it, default ``pytorch_lora_weights.safetensors``), ``variant``. The LoRA is fused
    into the UNet and its layers removed, so the UNet is a plain one with merged weights.
    """

    name = "sd15-lcm"
    lora_repo, lora_file = LCM_LORA, LCM_LORA_FILE
    lora_title, lora_model = "LCM-LoRA", "an SD 1.5 LoRA"
    default_steps = 4
    default_guidance_scale = 1.0
    option_docs = {
        "lora": "where the LCM-LoRA comes from: a Hub repo id, a local directory, the "
                ".safetensors file, or None when the source is LCM-distilled (default "
                "latent-consistency/lcm-lora-sdv1-5)",
        "lora_file": "the LoRA file inside it (default pytorch_lora_weights.safetensors)",
        "variant": SD15Backbone.option_docs["variant"],
    }
    unsupported_options = {
        "timestep_spacing": "LCMScheduler ignores it: its timesteps come from the 50-step "
                            "distillation schedule and start at t=999 at every step count",
    }
    #: LCMScheduler refuses more steps than its distillation schedule has
    #: (``original_inference_steps``, 50 for LCM-LoRA SD 1.5).
    max_steps = 50
    how_to_get = ("Needs SD 1.5 (`hf download stable-diffusion-v1-5/stable-diffusion-v1-5`) and "
                  "the LCM-LoRA (`hf download latent-consistency/lcm-lora-sdv1-5 "
                  "pytorch_lora_weights.safetensors`, OpenRAIL++), or local copies.")
    description = "LCM-LoRA on Stable Diffusion 1.5 (4 LCM steps, guidance off)"

    def configure_pipeline(self, pipe: Any) -> Any:
        """``LCMScheduler`` from the pipeline's scheduler config. It draws fresh noise at every
        step, so :attr:`injects_noise` holds and each sample's generator goes to its steps."""
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        return UNetBackbone.configure_pipeline(self, pipe)

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None,
             **options: Any) -> SD15LCMBackbone:
        """The tiny SD 1.5 pipeline plus a tiny LCM-LoRA in the layout of
        ``latent-consistency/lcm-lora-sdv1-5`` (kohya-style ``lora_unet_*`` keys with
        ``lora_down``/``lora_up``/``alpha``), fused through ``load``."""
        options = cls.check_options(options)  # before building anything
        from adapterswap.presets import tiny_dir

        base = tiny_sd15_dir(seed, cache_dir)

        def build(tmp: Path) -> None:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
            save_tiny_lcm_lora(unet, tmp / LCM_LORA_FILE, seed)

        lora_dir = build_once(tiny_dir("sd15-lcm-lora", seed, cache_dir), build)
        options.setdefault("lora", str(lora_dir))
        backbone = cls(str(base), device="cpu", dtype="fp32", **options).load()
        backbone.default_height, backbone.default_width = cls.tiny_size
        return backbone


def save_tiny_lcm_lora(unet: Any, path: Path, seed: int, rank: int = 4) -> None:
    """Random rank-``rank`` LoRA weights for ``unet`` keyed as in the published LCM-LoRA file
    (``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``):
    :func:`adapterswap.kit.tiny_lora.save_tiny_unet_lora` in its ``"kohya"`` layout."""
    from adapterswap.kit.tiny_lora import save_tiny_unet_lora

    save_tiny_unet_lora(unet, path, seed, layout="kohya", rank=rank)
