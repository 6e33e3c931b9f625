"""SDXL-base and its style IP-Adapter at the published sizes with random weights: the
``random`` preset (real latency and memory, nothing downloaded) and the GPU benchmarks.

Configurations of the released checkpoints: the SDXL-base UNet (320/640/1280 channels,
transformer depths 1/2/10, cross-attention 2048), CLIP-L and OpenCLIP bigG text encoders, the
SDXL VAE, h94's ``ip-adapter_sdxl`` (4 tokens from the 1280-d image embedding) and its ViT-bigG/14
image encoder.
"""

from __future__ import annotations

from typing import Any

from adapterswap.presets import build_in_dtype

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
              hidden_act="quick_gelu")
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                 num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                 projection_dim=1280, hidden_act="gelu")
VIT_BIGG = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1280,
                hidden_act="gelu")
UNET = dict(sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           scaling_factor=0.13025, force_upcast=False)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, timestep_spacing="leading", num_train_timesteps=1000,
                 prediction_type="epsilon")


def random_sdxl_pipeline(device: Any, dtype: Any, seed: int = 0) -> Any:
    """A StableDiffusionXLPipeline of random weights (tokenizers built locally)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from adapterswap.kit.tiny import tiny_clip_tokenizer

    torch.manual_seed(seed)
    parts = build_in_dtype(device, dtype, lambda: {
        "unet": UNet2DConditionModel(**UNET).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
        "vae": AutoencoderKL(**VAE),
    })
    pipe = StableDiffusionXLPipeline(scheduler=EulerDiscreteScheduler(**SCHEDULER),
                                     tokenizer=tiny_clip_tokenizer(),
                                     tokenizer_2=tiny_clip_tokenizer(), add_watermarker=False,
                                     **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_style_weights(unet: Any, device: Any, dtype: Any, seed: int = 1) -> tuple[Any, ...]:
    """(h94-style state dict, ViT-bigG image encoder, image processor) with random weights."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from adapterswap.kit.tiny import random_ip_layers

    encoder = build_in_dtype(device, dtype, lambda: CLIPVisionModelWithProjection(
        CLIPVisionConfig(**VIT_BIGG)).eval())
    g = torch.Generator().manual_seed(seed)
    cross, proj = unet.config.cross_attention_dim, VIT_BIGG["projection_dim"]
    state = {"image_proj": {"proj.weight": torch.randn(4 * cross, proj, generator=g) / proj ** 0.5,
                            "proj.bias": torch.zeros(4 * cross),
                            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)},
             "ip_adapter": random_ip_layers(unet, g)}
    size = VIT_BIGG["image_size"]
    return state, encoder, CLIPImageProcessor(size=size, crop_size=size)
