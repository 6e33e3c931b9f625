"""CLIP-I, CLIP-T, DINO and style (CLIP default) on tiny checkpoints saved in the real Hugging
Face layout and loaded through the metrics' own loaders, against independent computations."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from adapterswap_metrics.clip_metrics import (
    ClipImageSimilarity,
    ClipTextSimilarity,
    StyleSimilarity,
)
from adapterswap_metrics.dino import DinoSimilarity
from PIL import Image

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError
from adapterswap.metrics import MetricBatch

CROP = 32  # the tiny models' input size
RESIZE = CROP * 256 // 224  # DINO's 256/224 ratio at that size


def manual_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def features(output) -> np.ndarray:
    """``get_*_features`` returns a tensor (transformers 4) or an output object (5)."""
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return tensor[0].detach().numpy()


@pytest.fixture(scope="module")
def clip_reference(metrics_tiny_clip_dir):
    """The tiny CLIP loaded directly with transformers: image and text embedding functions."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(metrics_tiny_clip_dir, local_files_only=True).eval()
    processor = CLIPImageProcessor.from_pretrained(metrics_tiny_clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(metrics_tiny_clip_dir)

    @torch.no_grad()
    def image_embedding(image: Image.Image) -> np.ndarray:
        pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return features(model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def text_embedding(prompt: str) -> np.ndarray:
        ids = tokenizer(prompt, truncation=True, max_length=77, return_tensors="pt")["input_ids"]
        return features(model.get_text_features(input_ids=ids))

    return image_embedding, text_embedding


def test_clip_i_matches_direct_transformers_computation(metrics_tiny_clip_dir, metrics_images,
                                                        clip_reference):
    image_embedding, _ = clip_reference
    images = metrics_images
    references = [images[1], images[0], None, images[3].copy(), images[1]]
    metric = ClipImageSimilarity(model=str(metrics_tiny_clip_dir), device="cpu", batch_size=2)
    scores = metric.score(MetricBatch(images, references=references))
    assert scores[2] is None
    for i in (0, 1, 4):
        expected = manual_cosine(image_embedding(images[i]), image_embedding(references[i]))
        assert scores[i] == pytest.approx(expected, abs=1e-5)
    assert scores[3] == pytest.approx(1.0, abs=1e-5)  # an identical copy
    assert abs(scores[0]) < 0.9999  # distinct images are not scored as identical


def test_clip_i_mini_batches_and_reused_references_do_not_change_scores(
        metrics_tiny_clip_dir, metrics_images):
    images = metrics_images
    shared = images[0]
    one_batch = ClipImageSimilarity(model=str(metrics_tiny_clip_dir), device="cpu",
                                    batch_size=16)
    small_batches = ClipImageSimilarity(model=str(metrics_tiny_clip_dir), device="cpu",
                                        batch_size=1)
    reused = one_batch.score(MetricBatch(images, references=[shared] * len(images)))
    copies = small_batches.score(
        MetricBatch(images, references=[shared.copy() for _ in images]))
    assert np.allclose(reused, copies, atol=1e-6)
    assert reused[0] == pytest.approx(1.0, abs=1e-5)


def test_clip_t_matches_direct_transformers_computation(metrics_tiny_clip_dir, metrics_images,
                                                        clip_reference):
    image_embedding, text_embedding = clip_reference
    prompts = ["a photo of the cat", "portrait", None, "   ",
               "a photo of " + "the red and blue cat " * 30]  # > 77 tokens: truncated
    metric = ClipTextSimilarity(model=str(metrics_tiny_clip_dir), device="cpu", batch_size=2)
    scores = metric.score(MetricBatch(metrics_images, prompts=prompts))
    assert scores[2] is None and scores[3] is None
    for i in (0, 1, 4):
        expected = manual_cosine(image_embedding(metrics_images[i]), text_embedding(prompts[i]))
        assert scores[i] == pytest.approx(expected, abs=1e-5)
    assert all(-1.0 <= s <= 1.0 for s in scores if s is not None)


def test_clip_t_needs_prompts(metrics_tiny_clip_dir, metrics_images):
    metric = ClipTextSimilarity(model=str(metrics_tiny_clip_dir), device="cpu")
    with pytest.raises(InvalidArgumentError, match="prompts"):
        metric.score(MetricBatch(metrics_images))


def test_style_default_is_clip_image_cosine(metrics_tiny_clip_dir, metrics_images,
                                            clip_reference):
    image_embedding, _ = clip_reference
    references = [metrics_images[0].copy(), metrics_images[2], None, metrics_images[0],
                  metrics_images[3]]
    metric = StyleSimilarity(model=str(metrics_tiny_clip_dir), device="cpu")
    scores = metric.score(MetricBatch(metrics_images, references=references))
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[2] is None
    for i in (1, 3, 4):
        expected = manual_cosine(image_embedding(metrics_images[i]),
                                 image_embedding(references[i]))
        assert scores[i] == pytest.approx(expected, abs=1e-5)


def dino_eval_pixels(image: Image.Image, mean, std) -> torch.Tensor:
    """DINO's evaluation transform written out: shorter side to RESIZE (PIL bicubic), centre
    crop CROP (offsets rounded), scale to [0, 1], normalise."""
    width, height = image.size
    if width <= height:
        size = (RESIZE, int(RESIZE * height / width))
    else:
        size = (int(RESIZE * width / height), RESIZE)
    resized = image.convert("RGB").resize(size, Image.BICUBIC)
    left = int(round((size[0] - CROP) / 2.0))
    top = int(round((size[1] - CROP) / 2.0))
    crop = np.asarray(resized.crop((left, top, left + CROP, top + CROP)), dtype=np.float32) / 255
    normalised = (crop - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(normalised.transpose(2, 0, 1).copy())[None]


@pytest.fixture(scope="module")
def dino_reference(metrics_tiny_dino_dir):
    from transformers import ViTModel

    model = ViTModel.from_pretrained(metrics_tiny_dino_dir, add_pooling_layer=False,
                                     local_files_only=True).eval()
    config = json.loads((metrics_tiny_dino_dir / "preprocessor_config.json").read_text())

    @torch.no_grad()
    def cls_embedding(image: Image.Image, pixels: torch.Tensor | None = None) -> np.ndarray:
        if pixels is None:
            pixels = dino_eval_pixels(image, config["image_mean"], config["image_std"])
        return model(pixel_values=pixels).last_hidden_state[0, 0].numpy()

    return cls_embedding


def test_dino_matches_direct_vit_cls_computation(metrics_tiny_dino_dir, metrics_images,
                                                 dino_reference):
    images = metrics_images
    references = [images[1], images[2].copy(), images[0], None, images[4]]
    metric = DinoSimilarity(model=str(metrics_tiny_dino_dir), device="cpu", batch_size=2)
    scores = metric.score(MetricBatch(images, references=references))
    assert scores[3] is None
    for i in (0, 2, 4):
        expected = manual_cosine(dino_reference(images[i]), dino_reference(references[i]))
        assert scores[i] == pytest.approx(expected, abs=1e-5)
    assert scores[4] == pytest.approx(1.0, abs=1e-5)
    assert scores[0] < 0.9999


def test_dino_reads_normalisation_from_the_checkpoint(tmp_path, metrics_tiny_dino_dir,
                                                      metrics_images, dino_reference):
    """A checkpoint whose processor config has other statistics is normalised with those."""
    copy = tmp_path / "dino-other-stats"
    shutil.copytree(metrics_tiny_dino_dir, copy)
    config_file = copy / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    config_file.write_text(json.dumps(config))
    image, reference = metrics_images[0], metrics_images[1]
    score = DinoSimilarity(model=str(copy), device="cpu").score(
        MetricBatch([image], references=[reference]))[0]
    half = ([0.5] * 3, [0.5] * 3)
    expected = manual_cosine(dino_reference(image, dino_eval_pixels(image, *half)),
                             dino_reference(reference, dino_eval_pixels(reference, *half)))
    assert score == pytest.approx(expected, abs=1e-5)


def test_dino_processor_preprocessing_uses_the_published_processor(
        metrics_tiny_dino_dir, metrics_images, dino_reference):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(metrics_tiny_dino_dir)
    image, reference = metrics_images[1], metrics_images[2]
    metric = DinoSimilarity(model=str(metrics_tiny_dino_dir), device="cpu",
                            preprocess="processor")
    score = metric.score(MetricBatch([image], references=[reference]))[0]

    def pixels(img):
        return processor(images=img, return_tensors="pt")["pixel_values"]

    expected = manual_cosine(dino_reference(image, pixels(image)),
                             dino_reference(reference, pixels(reference)))
    assert score == pytest.approx(expected, abs=1e-5)


def test_models_load_once_per_metric(metrics_tiny_clip_dir, metrics_images):
    metric = ClipImageSimilarity(model=str(metrics_tiny_clip_dir), device="cpu").load()
    model = metric.image_model
    metric.score(MetricBatch(metrics_images[:2], references=metrics_images[:2]))
    assert metric.load() is metric and metric.image_model is model


# -- availability ----------------------------------------------------------------------------


@pytest.mark.parametrize("metric_class", [ClipImageSimilarity, ClipTextSimilarity,
                                          StyleSimilarity, DinoSimilarity])
def test_missing_model_directory_is_reported_unavailable(tmp_path, metric_class):
    missing = tmp_path / "no-such-model"
    metric = metric_class(model=str(missing), device="cpu")
    reason = metric.availability()
    assert reason is not None and str(missing) in reason
    with pytest.raises(MetricUnavailableError, match="no-such-model"):
        metric.load()
    with pytest.raises(MetricUnavailableError):
        metric.score(MetricBatch([Image.new("RGB", (32, 32))],
                                 references=[Image.new("RGB", (32, 32))], prompts=["a"]))


def test_incomplete_clip_directory_names_the_missing_files(tmp_path, metrics_tiny_clip_dir):
    copy = tmp_path / "clip-incomplete"
    shutil.copytree(metrics_tiny_clip_dir, copy)
    (copy / "preprocessor_config.json").unlink()
    for name in ("vocab.json", "tokenizer.json"):
        (copy / name).unlink(missing_ok=True)
    image_reason = ClipImageSimilarity(model=str(copy)).availability()
    assert "incomplete" in image_reason and "preprocessor_config.json" in image_reason
    assert "vocab.json" not in image_reason  # the image metrics need no tokenizer
    text_reason = ClipTextSimilarity(model=str(copy)).availability()
    assert "preprocessor_config.json" in text_reason and "vocab.json" in text_reason


@pytest.fixture()
def metrics_empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize(("metric_class", "default"), [
    (ClipImageSimilarity, "openai/clip-vit-large-patch14"),
    (ClipTextSimilarity, "openai/clip-vit-large-patch14"),
    (StyleSimilarity, "openai/clip-vit-large-patch14"),
    (DinoSimilarity, "facebook/dino-vits16"),
])
def test_default_model_offline_and_not_cached_is_unavailable(metrics_empty_hf_cache,
                                                             metric_class, default):
    metric = metric_class()
    reason = metric.availability()
    kind = "DINO" if metric_class is DinoSimilarity else "CLIP"
    assert reason.startswith(
        f"metric {metric_class.name!r} ({kind} model): {default!r} is not in the local Hugging "
        "Face cache and HF_HUB_OFFLINE is set, so it cannot be downloaded.")
    assert f"hf download {default}" in reason
    with pytest.raises(MetricUnavailableError, match="HF_HUB_OFFLINE is set"):
        metric.load()


def test_model_found_in_the_hf_cache_loads_from_its_snapshot(metrics_empty_hf_cache,
                                                             metrics_tiny_dino_dir,
                                                             metrics_images, dino_reference):
    """A repo id whose snapshot is in the cache is available offline and loads from there."""
    repo = metrics_empty_hf_cache / "models--facebook--dino-vits16"
    shutil.copytree(metrics_tiny_dino_dir, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    metric = DinoSimilarity(device="cpu")
    assert metric.availability() is None
    image, reference = metrics_images[0], metrics_images[3]
    score = metric.score(MetricBatch([image], references=[reference]))[0]
    assert score == pytest.approx(
        manual_cosine(dino_reference(image), dino_reference(reference)), abs=1e-5)


def test_checkpoint_missing_weights_is_refused_not_randomly_filled(tmp_path,
                                                                   metrics_tiny_dino_dir):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "dino-truncated"
    shutil.copytree(metrics_tiny_dino_dir, copy)
    state = load_file(copy / "model.safetensors")
    dropped = "encoder.layer.1.output.dense.weight"
    assert dropped in state
    del state[dropped]
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    metric = DinoSimilarity(model=str(copy), device="cpu")
    assert metric.availability() is None  # the files are there ...
    with pytest.raises(MetricUnavailableError, match="randomly initialised") as info:
        metric.load()  # ... but a weight is not
    # transformers names the parameter in its own (possibly renamed) module layout
    assert "(missing " in str(info.value) and "1." in str(info.value)


def test_non_vit_checkpoint_is_refused_by_dino(metrics_tiny_clip_dir):
    with pytest.raises(InvalidArgumentError, match="'clip' model"):
        DinoSimilarity(model=str(metrics_tiny_clip_dir), device="cpu").load()


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("metric_class", [ClipImageSimilarity, ClipTextSimilarity,
                                          StyleSimilarity, DinoSimilarity])
def test_unknown_and_bad_options_name_the_value(metric_class):
    with pytest.raises(InvalidArgumentError,
                       match="unknown option 'modle' of metric .*; known options: batch_size, "):
        metric_class(modle="x")
    with pytest.raises(InvalidArgumentError, match="invalid batch_size=0"):
        metric_class(batch_size=0)
    with pytest.raises(InvalidArgumentError, match="invalid model=''"):
        metric_class(model="")


def test_bad_preprocess_and_device(metrics_tiny_dino_dir):
    with pytest.raises(InvalidArgumentError, match="invalid preprocess='imagenet'"):
        DinoSimilarity(preprocess="imagenet")
    with pytest.raises(InvalidArgumentError, match="invalid device='gpu0'"):
        DinoSimilarity(model=str(metrics_tiny_dino_dir), device="gpu0").load()
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="CUDA is not available"):
            DinoSimilarity(model=str(metrics_tiny_dino_dir), device="cuda").load()


def test_default_device(metrics_tiny_dino_dir):
    metric = DinoSimilarity(model=str(metrics_tiny_dino_dir)).load()
    assert metric.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert next(metric.model.parameters()).device.type == metric.device


@pytest.mark.gpu
def test_clip_and_dino_on_gpu_match_cpu(metrics_tiny_clip_dir, metrics_tiny_dino_dir,
                                        metrics_images):
    batch = MetricBatch(metrics_images, references=metrics_images[::-1],
                        prompts=["a photo"] * len(metrics_images))
    for metric_class, source in ((ClipImageSimilarity, metrics_tiny_clip_dir),
                                 (ClipTextSimilarity, metrics_tiny_clip_dir),
                                 (DinoSimilarity, metrics_tiny_dino_dir)):
        cpu = metric_class(model=str(source), device="cpu").score(batch)
        gpu = metric_class(model=str(source), device="cuda").score(batch)
        assert np.allclose(cpu, gpu, atol=1e-4)
