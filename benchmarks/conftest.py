"""Benchmarks on tiny models (CPU). Run and save JSON:

    python -m pytest benchmarks --benchmark-enable --benchmark-json=benchmarks/results.json

CI runs them once with ``--benchmark-disable`` so they cannot rot. GPU benchmarks at the
published model sizes live in ``benchmarks/gpu/`` and are marked ``gpu``.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Tiny backbones benchmarked when their plugin is installed.
BACKBONES = ("sd15", "sdxl", "flux-schnell")


def registered(name: str) -> bool:
    from adapterswap.plugins import backbones

    return name in backbones()


@pytest.fixture(scope="session", params=BACKBONES)
def tiny_backbone(request):
    """A loaded tiny backbone (skipped when its plugin is not installed)."""
    if not registered(request.param):
        pytest.skip(f"backbone {request.param!r} is not installed")
    from adapterswap.plugins import get_backbone

    return get_backbone(request.param).tiny(seed=0)
