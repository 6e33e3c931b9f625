"""SD 1.5 and IP-Adapter Plus at the published sizes with random weights: the ``random`` preset
(real latency and memory, nothing downloaded) and the GPU benchmarks.

Configurations of the released checkpoints: the SD 1.5 UNet (320/640/1280/1280 channels,
cross-attention 768), CLIP-L, the SD VAE, h94's ``ip-adapter-plus_sd15`` (a Resampler of 16
queries over the penultimate hidden states) and its ViT-H/14 image encoder.
"""

from __future__ import annotations

from typing import Any

from adapterswap.presets import build_in_dtype

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
              hidden_act="quick_gelu")
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024,
             hidden_act="gelu")
UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           scaling_factor=0.18215)
PLUS = dict(depth=4, heads=12, dim_head=64, num_queries=16)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def random_sd15_pipeline(device: Any, dtype: Any, seed: int = 0) -> Any:
    """A StableDiffusionPipeline of random weights (tokenizer built locally)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from adapterswap.kit.tiny import tiny_clip_tokenizer

    torch.manual_seed(seed)
    parts = build_in_dtype(device, dtype, lambda: {
        "unet": UNet2DConditionModel(**UNET).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        "vae": AutoencoderKL(**VAE),
    })
    pipe = StableDiffusionPipeline(scheduler=PNDMScheduler(**SCHEDULER),
                                   tokenizer=tiny_clip_tokenizer(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False,
                                   **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_plus_weights(unet: Any, device: Any, dtype: Any, seed: int = 1) -> tuple[Any, ...]:
    """(h94-style Plus state dict, ViT-H image encoder, image processor), random weights."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from adapterswap.kit.tiny import random_ip_layers
    from adapterswap_sd15.adapters import random_resampler

    encoder = build_in_dtype(device, dtype, lambda: CLIPVisionModelWithProjection(
        CLIPVisionConfig(**VIT_H)).eval())
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    state = {"image_proj": random_resampler(g, dim=cross, embedding_dim=VIT_H["hidden_size"],
                                            output_dim=cross, **PLUS),
             "ip_adapter": random_ip_layers(unet, g)}
    size = VIT_H["image_size"]
    return state, encoder, CLIPImageProcessor(size=size, crop_size=size)
