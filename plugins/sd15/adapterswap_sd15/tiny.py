"""The tiny SD 1.5 pipeline: real diffusers classes, small random weights, built offline.

Built from :mod:`adapterswap.kit.tiny`'s shared parts plus a UNet that keeps SD 1.5's layout,
so adapter code that addresses layers by name works on tiny and real models alike. The same
seed always gives the same weights. ``SD15Backbone.tiny`` saves it with
:func:`save_tiny_pipeline` and loads it back through ``load``::

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**tiny_sd15_components(seed=0))
"""

from __future__ import annotations

from typing import Any

from adapterswap.kit.tiny import (
    CLIP_TEXT_WIDTH,
    TINY_SIDE,
    VAE_LATENT_CHANNELS,
    TinyPipelines,
    ready,
    reseed,
    tiny_clip_text_encoder,
    tiny_clip_tokenizer,
    tiny_vae,
)

#: Default ``(height, width)`` of a tiny SD 1.5 image: an 8x8 latent.
TINY_SIZE: tuple[int, int] = (TINY_SIDE, TINY_SIDE)

#: The scheduler config of the SD 1.5 checkpoint (``scheduler/scheduler_config.json``), limited
#: to the arguments ``PNDMScheduler`` takes.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def tiny_sd15_components(seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``StableDiffusionPipeline(**components)``: a tiny SD 1.5.

    The UNet keeps SD 1.5's layout: three cross-attention down blocks then a plain one, a plain up
    block then three cross-attention ones (so, as in the real model, ``up_blocks[0]`` has no
    attention), 2 layers per block, cross-attention width 32 (the CLIP text width). The scheduler
    is SD 1.5's ``PNDMScheduler``. ``safety_checker``, ``feature_extractor`` and ``image_encoder``
    are ``None`` and ``requires_safety_checker=False`` is included, so the pipeline builds without
    the safety-checker warning.
    """
    from diffusers import PNDMScheduler, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    reseed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SIDE // 8,  # in latent pixels: the pipeline's default size is 64 px
        in_channels=VAE_LATENT_CHANNELS,
        out_channels=VAE_LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        attention_head_dim=2,  # diffusers' legacy name for the number of heads; real SD 1.5: 8
        cross_attention_dim=CLIP_TEXT_WIDTH,
        norm_num_groups=8,
    )
    return {
        "vae": tiny_vae(seed, scaling_factor=0.18215),
        "text_encoder": tiny_clip_text_encoder(seed, tokenizer, CLIP_TEXT_WIDTH),
        "tokenizer": tokenizer,
        "unet": ready(unet),
        "scheduler": PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


#: The tiny pipelines of this plugin: ``sd15`` (``StableDiffusionPipeline``).
TINY_PIPELINES = TinyPipelines({"sd15": ("StableDiffusionPipeline", tiny_sd15_components)})
#: Families :func:`save_tiny_pipeline` and :func:`build_tiny_pipeline` accept.
TINY_FAMILIES = TINY_PIPELINES.families
tiny_pipeline_class = TINY_PIPELINES.pipeline_class
tiny_components = TINY_PIPELINES.components
build_tiny_pipeline = TINY_PIPELINES.build
save_tiny_pipeline = TINY_PIPELINES.save
