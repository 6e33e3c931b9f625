"""The tiny FLUX.1 pipelines and ControlNet: real diffusers classes, small random weights.

Built from :mod:`adapterswap.kit.tiny`'s shared parts (CLIP and T5 encoders, a VAE with FLUX's
latent normalisation) plus a transformer that keeps FLUX's double/single block split, so adapter
code that addresses blocks (ControlNet residual intervals) works on tiny and real models alike.
The same seed always gives the same weights. ``FluxBackbone.tiny`` saves a pipeline with
:func:`save_tiny_pipeline` (family ``flux-dev`` or ``flux-schnell``) and loads it back through
``load``::

    from diffusers import FluxPipeline
    pipe = FluxPipeline(**tiny_flux_components(seed=0))
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from adapterswap.kit.tiny import (
    CLIP_TEXT_WIDTH,
    T5_WIDTH,
    TINY_SIDE,
    VAE_LATENT_CHANNELS,
    TinyPipelines,
    ready,
    require_choice,
    reseed,
    tiny_clip_text_encoder,
    tiny_clip_tokenizer,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    tiny_vae,
)

if TYPE_CHECKING:
    from diffusers import FluxControlNetModel

#: Default ``(height, width)`` of a tiny FLUX image: an 8x8 latent, a 4x4 grid of packed 2x2
#: patches.
TINY_SIZE: tuple[int, int] = (TINY_SIDE, TINY_SIDE)

# FLUX.1 scheduler configs, as published with the checkpoints (scheduler/scheduler_config.json).
_FLUX_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "dev": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "schnell": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}


def flux_scheduler_config(variant: str) -> dict[str, Any]:
    """The ``FlowMatchEulerDiscreteScheduler`` config of FLUX.1-dev or FLUX.1-schnell.

    ``variant`` is ``"dev"`` (shift 3.0 with resolution-dependent dynamic shifting) or
    ``"schnell"`` (shift 1.0, no dynamic shifting). Returns a fresh dict.
    """
    require_choice("variant", variant, tuple(_FLUX_SCHEDULER_CONFIGS))
    return dict(_FLUX_SCHEDULER_CONFIGS[variant])


def flux_transformer_config(*, guidance_embeds: bool) -> dict[str, Any]:
    """Config of the tiny FLUX transformer: 2 double + 4 single blocks, inner width 32."""
    return {
        "patch_size": 1,
        "in_channels": VAE_LATENT_CHANNELS * 2 * 2,  # latents are packed into 2x2 patches
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_WIDTH,
        "pooled_projection_dim": CLIP_TEXT_WIDTH,
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) sums to 128
    }


def tiny_flux_components(seed: int = 0, *, guidance_embeds: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``FluxPipeline(**components)``: a tiny FLUX.1.

    ``guidance_embeds=True`` gives a guidance-distilled transformer like FLUX.1-dev (with the dev
    scheduler config); ``False`` is FLUX.1-schnell (with the schnell scheduler config). The
    transformer has 2 double and 4 single blocks; ``image_encoder`` and ``feature_extractor`` are
    ``None``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    reseed(seed)
    transformer = ready(
        FluxTransformer2DModel(**flux_transformer_config(guidance_embeds=guidance_embeds))
    )
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    variant = "dev" if guidance_embeds else "schnell"
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(variant)),
        "vae": tiny_vae(seed, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False),
        "text_encoder": tiny_clip_text_encoder(seed, tokenizer, CLIP_TEXT_WIDTH),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_t5_encoder(seed, tokenizer_2, T5_WIDTH),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


_CONTROLNET_SHARED_KEYS: tuple[str, ...] = (
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "axes_dims_rope",
)


def tiny_flux_controlnet(
    seed: int = 0,
    *,
    transformer_config: Mapping[str, Any] | None = None,
    num_layers: int = 1,
    num_single_layers: int = 2,
    guidance_embeds: bool | None = None,
    zero_residuals: bool = False,
) -> FluxControlNetModel:
    """A tiny ``FluxControlNetModel`` that fits a tiny FLUX transformer (InfuseNet's class).

    The widths, heads, rope axes and input channels come from ``transformer_config`` (a
    transformer's ``.config`` or a dict; default: the :func:`tiny_flux_components` transformer).
    ``guidance_embeds`` defaults to the transformer's. Like InfiniteYou's InfuseNet (4 double and
    10 single blocks against FLUX's 19 and 38), it has fewer blocks than the transformer: FLUX adds
    residual ``i // ceil(len(transformer_blocks) / len(residuals))`` after transformer block ``i``,
    so 1 double and 2 single blocks against the tiny 2 and 4 each feed two transformer blocks.

    diffusers zero-initialises the controlnet's output projections, so a fresh controlnet changes
    nothing. Unless ``zero_residuals`` is True, those projections (and the zero-initialised
    ``controlnet_x_embedder``) get ordinary random weights instead, so tests can see the control.
    """
    from diffusers import FluxControlNetModel

    if transformer_config is None:
        transformer_config = flux_transformer_config(
            guidance_embeds=True if guidance_embeds is None else guidance_embeds
        )
    config = {key: transformer_config[key] for key in _CONTROLNET_SHARED_KEYS}
    config["guidance_embeds"] = (
        transformer_config["guidance_embeds"] if guidance_embeds is None else guidance_embeds
    )
    reseed(seed)
    controlnet = FluxControlNetModel(
        **config, num_layers=num_layers, num_single_layers=num_single_layers
    )
    if not zero_residuals:
        for projection in (
            *controlnet.controlnet_blocks,
            *controlnet.controlnet_single_blocks,
            controlnet.controlnet_x_embedder,
        ):
            projection.reset_parameters()
    return ready(controlnet)


#: The tiny pipelines of this plugin: ``flux-dev`` (guidance embedding, dev scheduler) and
#: ``flux-schnell`` (neither), both ``FluxPipeline``.
TINY_PIPELINES = TinyPipelines({
    "flux-dev": ("FluxPipeline", functools.partial(tiny_flux_components, guidance_embeds=True)),
    "flux-schnell": ("FluxPipeline",
                     functools.partial(tiny_flux_components, guidance_embeds=False)),
})
#: Families :func:`save_tiny_pipeline` and :func:`build_tiny_pipeline` accept.
TINY_FAMILIES = TINY_PIPELINES.families
tiny_pipeline_class = TINY_PIPELINES.pipeline_class
tiny_components = TINY_PIPELINES.components
build_tiny_pipeline = TINY_PIPELINES.build
save_tiny_pipeline = TINY_PIPELINES.save
