"""Style similarity with CSD weights: a tiny CSD training checkpoint in the published layout,
loaded through the metric and checked against an independent OpenAI-CLIP-style forward."""

from __future__ import annotations

import argparse
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from adapterswap_metrics.clip_metrics import StyleSimilarity
from PIL import Image
from torch import nn

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError, UnsafeWeightsError
from adapterswap.metrics import MetricBatch

WIDTH, LAYERS, PATCH, IMAGE = 128, 2, 8, 32  # heads = WIDTH // 64 = 2, as OpenAI CLIP
STYLE_DIM = 24
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """A pre-norm transformer block with OpenAI CLIP's parameter names."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ImageTower(nn.Module):
    """OpenAI CLIP's ViT image tower without its projection (CSD's ``backbone``)."""

    def __init__(self) -> None:
        super().__init__()
        grid = IMAGE // PATCH
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH) * WIDTH ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, WIDTH) * 0.1)
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(
            *[ResidualBlock(WIDTH, WIDTH // 64) for _ in range(LAYERS)])
        self.ln_post = nn.LayerNorm(WIDTH)
        for norm in (self.ln_pre, self.ln_post):  # non-trivial affine parameters
            nn.init.normal_(norm.weight, 1.0, 0.1)
            nn.init.normal_(norm.bias, 0.0, 0.1)

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer.resblocks(self.ln_pre(x))
        return self.ln_post(x[:, 0])


def csd_pixels(image: Image.Image) -> torch.Tensor:
    """CSD's evaluation transform written out: shorter side to IMAGE (PIL bicubic), rounded
    centre crop, CLIP normalisation."""
    width, height = image.size
    size = ((IMAGE, int(IMAGE * height / width)) if width <= height
            else (int(IMAGE * width / height), IMAGE))
    resized = image.convert("RGB").resize(size, Image.BICUBIC)
    left, top = (int(round((s - IMAGE) / 2.0)) for s in size)
    crop = np.asarray(resized.crop((left, top, left + IMAGE, top + IMAGE)), np.float32) / 255
    return torch.from_numpy(((crop - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy())[None]


@pytest.fixture(scope="module")
def csd_model():
    torch.manual_seed(7)
    tower = ImageTower().eval()
    style = torch.randn(WIDTH, STYLE_DIM) * WIDTH ** -0.5
    content = torch.randn(WIDTH, STYLE_DIM) * WIDTH ** -0.5
    return tower, style, content


def training_checkpoint(tower, style, content) -> dict:
    """The layout of CSD's ``checkpoint.pth`` / ``pytorch_model.bin``: DataParallel keys, the
    optimisers, the argparse namespace and numpy scalars."""
    state = {f"module.backbone.{k}": v for k, v in tower.state_dict().items()}
    state["module.last_layer_style"] = style
    state["module.last_layer_content"] = content
    group = {"lr": np.float64(1e-4), "weight_decay": np.float64(0.05), "params": [0, 1]}
    return {
        "model_state_dict": state,
        "opt_bb": {"state": {}, "param_groups": [group]},
        "opt_proj": {"state": {}, "param_groups": [dict(group)]},
        "iter": 100000,
        "args": argparse.Namespace(arch="vit_large", lr=1e-4, eval_k=[1, 10, 100],
                                   use_fp16=True),
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
    }


@pytest.fixture(scope="module")
def csd_checkpoint(tmp_path_factory, csd_model):
    path = tmp_path_factory.mktemp("csd") / "checkpoint.pth"
    torch.save(training_checkpoint(*csd_model), path)
    return path


def reference_cosine(csd_model, first: Image.Image, second: Image.Image) -> float:
    tower, style, _ = csd_model
    with torch.no_grad():
        a = (tower(csd_pixels(first)) @ style)[0].double().numpy()
        b = (tower(csd_pixels(second)) @ style)[0].double().numpy()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_csd_style_matches_the_original_architecture(csd_checkpoint, csd_model, metrics_images):
    images = metrics_images
    references = [images[1], images[1].copy(), None, images[4], images[2]]
    metric = StyleSimilarity(csd_weights=str(csd_checkpoint), device="cpu", batch_size=2)
    assert metric.availability() is None
    scores = metric.score(MetricBatch(images, references=references))
    assert scores[2] is None
    assert scores[1] == pytest.approx(1.0, abs=1e-5)
    for i in (0, 3, 4):
        assert scores[i] == pytest.approx(reference_cosine(csd_model, images[i], references[i]),
                                          abs=1e-5)
    assert scores[0] < 0.9999
    config = metric.image_model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.image_size, config.patch_size, config.projection_dim) == (
        WIDTH, LAYERS, WIDTH // 64, IMAGE, PATCH, STYLE_DIM)


def test_csd_bare_state_dicts_and_safetensors_load_too(tmp_path, csd_model, metrics_images):
    from safetensors.torch import save_file

    tower, style, content = csd_model
    bare = {f"backbone.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    bare.update(last_layer_style=style, last_layer_content=content)
    torch.save(bare, tmp_path / "bare.pth")
    folder = tmp_path / "csd-folder"
    folder.mkdir()
    save_file(bare, folder / "model.safetensors")
    image, reference = metrics_images[0], metrics_images[3]
    expected = reference_cosine(csd_model, image, reference)
    for source in (tmp_path / "bare.pth", folder):
        metric = StyleSimilarity(csd_weights=str(source), device="cpu")
        score = metric.score(MetricBatch([image], references=[reference]))[0]
        assert score == pytest.approx(expected, abs=1e-5)


class Payload:
    """Stands for arbitrary code a malicious pickle would run."""


def test_checkpoint_with_other_objects_is_refused_as_unsafe(tmp_path, csd_model):
    checkpoint = training_checkpoint(*csd_model)
    checkpoint["args"] = Payload()
    path = tmp_path / "unsafe.pth"
    torch.save(checkpoint, path)
    metric = StyleSimilarity(csd_weights=str(path), device="cpu")
    with pytest.raises(UnsafeWeightsError, match="weights_only=True"):
        metric.load()


def test_checkpoint_with_another_layout_is_refused(tmp_path, csd_model):
    tower, style, content = csd_model
    checkpoint = training_checkpoint(tower, style, content)
    checkpoint["model_state_dict"]["module.head.weight"] = torch.zeros(2, 2)
    torch.save(checkpoint, tmp_path / "extra.pth")
    with pytest.raises(MetricUnavailableError, match="unexpected key 'module.head.weight'"):
        StyleSimilarity(csd_weights=str(tmp_path / "extra.pth"), device="cpu").load()
    no_style = training_checkpoint(tower, style, content)
    del no_style["model_state_dict"]["module.last_layer_style"]
    torch.save(no_style, tmp_path / "no-style.pth")
    with pytest.raises(MetricUnavailableError, match="lacks the style head last_layer_style"):
        StyleSimilarity(csd_weights=str(tmp_path / "no-style.pth"), device="cpu").load()


def test_csd_options_and_availability(tmp_path, monkeypatch, csd_checkpoint):
    with pytest.raises(InvalidArgumentError, match="invalid model=.*csd_weights"):
        StyleSimilarity(model="openai/clip-vit-base-patch32", csd_weights=str(csd_checkpoint))
    missing = tmp_path / "nowhere.pth"
    reason = StyleSimilarity(csd_weights=str(missing)).availability()
    assert f"{str(missing)!r} does not exist" in reason and "tomg-group-umd/CSD-ViT-L" in reason
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert "holds none of model.safetensors, pytorch_model.bin, checkpoint.pth" in (
        StyleSimilarity(csd_weights=str(empty)).availability())

    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = StyleSimilarity(csd_weights="tomg-group-umd/CSD-ViT-L", device="cpu")
    assert "'tomg-group-umd/CSD-ViT-L' is not in the local Hugging Face cache and " \
           "HF_HUB_OFFLINE is set" in hub.availability()
    with pytest.raises(MetricUnavailableError, match="HF_HUB_OFFLINE"):
        hub.load()
    snapshot = cache / "models--tomg-group-umd--CSD-ViT-L" / "snapshots" / "5bc26a6"
    snapshot.mkdir(parents=True)
    shutil.copy(csd_checkpoint, snapshot / "pytorch_model.bin")
    assert hub.availability() is None
    assert hub.load().image_model.config.hidden_size == WIDTH



@pytest.mark.gpu
def test_csd_style_on_gpu_matches_cpu(csd_checkpoint, metrics_images):
    batch = MetricBatch(metrics_images, references=metrics_images[::-1])
    cpu = StyleSimilarity(csd_weights=str(csd_checkpoint), device="cpu").score(batch)
    gpu = StyleSimilarity(csd_weights=str(csd_checkpoint), device="cuda").score(batch)
    assert np.allclose(cpu, gpu, atol=1e-4)
