"""The adapterswap hook implementations of ``adapterswap-metrics`` (no torch import here)."""

from __future__ import annotations

from collections.abc import Callable

from adapterswap import hookimpl
from adapterswap_metrics.clip_metrics import (
    ClipImageSimilarity,
    ClipTextSimilarity,
    StyleSimilarity,
)
from adapterswap_metrics.dino import DinoSimilarity
from adapterswap_metrics.perceptual import LPIPSMetric

METRICS = (LPIPSMetric, ClipImageSimilarity, ClipTextSimilarity, DinoSimilarity, StyleSimilarity)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    """Register lpips, clip-i, clip-t, dino and style."""
    for metric in METRICS:
        register(metric)
