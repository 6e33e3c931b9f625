"""The tiny SDXL pipeline: real diffusers classes, small random weights, built offline.

Built from :mod:`adapterswap.kit.tiny`'s shared parts plus a second CLIP text encoder and a UNet
that keeps SDXL-base's layout (InstantStyle's ``up_blocks.0.attentions.1`` exists), so adapter
code that addresses layers by name works on tiny and real models alike. The same seed always
gives the same weights. ``SDXLBackbone.tiny`` saves it with :func:`save_tiny_pipeline` and loads
it back through ``load``::

    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=0))
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

#: Default ``(height, width)`` of a tiny SDXL image: an 8x8 latent.
TINY_SIZE: tuple[int, int] = (TINY_SIDE, TINY_SIDE)
#: Width of ``text_encoder_2`` (hidden size and projection): distinct from the first encoder's
#: 32 and T5's 48, so crossed wires fail.
CLIP_TEXT_2_WIDTH = 64
#: ``addition_time_embed_dim`` of the tiny UNet; real SDXL uses 256.
TIME_EMBED_DIM = 8

#: The scheduler config of the SDXL-base checkpoint (``scheduler/scheduler_config.json``),
#: limited to the arguments ``EulerDiscreteScheduler`` takes.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``StableDiffusionXLPipeline(**components)``: a tiny SDXL-base.

    The UNet keeps SDXL-base's layout: down blocks (plain, cross-attention, cross-attention), up
    blocks (cross-attention, cross-attention, plain), 2 layers per block, so ``up_blocks[0]`` has 3
    attentions (InstantStyle's ``up_blocks.0.attentions.1``) and ``down_blocks.2`` has 2. Its
    cross-attention width is the two text encoders' widths concatenated (32 + 64), and its
    "text_time" embedding takes the pooled 64-wide text embedding plus six 8-wide time ids.
    Includes ``force_zeros_for_empty_prompt=True`` (SDXL-base's value) and ``add_watermarker=False``
    (the invisible watermark is meaningless at 64 px and would make outputs depend on whether
    ``invisible-watermark`` is installed); ``image_encoder`` and ``feature_extractor`` are ``None``.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    reseed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SIDE // 8,  # in latent pixels: the pipeline's default size is 64 px
        in_channels=VAE_LATENT_CHANNELS,
        out_channels=VAE_LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),  # real SDXL: (1, 2, 10)
        attention_head_dim=(2, 4, 4),  # diffusers' legacy name for the number of heads
        use_linear_projection=True,
        cross_attention_dim=CLIP_TEXT_WIDTH + CLIP_TEXT_2_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=CLIP_TEXT_2_WIDTH + 6 * TIME_EMBED_DIM,
        norm_num_groups=8,
    )
    return {
        "vae": tiny_vae(seed, scaling_factor=0.13025),
        "text_encoder": tiny_clip_text_encoder(seed, tokenizer, CLIP_TEXT_WIDTH),
        "text_encoder_2": tiny_clip_text_encoder(seed, tokenizer_2, CLIP_TEXT_2_WIDTH,
                                                 with_projection=True),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": ready(unet),
        "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


#: The tiny pipelines of this plugin: ``sdxl`` (``StableDiffusionXLPipeline``). Reloading a
#: saved one on a machine with ``invisible-watermark`` installed needs
#: ``add_watermarker=False`` again (it is not saved in ``model_index.json``).
TINY_PIPELINES = TinyPipelines({"sdxl": ("StableDiffusionXLPipeline", tiny_sdxl_components)})
#: Families :func:`save_tiny_pipeline` and :func:`build_tiny_pipeline` accept.
TINY_FAMILIES = TINY_PIPELINES.families
tiny_pipeline_class = TINY_PIPELINES.pipeline_class
tiny_components = TINY_PIPELINES.components
build_tiny_pipeline = TINY_PIPELINES.build
save_tiny_pipeline = TINY_PIPELINES.save
