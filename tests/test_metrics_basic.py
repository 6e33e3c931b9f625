"""Model-free metrics against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from adapterswap.errors import InvalidArgumentError
from adapterswap.metrics import MetricBatch
from adapterswap.metrics.basic import Contrast, Latency, Sharpness


def reference_laplacian_variance(gray: np.ndarray) -> float:
    """Explicit 3x3 correlation loop with kernel [[0,1,0],[1,-4,1],[0,1,0]] over the interior."""
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    h, w = gray.shape
    out = np.empty((h - 2, w - 2))
    for y in range(h - 2):
        for x in range(w - 2):
            out[y, x] = (gray[y:y + 3, x:x + 3] * kernel).sum()
    return float(out.var())


def test_sharpness_matches_explicit_convolution_and_orders_images():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L").convert("RGB")
    flat = Image.new("RGB", (20, 24), (90, 90, 90))
    blurred = noisy.resize((5, 6)).resize((24, 20), Image.BILINEAR)
    scores = Sharpness().score(MetricBatch([noisy, flat, blurred]))
    gray = np.asarray(noisy.convert("L"), dtype=np.float64)
    assert scores[0] == pytest.approx(reference_laplacian_variance(gray))
    assert scores[1] == 0.0
    assert scores[0] > scores[2] > 0.0


def test_contrast_is_std_of_luma():
    half = np.zeros((10, 10, 3), dtype=np.uint8)
    half[:, 5:] = 255
    scores = Contrast().score(MetricBatch([Image.fromarray(half), Image.new("RGB", (4, 4))]))
    assert scores == [pytest.approx(0.5), 0.0]


def test_latency_needs_timings():
    image = Image.new("RGB", (4, 4))
    assert Latency().score(MetricBatch([image], timings=[{"total_s": 1.25}])) == [1.25]
    with pytest.raises(InvalidArgumentError, match="timings"):
        Latency().score(MetricBatch([image]))
