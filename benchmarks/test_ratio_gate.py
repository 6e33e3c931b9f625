"""CI's gate on speed: ratios measured in the same run, never absolute times.

The engine's loop for an image (prompt encoding, steps, decoding) against the plain diffusers
pipeline call for the same image, timed interleaved in this process on tiny models: the engine
owns the loop, so a regression that adds work between steps (a host sync, an extra copy, a
per-step re-encoding) shows as a ratio above the gate on any machine, whatever its speed.

The gate leaves room for CPU timing noise on a shared 2-core machine: the medians of seven
interleaved repeats gave 0.98 (sd15), 0.93 (sdxl) and 0.74 (flux-schnell) on the development
machine with another job running; a regression of the loop is far larger. (Whole tiny sweeps
are not gated: on a CPU, batching buys little and their model loading dominates, so their
ratio is noise.)
"""

from __future__ import annotations

import statistics
import time

import torch

from adapterswap.denoise import denoise

STEPS = 4
REPEATS = 7
#: the engine may take at most this much longer than the pipeline for the same image
ENGINE_GATE = 1.3


def _interleaved(first, second, repeats: int = REPEATS) -> tuple[float, float]:
    """Median seconds of ``first`` and ``second``, run alternately after one warm-up each."""
    first()
    second()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def test_engine_costs_no_more_than_the_pipeline(tiny_backbone):
    pipe = tiny_backbone.pipe
    kwargs = {"guidance_scale": 0.0} if tiny_backbone.guidance_mode == "none" else {}

    def engine():
        with torch.no_grad():
            denoise(tiny_backbone, "a photo of a cat", num_inference_steps=STEPS, seeds=[0],
                    output_type="pt")

    def pipeline():
        pipe("a photo of a cat", num_inference_steps=STEPS,
             height=tiny_backbone.default_height, width=tiny_backbone.default_width,
             generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)

    ours, theirs = _interleaved(engine, pipeline)
    ratio = ours / theirs
    print(f"{tiny_backbone.name}: engine {ours * 1e3:.1f} ms, pipeline {theirs * 1e3:.1f} ms, "
          f"ratio {ratio:.2f}")
    assert ratio <= ENGINE_GATE, (tiny_backbone.name, ours, theirs)
