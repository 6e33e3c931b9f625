"""Fixtures of the adapterswap-metrics tests: tiny CLIP and DINO checkpoints in the real Hugging
Face layout, and deterministic test images. Everything offline; fixture names start with
``metrics_``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

#: Tiny input size of the test CLIP and ViT image towers.
TINY_IMAGE_SIZE = 32
#: ImageNet statistics, saved in the tiny DINO checkpoint's preprocessor config as in the real one.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def random_image(seed: int, width: int = 64, height: int = 64) -> Image.Image:
    """A deterministic RGB image: smooth colour ramps plus noise (so resizing matters)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / width, y * 255.0 / height,
                     np.full_like(x, rng.integers(0, 256), dtype=np.float64)], axis=-1)
    noisy = base + rng.normal(0, 40, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def save_tiny_clip(path, seed: int = 0) -> None:
    """A tiny random ``CLIPModel`` with a locally built tokenizer, saved like a Hub checkpoint
    (config.json, model.safetensors, preprocessor_config.json, tokenizer files)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from adapterswap.kit.tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, projection_dim=24,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, projection_dim=24, num_hidden_layers=2,
        num_attention_heads=4, image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_act="quick_gelu")
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=24)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)  # preprocessor_config.json, as in openai/clip-vit-*
    tokenizer.save_pretrained(path)


def save_tiny_dino(path, seed: int = 0) -> None:
    """A tiny random ``ViTModel`` without pooler (as the DINO conversions), saved with a
    ``ViTImageProcessor`` config holding ImageNet's mean and std."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, image_size=TINY_IMAGE_SIZE, patch_size=8)
    torch.manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(path)


@pytest.fixture(scope="session")
def metrics_tiny_clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("metrics-tiny-clip")
    save_tiny_clip(path)
    return path


@pytest.fixture(scope="session")
def metrics_tiny_dino_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("metrics-tiny-dino")
    save_tiny_dino(path)
    return path


@pytest.fixture(scope="session")
def metrics_images():
    """Five distinct images of different sizes and aspect ratios."""
    return [random_image(0, 64, 64), random_image(1, 48, 40), random_image(2, 40, 56),
            random_image(3, 64, 64), random_image(4, 72, 48)]


@pytest.fixture(scope="session")
def metrics_make_image():
    """:func:`random_image`, for tests that need more images."""
    return random_image
