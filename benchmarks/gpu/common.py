"""Shared helpers of the GPU benchmarks: timing, FLOP counting, memory, JSON results.

Every figure is the median of ``repeats`` synchronised runs after ``warmup`` runs, measured
in the same process as its baseline so that the ratio compares like with like.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """Median / min wall time of ``fn`` (synchronised) and the peak memory of one run."""
    import torch

    for _ in range(warmup):
        fn()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times),
            "peak_gib": peak}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def write(results: dict[str, Any], out: str | Path, *, quiet: bool = False) -> None:
    """Write ``results`` (with the device name) as JSON; print it unless ``quiet``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"device": device_name(), **results}
    out.write_text(json.dumps(results, indent=2, default=str))
    if not quiet:
        print(json.dumps(results, indent=2, default=str))
