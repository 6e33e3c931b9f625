"""LPIPS through the metric against direct ``lpips.LPIPS`` calls, offline."""

from __future__ import annotations

import lpips
import numpy as np
import pytest
import torch
from adapterswap_metrics.perceptual import ALEXNET_FILE, LPIPSMetric
from PIL import Image

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError
from adapterswap.metrics import MetricBatch

# lpips itself passes torchvision the deprecated ``pretrained=`` flag.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning")


def direct_lpips(pnet_rand: bool, seed: int = 0) -> lpips.LPIPS:
    """The package's own model: random trunk built from ``seed``, or torchvision's ImageNet
    AlexNet from the torch hub cache; calibrated v0.1 linear layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return lpips.LPIPS(net="alex", pnet_rand=pnet_rand, verbose=False).eval()


def direct_distance(model: lpips.LPIPS, first: Image.Image, second: Image.Image) -> float:
    """lpips's own image conversion (``im2tensor``: [0, 255] -> [-1, 1]) and forward."""
    with torch.no_grad():
        return model(lpips.im2tensor(np.asarray(first)),
                     lpips.im2tensor(np.asarray(second))).item()


@pytest.fixture(scope="module")
def random_trunk_lpips():
    return direct_lpips(pnet_rand=True)


@pytest.fixture(scope="module")
def lpips_metric():
    return LPIPSMetric(random_backbone=True, device="cpu", batch_size=2).load()


def test_identical_images_score_zero_and_different_ones_match_lpips(
        lpips_metric, random_trunk_lpips, metrics_make_image):
    images = [metrics_make_image(10), metrics_make_image(11), metrics_make_image(12),
              metrics_make_image(13)]
    references = [images[0].copy(), images[2], None, images[0]]
    scores = lpips_metric.score(MetricBatch(images, references=references))
    assert scores[0] == pytest.approx(0.0, abs=1e-7)
    assert scores[2] is None
    for i in (1, 3):
        expected = direct_distance(random_trunk_lpips, images[i], references[i])
        assert expected > 0
        assert scores[i] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_other_sizes_are_resized_bicubic_to_the_generated_image(
        lpips_metric, random_trunk_lpips, metrics_make_image):
    image = metrics_make_image(20, 64, 48)
    reference = metrics_make_image(21, 80, 80)
    score = lpips_metric.score(MetricBatch([image], references=[reference]))[0]
    expected = direct_distance(random_trunk_lpips, image, reference.resize((64, 48),
                                                                           Image.BICUBIC))
    assert score == pytest.approx(expected, rel=1e-5)


def test_resolution_option_resizes_both(random_trunk_lpips, metrics_make_image):
    image = metrics_make_image(30, 64, 64)
    reference = metrics_make_image(31, 50, 70)
    metric = LPIPSMetric(random_backbone=True, device="cpu", resolution=40)
    score = metric.score(MetricBatch([image], references=[reference]))[0]
    expected = direct_distance(random_trunk_lpips, image.resize((40, 40), Image.BICUBIC),
                               reference.resize((40, 40), Image.BICUBIC))
    assert score == pytest.approx(expected, rel=1e-5)


def test_against_baseline_needs_and_uses_baselines(lpips_metric, random_trunk_lpips,
                                                   metrics_make_image):
    images = [metrics_make_image(40), metrics_make_image(41)]
    baselines = [metrics_make_image(42), None]
    metric = LPIPSMetric(against="baseline", random_backbone=True, device="cpu")
    assert metric.needs == frozenset({"baseline"}) and LPIPSMetric.needs == {"reference"}
    with pytest.raises(InvalidArgumentError, match="baselines"):
        metric.score(MetricBatch(images, references=images))
    scores = metric.score(MetricBatch(images, baselines=baselines))
    assert scores[1] is None
    assert scores[0] == pytest.approx(direct_distance(random_trunk_lpips, images[0],
                                                      baselines[0]), rel=1e-5)


def test_scores_do_not_depend_on_the_mini_batch_size(lpips_metric, metrics_make_image):
    images = [metrics_make_image(50 + i) for i in range(5)]
    references = [metrics_make_image(60 + i) for i in range(5)]
    big = LPIPSMetric(random_backbone=True, device="cpu", batch_size=16)
    assert np.allclose(big.score(MetricBatch(images, references=references)),
                       lpips_metric.score(MetricBatch(images, references=references)),
                       rtol=1e-5, atol=1e-7)


def test_too_small_images_and_bad_options_are_refused(lpips_metric):
    small = Image.new("RGB", (24, 24))
    with pytest.raises(InvalidArgumentError, match="invalid images='24x24'.*32x32"):
        lpips_metric.score(MetricBatch([small], references=[small]))
    with pytest.raises(InvalidArgumentError, match="invalid against='prompt'"):
        LPIPSMetric(against="prompt")
    with pytest.raises(InvalidArgumentError, match="invalid resolution=16"):
        LPIPSMetric(resolution=16)
    with pytest.raises(InvalidArgumentError, match="unknown option 'net' of metric 'lpips'"):
        LPIPSMetric(net="vgg")


def test_offline_without_alexnet_weights_says_exactly_that(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = LPIPSMetric(device="cpu")
    expected_path = tmp_path / "torch" / "hub" / "checkpoints" / ALEXNET_FILE
    reason = metric.availability()
    assert reason.startswith(
        f"the AlexNet ImageNet weights LPIPS needs are not in torchvision's cache "
        f"({expected_path}) and HF_HUB_OFFLINE is set (no network), so they cannot be "
        "downloaded.")
    with pytest.raises(MetricUnavailableError, match="HF_HUB_OFFLINE is set"):
        metric.load()
    assert metric.model is None and not metric.loaded  # nothing random was put in its place
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert metric.availability() is None  # online, torchvision would download it


def test_imagenet_trunk_from_the_torch_cache_matches_lpips(tmp_path, monkeypatch,
                                                          metrics_make_image):
    """The real (non-random) path: AlexNet weights read from torchvision's cache file.

    The file holds random tensors in torchvision's AlexNet layout, so the metric and
    ``lpips.LPIPS(net='alex')`` (which loads the same file through torchvision) must agree.
    """
    import torchvision

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.alexnet().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in shapes.items()}
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / ALEXNET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    metric = LPIPSMetric(device="cpu")
    assert metric.availability() is None
    image, reference = metrics_make_image(70), metrics_make_image(71)
    scores = metric.score(MetricBatch([image, image], references=[reference, image.copy()]))
    trunk = metric.model.net.slice2._modules["3"].weight  # lpips keeps AlexNet's layer index
    assert torch.equal(trunk, state["features.3.weight"])
    expected = direct_distance(direct_lpips(pnet_rand=False, seed=123), image, reference)
    assert scores[0] == pytest.approx(expected, rel=1e-5)
    assert scores[1] == pytest.approx(0.0, abs=1e-7)


def test_lpips_metric_declaration():
    assert LPIPSMetric.higher_is_better is False
    assert LPIPSMetric.kinds == frozenset()
    assert "\n" not in LPIPSMetric.description


@pytest.mark.gpu
def test_lpips_on_gpu_matches_cpu(lpips_metric, metrics_make_image):
    images = [metrics_make_image(80 + i) for i in range(3)]
    references = [metrics_make_image(90 + i) for i in range(3)]
    batch = MetricBatch(images, references=references)
    gpu = LPIPSMetric(random_backbone=True, device="cuda").score(batch)
    assert np.allclose(lpips_metric.score(batch), gpu, rtol=1e-3, atol=1e-5)
