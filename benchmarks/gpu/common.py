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


def gpu_busy(fn: Callable[[], Any], gaps: int = 8) -> dict[str, Any]:
    """How much of one call's wall time the GPU spent in kernels (torch.profiler), and the
    largest idle gaps between kernels with the kernels on either side: what is left between
    kernels is launch overhead, host work and synchronisation."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 with_stack=True) as prof:
        start = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - start
    cuda = torch.autograd.DeviceType.CUDA
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == cuda and e.time_range.end > e.time_range.start)
    busy_us, idle, end, previous = 0.0, [], None, ""
    for begin, stop, name in kernels:
        if end is not None and begin > end:
            idle.append((begin - end, previous[:60], name[:60], end, begin))
        if end is None or stop > end:
            busy_us += stop - max(begin, end if end is not None else begin)
            end, previous = stop, name
    idle.sort(reverse=True)
    by_kind: dict[str, float] = {}
    for begin, stop, name in kernels:
        low = name.lower()
        kind = ("attention" if any(w in low for w in ("flash", "fmha", "attn", "sdpa"))
                else "matmul" if any(w in low for w in ("gemm", "sm90_xmma", "cutlass",
                                                         "nvjet", "matmul", "mm_"))
                else "conv" if "conv" in low
                else "triton (fused elementwise, norms)" if "triton" in low
                else "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + (stop - begin) / 1e6
    span_us = (kernels[-1][1] - kernels[0][0]) if kernels else 0.0
    return {"profiled_wall_s": wall, "kernel_s": busy_us / 1e6, "kernels": len(kernels),
            "busy_fraction": busy_us / 1e6 / wall if wall else 0.0,
            "idle_between_kernels_s": (span_us - busy_us) / 1e6,
            "before_first_and_after_last_s": wall - span_us / 1e6,
            "gaps_over_100us": sum(1 for g in idle if g[0] > 100),
            "kernel_s_by_kind": {k: round(v, 4) for k, v in sorted(by_kind.items())},
            "largest_gaps": [{"us": round(g, 1), "after": a, "before": b,
                              "host": _host_work(prof, start_us, stop_us)}
                             for g, a, b, start_us, stop_us in idle[:gaps]]}


def _host_work(prof: Any, start_us: float, stop_us: float, top: int = 3) -> list[str]:
    """What the host ran while the GPU idled from ``start_us`` to ``stop_us``: the longest
    CPU operations starting in that window, each with its innermost frame of this project's
    or diffusers' code (the profile is taken ``with_stack``)."""
    import torch

    cpu = torch.autograd.DeviceType.CPU
    found = []
    for e in prof.events():
        if e.device_type == cpu and start_us <= e.time_range.start < stop_us:
            frames = [f for f in (getattr(e, "stack", None) or [])
                      if "adapterswap" in f or "diffusers" in f or "transformers" in f]
            found.append((e.time_range.end - e.time_range.start,
                          f"{e.name} {round(e.time_range.end - e.time_range.start)}us "
                          f"@ {frames[0] if frames else '?'}"))
    found.sort(reverse=True)
    return [text[:200] for _, text in found[:top]]


def psnr(image: Any, reference: Any) -> float:
    """PSNR (dB) of two images in [0, 1] (capped at 120 dB for identical ones)."""
    import math

    mse = float(((image - reference) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


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
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:  # pragma: no cover - every benchmark runs diffusers
        diffusers_version = None
    results = {"device": device_name(), "torch": torch.__version__,
               "diffusers": diffusers_version, **results}
    out.write_text(json.dumps(results, indent=2, default=str))
    if not quiet:
        print(json.dumps(results, indent=2, default=str))


def timed_sweep(backbone: Any, adapter: Any, conditioning: Any = None, *, accelerator: Any,
                **spec_fields: Any) -> dict[str, Any]:
    """Run one sweep of the engine on an already loaded backbone and adapter (kept loaded
    afterwards) in a temporary store; return its wall time beside the summary's forward and
    finishing times. ``conditioning`` replaces the adapter's reference encoding (adapters
    built in memory without face models); ``accelerator`` is the backbone's
    :class:`~adapterswap.fastpath.Accelerator`, the same one for every sweep of the backbone
    (what an earlier sweep compiled stays compiled); ``spec_fields`` go to
    :class:`SweepSpec`."""
    import tempfile

    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.models import ModelFactory
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    class InMemoryModels(ModelFactory):
        """Hands out the models already loaded, the backbone's accelerator (and, if given, the
        reference encoding)."""

        def backbone(self, name: str) -> Any:
            return backbone

        def accelerator(self, b: Any) -> Any:
            return accelerator

        def adapter(self, name: str, b: Any = None) -> Any:
            self.adapters[name] = adapter
            return adapter

        def conditioning(self, adapter: Any, b: Any, ref: str) -> Any:
            if conditioning is None:
                return super().conditioning(adapter, b, ref)
            return conditioning

    backbone.unload = lambda: None  # keep the pipeline for the baseline and the next sweep
    with tempfile.TemporaryDirectory() as out:
        spec = SweepSpec(backbones=[backbone.name], timing_repeats=0, metrics=["sharpness"],
                         references=["synthetic:0"], out=out, save_images=False,
                         **spec_fields).validate()
        with RunStore(out) as store:
            models = InMemoryModels.from_spec(spec, reference_folder=store.out / "references")
            sync()
            start = time.perf_counter()
            summary = SweepEngine(spec, store, models=models).run()
            sync()
            wall = time.perf_counter() - start
    cells = len(spec.steps) * len(spec.seeds) * len(spec.prompts)
    if summary.done != cells:
        raise RuntimeError(f"sweep finished {summary.done} of {cells} cells: {summary}")
    return {"wall_s": wall, "forward_s": summary.forward_seconds, "forwards": summary.forwards,
            "shared_first_steps": summary.shared_first_steps,
            # wall outside the forwards: before the first / after the last, and between them
            "outside_span_s": wall - summary.forward_span_seconds,
            "between_forwards_s": summary.forward_span_seconds - summary.forward_seconds,
            "finish_s": summary.finish_seconds, "decode_s": summary.decode_seconds,
            "wall_over_forwards": wall / max(summary.forward_seconds, 1e-9),
            "fast_path": summary.fast_path}
