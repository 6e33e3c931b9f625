"""Metrics that need no model: sharpness, RMS contrast and latency (a built-in plugin)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterswap import hookimpl
from adapterswap.metrics.base import Metric, MetricBatch

if TYPE_CHECKING:
    from PIL import Image


def grayscale(image: Image.Image) -> Any:
    """Luma (ITU-R 601, as PIL's ``"L"`` mode) as a float64 array in [0, 255]."""
    import numpy as np

    return np.asarray(image.convert("L"), dtype=np.float64)


def laplacian_variance(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the luma (OpenCV's ``Laplacian(ksize=1)``
    kernel) over the interior pixels: higher means more high-frequency detail."""
    gray = grayscale(image)
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    lap = (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
           - 4.0 * gray[1:-1, 1:-1])
    return float(lap.var())


def rms_contrast(image: Image.Image) -> float:
    """RMS contrast: standard deviation of the luma scaled to [0, 1]."""
    return float((grayscale(image) / 255.0).std())


class Sharpness(Metric):
    name = "sharpness"
    default_for = frozenset({"*"})
    model_free = True
    needs = frozenset()
    higher_is_better = True
    description = "Variance of the Laplacian of the luma (detail / focus)"

    def score(self, batch: MetricBatch) -> list[float | None]:
        return [laplacian_variance(image) for image in batch.images]


class Contrast(Metric):
    name = "contrast"
    default_for = frozenset({"*"})
    model_free = True
    needs = frozenset()
    higher_is_better = True
    description = "RMS contrast: standard deviation of the luma in [0, 1]"

    def score(self, batch: MetricBatch) -> list[float | None]:
        return [rms_contrast(image) for image in batch.images]


class Latency(Metric):
    name = "latency"
    default_for = frozenset({"*"})
    model_free = True
    needs = frozenset({"timing"})
    higher_is_better = False
    description = "Synchronised wall time per image in seconds (total; denoise_s also kept)"

    def score(self, batch: MetricBatch) -> list[float | None]:
        self.check_batch(batch)
        assert batch.timings is not None
        return [t.get("total_s") for t in batch.timings]


@hookimpl
def register_metrics(register):  # type: ignore[no-untyped-def]
    register(Sharpness)
    register(Contrast)
    register(Latency)
