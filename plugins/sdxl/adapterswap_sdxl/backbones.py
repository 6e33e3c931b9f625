"""SDXL backbones: SDXL-base with classifier-free guidance, and the distilled SDXL-Lightning.

Both run ``StableDiffusionXLPipeline``'s steps one at a time (see :class:`UNetBackbone`); the
parity tests hold :func:`adapterswap.denoise.denoise` to the pipeline's own output.

* ``sdxl``: ``stabilityai/stable-diffusion-xl-base-1.0`` with the scheduler it ships
  (Euler, "leading" timesteps), guidance 5.0, 30 steps.
* ``sdxl-lightning``: ByteDance's 4-step SDXL-Lightning UNet (``ByteDance/SDXL-Lightning``,
  ``sdxl_lightning_4step_unet.safetensors``) loaded into the SDXL-base pipeline, Euler with
  "trailing" timesteps and no guidance, as its model card prescribes.

``predict`` takes the style IP-Adapter's inputs as an
:class:`~adapterswap.kit.ip_adapter_inputs.IPAdapterInputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError, WeightsNotFoundError
from adapterswap.hub import resolve_source
from adapterswap.kit.guidance import guided
from adapterswap.kit.tiny import build_once
from adapterswap.kit.unet_backbone import UNetBackbone
from adapterswap_sdxl.tiny import TINY_SIZE

if TYPE_CHECKING:
    import torch

    from adapterswap.denoise import TensorBundle

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
LIGHTNING_REPO = "ByteDance/SDXL-Lightning"
LIGHTNING_UNET = "sdxl_lightning_4step_unet.safetensors"

_PIPELINE_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
    "unet/config.json",
    "vae/config.json",
)


def tiny_sdxl_dir(seed: int, cache_dir: str | None) -> Path:
    """The tiny SDXL pipeline (:mod:`adapterswap_sdxl.tiny`) saved in diffusers' layout, built
    once."""
    from adapterswap.presets import tiny_dir
    from adapterswap_sdxl.tiny import save_tiny_pipeline

    return build_once(tiny_dir("sdxl", seed, cache_dir),
                      lambda tmp: save_tiny_pipeline("sdxl", tmp, seed))


class SDXLBackbone(UNetBackbone):
    """SDXL-base 1.0: CFG 5.0, 30 Euler steps (the repo's scheduler), 1024 px.

    Options: ``variant`` (e.g. ``"fp16"`` to load the repo's half-precision files),
    ``timestep_spacing`` (default the repo's "leading"; "trailing" starts every step count at
    sigma 14.6, where "leading" starts N = 1 at sigma 0.041).
    """

    name = "sdxl"
    family = "sdxl"
    default_source = SDXL_BASE
    default_steps = 30
    guidance_mode = "cfg"
    default_guidance_scale = 5.0
    default_height = 1024
    default_width = 1024
    #: ``(height, width)`` of the tiny preset's images (:mod:`adapterswap_sdxl.tiny`).
    tiny_size = TINY_SIZE
    required_files = (*_PIPELINE_FILES,
                      "unet/diffusion_pytorch_model.safetensors"
                      "|unet/diffusion_pytorch_model.fp16.safetensors")
    default_adapter = "style-ip-adapter"
    how_to_get = ("Accept the CreativeML Open RAIL++-M licence and run `hf download "
                  "stabilityai/stable-diffusion-xl-base-1.0`, or pass a local copy as source.")
    description = "Stable Diffusion XL base 1.0 (CFG 5.0, 30 Euler steps)"

    def load_pipeline(self, source: str, *, local_files_only: bool) -> Any:
        from diffusers import StableDiffusionXLPipeline

        pipe = self.from_pretrained(StableDiffusionXLPipeline, source,
                                    local_files_only=local_files_only, add_watermarker=False)
        return self.configure_pipeline(pipe).to(self.device)

    @staticmethod
    def random_pipeline(device: Any, dtype: Any, seed: int) -> Any:
        """The pipeline at the published size with random weights (``random`` preset)."""
        from adapterswap_sdxl.published import random_sdxl_pipeline

        return random_sdxl_pipeline(device, dtype, seed)

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None,
             **options: Any) -> SDXLBackbone:
        """Tiny random SDXL (64 px) saved in diffusers' layout and loaded through ``load``."""
        options = cls.check_options(options)  # before building anything
        backbone = cls(str(tiny_sdxl_dir(seed, cache_dir)), device="cpu", dtype="fp32",
                       **options).load()
        backbone.default_height, backbone.default_width = cls.tiny_size
        return backbone

    # -- pipeline steps --------------------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str], *, guidance_scale: float | None = None,
                      negative_prompts: Sequence[str] | None = None) -> TensorBundle:
        """Both CLIP encoders, as ``StableDiffusionXLPipeline.encode_prompt``: penultimate
        hidden states concatenated, pooled projection of the second; with guidance, the
        negative rows (zeros for no negative prompt: SDXL-base's
        ``force_zeros_for_empty_prompt``)."""
        import torch

        from adapterswap.denoise import TensorBundle

        self.require_loaded()
        prompts = list(prompts)
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise InvalidArgumentError("negative_prompts", list(negative_prompts),
                                       f"need one per prompt ({len(prompts)})")
        cfg = self.uses_cfg(guidance_scale)
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=list(negative_prompts) if negative_prompts else None)
        return TensorBundle({
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative if cfg else None,
            "negative_pooled_prompt_embeds": negative_pooled if cfg else None,
        })

    def null_prompt(self, prompt: TensorBundle) -> TensorBundle:
        """The unconditional input ``StableDiffusionXLPipeline.encode_prompt`` makes for
        ``prompt`` without a negative prompt, one row per row: zeros where the pipeline's
        ``force_zeros_for_empty_prompt`` is set (SDXL base's config), else the empty prompt
        encoded. Asked of the pipeline itself with the bundle's embeddings, so the prompt is not
        encoded again. The negative rows, where ``prompt`` has them, are the same."""
        import torch

        from adapterswap.denoise import TensorBundle

        self.require_loaded()
        with torch.no_grad():
            _, null, _, null_pooled = self.pipe.encode_prompt(
                prompt=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=True, negative_prompt=None,
                prompt_embeds=prompt["prompt_embeds"],
                pooled_prompt_embeds=prompt["pooled_prompt_embeds"])
        guided = prompt.get("negative_prompt_embeds") is not None
        return TensorBundle({
            "prompt_embeds": null,
            "pooled_prompt_embeds": null_pooled,
            "negative_prompt_embeds": null if guided else None,
            "negative_pooled_prompt_embeds": null_pooled if guided else None,
        }, dict(prompt.shared))

    def _time_ids(self, height: int, width: int, dtype: Any) -> torch.Tensor:
        """SDXL's micro-conditioning: original size, crop (0, 0), target size (1, 6); made
        once per size (a host-to-device copy every step would synchronise the loop)."""
        from adapterswap.fastpath import device_tensor

        encoder_2 = self.pipe.text_encoder_2
        ids = self.pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=dtype,
            text_encoder_projection_dim=encoder_2.config.projection_dim)
        return device_tensor(ids.flatten().tolist(), self.device, dtype).reshape(ids.shape)

    def denoise_rows(self, model_input: torch.Tensor, timesteps: torch.Tensor, prompt: Any, *,
                     cfg: bool, guidance_scale: float | None, height: int, width: int,
                     image_embeds: list[torch.Tensor] | None) -> torch.Tensor:
        import torch

        embeds, pooled = prompt["prompt_embeds"], prompt["pooled_prompt_embeds"]
        if cfg:  # [uncond; cond], as the pipeline batches them
            embeds = torch.cat([prompt["negative_prompt_embeds"], embeds])
            pooled = torch.cat([prompt["negative_pooled_prompt_embeds"], pooled])
            model_input = torch.cat([model_input, model_input])
            timesteps = torch.cat([timesteps, timesteps])
        time_ids = self._time_ids(height, width, embeds.dtype).repeat(model_input.shape[0], 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        if image_embeds is not None:
            added["image_embeds"] = image_embeds
        noise = self.pipe.unet(model_input, timesteps, encoder_hidden_states=embeds,
                               added_cond_kwargs=added, return_dict=False)[0]
        return guided(noise, guidance_scale) if cfg else noise

    def decode(self, latents: torch.Tensor, *, height: int, width: int,
               output_type: str = "pil") -> Any:
        """The pipeline's decode: fp16 VAEs with ``force_upcast`` decode in fp32, latents are
        un-normalised with the VAE's mean/std when it has them, else its scaling factor."""
        import torch

        self.require_loaded()
        if output_type not in ("pil", "np", "pt"):
            raise InvalidArgumentError("output_type", output_type, "choose pil, np or pt")
        vae = self.pipe.vae
        with torch.no_grad():
            upcast = vae.dtype == torch.float16 and vae.config.force_upcast
            if upcast:
                vae.to(dtype=torch.float32)
            latents = latents.to(vae.dtype)
            mean = getattr(vae.config, "latents_mean", None)
            std = getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            try:
                image = vae.decode(latents, return_dict=False)[0]
            finally:
                if upcast:
                    vae.to(dtype=torch.float16)
            return self.pipe.image_processor.postprocess(image, output_type=output_type)


class SDXLLightningBackbone(SDXLBackbone):
    """SDXL-Lightning (ByteDance, arXiv 2402.13929): a distilled UNet in the SDXL-base pipeline,
    Euler with "trailing" timesteps, no guidance, 4 steps.

    ``source`` is the SDXL-base pipeline (its UNet weights are not read). Options: ``unet``
    (where the Lightning UNet comes from: a Hub repo id, a local directory, or the
    ``.safetensors`` file itself; default ``ByteDance/SDXL-Lightning``), ``unet_file`` (file
    name inside it, default ``sdxl_lightning_4step_unet.safetensors``; the 2- and 8-step files
    work too), ``variant``, ``timestep_spacing`` (default "trailing", the model card's).
    """

    name = "sdxl-lightning"
    default_steps = 4
    guidance_mode = "none"
    default_guidance_scale = None
    required_files = _PIPELINE_FILES
    option_docs = {
        **SDXLBackbone.option_docs,
        "unet": "where the Lightning UNet comes from: a Hub repo id, a local directory or the "
                ".safetensors file (default ByteDance/SDXL-Lightning)",
        "unet_file": "the UNet file inside it (default sdxl_lightning_4step_unet.safetensors)",
    }
    how_to_get = ("Needs the SDXL-base pipeline (`hf download "
                  "stabilityai/stable-diffusion-xl-base-1.0 --exclude 'unet/*.safetensors'`) "
                  "and the Lightning UNet (`hf download ByteDance/SDXL-Lightning "
                  "sdxl_lightning_4step_unet.safetensors`, OpenRAIL++).")
    description = "SDXL-Lightning 4-step UNet on SDXL base (no guidance, trailing Euler)"
    #: Where the distilled UNet file comes from by default (the ``unet`` and ``unet_file``
    #: options override them); a subclass with another UNet file sets its own.
    unet_repo = LIGHTNING_REPO
    unet_filename = LIGHTNING_UNET

    @classmethod
    def extra_weights(cls, options: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
        """The distilled UNet file (the ``unet`` and ``unet_file`` options), for provenance:
        nothing loads."""
        from adapterswap.kit.lora import weights_entry

        options = cls.check_options(options)
        return weights_entry(options.get("unet") or cls.unet_repo,
                             str(options.get("unet_file") or cls.unet_filename), label="unet")

    def unet_file(self) -> str:
        """Local path of the distilled UNet file (from a path, a directory, or the HF cache /
        Hub), or :class:`WeightsNotFoundError` naming what is missing."""
        unet = str(self.options.get("unet") or self.unet_repo)
        filename = str(self.options.get("unet_file") or self.unet_filename)
        if Path(unet).expanduser().is_file():
            return str(Path(unet).expanduser())
        resolved = resolve_source(unet, what=f"backbone {self.name!r} UNet",
                                  required=(filename,), how_to_get=self.how_to_get)
        if resolved.local:
            return str(Path(resolved.source) / filename)
        from huggingface_hub import hf_hub_download

        return hf_hub_download(resolved.source, filename,
                               local_files_only=resolved.local_files_only)

    def load_pipeline(self, source: str, *, local_files_only: bool) -> Any:
        import torch
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

        from adapterswap.weights import loading

        what = f"backbone {self.name!r}"
        unet_file = self.unet_file()  # fail before reading the base pipeline
        weights = read_unet_weights(unet_file, what=what)
        with loading(what, f"{source}/unet"):
            config = UNet2DConditionModel.load_config(source, subfolder="unet",
                                                      local_files_only=local_files_only)
            with torch.device("meta"):  # no random init of 2.6B parameters: the file has all
                unet = UNet2DConditionModel.from_config(config)
        try:
            unet.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as exc:
            raise WeightsNotFoundError(
                f"backbone {self.name!r}: {unet_file!r} does not fit the SDXL UNet of "
                f"{source!r}: {str(exc).splitlines()[0]}") from None
        if next(unet.parameters()).dtype != self.dtype:  # the published file is float16
            unet = unet.to(dtype=self.dtype)
        unet = unet.eval()
        pipe = self.from_pretrained(StableDiffusionXLPipeline, source,
                                    local_files_only=local_files_only, unet=unet,
                                    add_watermarker=False)
        return self.configure_pipeline(pipe).to(self.device)

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        if name in ("unet", "unet_file") and value is not None \
                and not isinstance(value, (str, Path)):
            raise InvalidArgumentError(name, value, "must be a path, a file name or a repo id")
        return super().check_option(name, value)

    def configure_pipeline(self, pipe: Any) -> Any:
        """Euler with "trailing" timesteps, as the model card sets it (the
        ``timestep_spacing`` option, applied after, can change the spacing)."""
        from diffusers import EulerDiscreteScheduler

        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                            timestep_spacing="trailing")
        return super().configure_pipeline(pipe)

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None,
             **options: Any) -> SDXLLightningBackbone:
        """The tiny SDXL pipeline plus a tiny distilled UNet file (same architecture, other
        random weights) named and stored as :attr:`unet_filename` is (safetensors, or a pickled
        float16 state dict for ``.bin``), loaded through ``load``."""
        options = cls.check_options(options)  # before building anything
        from adapterswap.presets import tiny_dir

        base = tiny_sdxl_dir(seed, cache_dir)

        def build(tmp: Path) -> None:
            import torch
            from diffusers import UNet2DConditionModel
            from safetensors.torch import save_file

            torch.manual_seed(seed + 1)
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(str(base), subfolder="unet"))
            state = {k: v.contiguous() for k, v in unet.state_dict().items()}
            if cls.unet_filename.endswith(".safetensors"):
                save_file(state, str(tmp / cls.unet_filename))
            else:  # a pickled state dict, as the published .bin files are
                torch.save({k: v.to(torch.float16) for k, v in state.items()},
                           str(tmp / cls.unet_filename))

        unet_dir = build_once(tiny_dir(f"{cls.name}-unet", seed, cache_dir), build)
        options.setdefault("unet", str(unet_dir))
        backbone = cls(str(base), device="cpu", dtype="fp32", **options).load()
        backbone.default_height, backbone.default_width = cls.tiny_size
        return backbone


def read_unet_weights(path: str, *, what: str) -> dict[str, Any]:
    """The state dict in a UNet weights file: safetensors, or a pickled state dict (``.bin``,
    as DMD2 publishes it) read with ``torch.load(weights_only=True)``
    (:func:`adapterswap.weights.read_pickle`), which runs no code from the file."""
    from adapterswap.weights import PICKLE_SUFFIXES, read_pickle, read_safetensors

    if Path(path).suffix.lower() not in PICKLE_SUFFIXES:
        return read_safetensors(path, what=what)
    state = read_pickle(path, what=what)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsNotFoundError(f"{what}: {path!r} does not hold a UNet state dict")
    return state
