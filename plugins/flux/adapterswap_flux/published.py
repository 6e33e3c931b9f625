"""FLUX.1 and InfuseNet at their published sizes with random weights: the ``random`` preset
(real latency and memory, nothing downloaded) and the GPU benchmarks.

The configurations are those of the released checkpoints: the FLUX.1 transformer (19 double and
38 single blocks, 24 heads of 128), CLIP-L and T5-XXL text encoders, the FLUX VAE, and
InfiniteYou's InfuseNet (a FluxControlNetModel with 4 double and 10 single blocks) with its
Resampler (1280 wide, depth 4, 8 queries, 512 -> 4096).
"""

from __future__ import annotations

from typing import Any

from adapterswap.presets import build_in_dtype as in_dtype

TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
INFUSENET = dict(TRANSFORMER, num_layers=4, num_single_layers=10)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
              hidden_act="quick_gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, latent_channels=16, norm_num_groups=32, scaling_factor=0.3611,
           shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def random_flux_pipeline(variant: str, device: Any, dtype: Any, seed: int = 0,
                         shared: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """A FluxPipeline of random weights (``variant`` "dev" or "schnell"); ``shared`` reuses
    text encoders, tokenizers and VAE between variants. Returns (pipeline, shared parts)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from adapterswap.kit.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer
    from adapterswap_flux.tiny import flux_scheduler_config

    torch.manual_seed(seed)
    transformer = in_dtype(device, dtype, lambda: FluxTransformer2DModel(
        **TRANSFORMER, guidance_embeds=variant == "dev"))
    if shared is None:
        shared = in_dtype(device, dtype, lambda: {
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL)),
            "vae": AutoencoderKL(**VAE),
        })
        shared.update(tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_t5_tokenizer())
    scheduler = FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(variant))
    pipe = FluxPipeline(transformer=transformer.eval(), scheduler=scheduler, **shared)
    pipe.set_progress_bar_config(disable=True)
    return pipe, shared


def random_infusenet(device: Any, dtype: Any, seed: int = 1) -> tuple[Any, Any]:
    """InfuseNet (FluxControlNetModel, 4 + 10 blocks) and its Resampler, random weights."""
    import torch
    from diffusers import FluxControlNetModel

    from adapterswap_flux.resampler import Resampler, ResamplerConfig

    torch.manual_seed(seed)
    return in_dtype(device, dtype, lambda: (
        FluxControlNetModel(**INFUSENET, guidance_embeds=True).eval(),
        Resampler(ResamplerConfig(output_dim=TRANSFORMER["joint_attention_dim"])).eval()))
