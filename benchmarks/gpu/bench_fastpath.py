"""One denoiser step (adapter + denoiser) under each switch of the fast path, at the published
size with random weights: time per step, achieved TFLOP/s, compile time, host syncs inside the
step, and the output's distance from the eager step (the fidelity cost of each switch).

    python benchmarks/gpu/bench_fastpath.py --backbone flux-schnell --out results/fast-flux.json
    python benchmarks/gpu/bench_fastpath.py --backbone sd15 --batch 8 --variants eager,graphs
    python benchmarks/gpu/bench_fastpath.py --backbone sd15 --tiny      # CPU smoke test

Variants apply in the order given and build on each other where they must (fusion and float8
change the modules in place): ``eager`` (PyTorch's default attention), ``flash``, ``cudnn``,
``fuse`` (fused QKV, with cuDNN attention), ``compile`` / ``compile-default`` /
``compile-overhead`` / ``compile-autotune`` (the mode and scope of the backbone's compile
profile for the card; ``default``, ``reduce-overhead``, ``max-autotune`` on the whole model),
``compile-regions`` and ``compile-blocks`` (default mode, per block list / per UNet
transformer and ResNet block: compile time against speed), ``compile-autotune-regions``
(``max-autotune-no-cudagraphs`` per block list: Triton GEMM templates with fused epilogues),
``fp8`` (float8 linears, eager), ``fp8-compile`` (float8 with fast accumulation, compiled)
and ``fp8-compile-precise`` (float8 with full-precision accumulation, compiled).

``--profile VARIANTS`` adds, for those variants, the top kernels and the GPU time split into
matrix products, attention and everything else (normalisation, activations, quantisation,
copies), with the TFLOP/s the matrix products and attention reach on their own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import sync, write  # noqa: E402

DEFAULT_VARIANTS = "eager,flash,cudnn,fuse,compile,fp8,fp8-compile"


def build(name: str, tiny: bool, device: str, dtype: Any) -> tuple[Any, Any]:
    from adapterswap import plugins

    backbone_cls = plugins.backbones().get(name)
    adapter_cls = plugins.adapters().get(backbone_cls.default_adapter)
    if tiny:
        backbone = backbone_cls.tiny()
        adapter = adapter_cls.tiny(backbone)
    else:
        backbone = backbone_cls.random(device=device, dtype=dtype)
        adapter = adapter_cls.random(backbone)
    return backbone, adapter


def main() -> None:
    import torch

    from adapterswap import fastpath
    from adapterswap.denoise import StepContext
    from adapterswap.fastpath import Accelerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="flux-schnell")
    parser.add_argument("--batch", type=int, default=1, help="images per step (before CFG)")
    parser.add_argument("--size", default=None, help="HxW (default: the backbone's)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke test)")
    parser.add_argument("--profile", default="",
                        help="comma-separated variants whose step is profiled (top kernels)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    backbone, adapter = build(args.backbone, args.tiny, device, dtype)
    build_s = time.perf_counter() - start
    if args.size:
        height, width = (int(v) for v in args.size.split("x"))
    else:
        height, width = backbone.default_height, backbone.default_width
    if args.tiny:
        height = width = 64
    guidance = backbone.resolve_guidance_scale(None)
    adapter.attach(backbone)
    prompt = backbone.encode_prompt(["a portrait photo, soft light"], guidance_scale=guidance)
    prompt = prompt.repeat(args.batch)
    conditioning = adapter.encode_reference(adapter.tiny_reference(), backbone)
    conditioning = conditioning.repeat(args.batch)
    latents = backbone.prepare_latents(
        [torch.Generator(backbone.generator_device).manual_seed(s) for s in range(args.batch)],
        height=height, width=width)
    steps = backbone.default_steps
    schedule = backbone.schedule(steps, height=height, width=width)
    index = min(1, steps - 1)
    ctx = StepContext(timesteps=schedule.timesteps[index].expand(args.batch),
                      step_indices=(index,) * args.batch, num_steps=(steps,) * args.batch,
                      height=height, width=width,
                      sigmas=None if schedule.sigmas is None
                      else schedule.sigmas[index].expand(args.batch))

    accelerator = Accelerator(backbone)

    def step() -> Any:
        with torch.no_grad(), accelerator.step_context():
            inputs = adapter.denoiser_inputs(backbone, conditioning, latents, ctx, prompt)
            return backbone.predict(latents, ctx, prompt, guidance_scale=guidance,
                                    adapter_inputs=inputs)

    modules = {**backbone.fast_modules(), **adapter.fast_modules()}
    kinds = flops_by_kind(step)  # before any compilation: a dispatch mode over compiled
    flops = sum(kinds.values())  # regions makes them recompile
    results: dict[str, Any] = {
        "backbone": backbone.name, "adapter": adapter.name, "batch": args.batch,
        "height": height, "width": width, "build_s": build_s, "step_tflop": flops / 1e12,
        "torch": torch.__version__, "compile_profile": accelerator.profile.report(),
        "variants": []}
    reference = None
    for variant in args.variants.split(","):
        try:
            compile_s = apply(variant, accelerator, modules, fastpath)
        except Exception as exc:  # report and go on: one broken switch must not hide the rest
            results["variants"].append({"variant": variant, "error": repr(exc)[:500]})
            print(variant, "failed:", repr(exc)[:500], flush=True)
            continue
        sync()
        begin = time.perf_counter()
        try:
            out = step()
        except Exception as exc:
            results["variants"].append({"variant": variant, "error": repr(exc)[:500]})
            print(variant, "failed:", repr(exc)[:500], flush=True)
            continue
        sync()
        first_s = time.perf_counter() - begin
        for _ in range(2):
            step()
        times = []
        for _ in range(args.repeats):
            sync()
            begin = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - begin)
        per_step = statistics.median(times)
        out = step().float()
        if reference is None:
            reference = out
        error = float((out - reference).norm() / reference.norm().clamp_min(1e-12))
        row = {"variant": variant, "per_step_s": per_step, "min_s": min(times),
               "achieved_tflops": flops / per_step / 1e12, "first_call_s": first_s,
               "compile_s": compile_s, "relative_l2_vs_eager": error,
               "max_abs_vs_eager": float((out - reference).abs().max()),
               "host_syncs": host_syncs(step) if device == "cuda" else "not checked (CPU)",
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30
               if device == "cuda" else None,
               "dynamo_graphs": dict(torch._dynamo.utils.counters["stats"])}
        if variant in args.profile.split(","):
            row["profile"], row["profile_split"] = profile(step, kinds)
            print(row["profile"], row["profile_split"], flush=True)
        results["variants"].append(row)
        print({k: v for k, v in row.items() if k != "profile"}, flush=True)
        if args.out:
            write(results, args.out)
    if args.out:
        write(results, args.out)


def apply(variant: str, accelerator: Any, modules: dict[str, Any], fastpath: Any) -> float:
    """Change the modules to ``variant`` (the attention choice through the backbone's
    accelerator, whose ``step_context`` the step runs in; ``compile`` in the mode and scope
    of its compile profile for this card); returns seconds spent (compile setup)."""
    begin = time.perf_counter()
    attention = {"eager": "default", "flash": "flash", "cudnn": "cudnn"}.get(variant, "auto")
    accelerator.fast_path = fastpath.FastPath(attention=attention, fuse_qkv=False)
    preferred = (accelerator.profile.compile_mode, accelerator.profile.compile_scope)
    if variant in ("eager", "flash", "cudnn"):
        return 0.0
    if variant == "fuse":
        for module in modules.values():
            fastpath.fuse_qkv(module)
        return 0.0
    if variant.startswith("compile") or variant.startswith("fp8-compile"):
        mode, scope = {
            "compile": preferred,
            "compile-default": ("default", "model"),
            "compile-overhead": ("reduce-overhead", "model"),
            "compile-autotune": ("max-autotune", "model"),
            "compile-regions": ("default", "regions"),
            "compile-blocks": ("default", "blocks"),
            "compile-autotune-regions": ("max-autotune-no-cudagraphs", "regions"),
            "fp8-compile": preferred,
            "fp8-compile-precise": preferred}[variant]
        import torch

        torch._dynamo.reset()
        for module in modules.values():
            module._compiled_call_impl = None
            for sub in module.modules():
                sub._compiled_call_impl = None
            if variant.startswith("fp8-compile"):
                fp8 = fastpath.float8_linear_class()
                if not any(isinstance(sub, fp8) for sub in module.modules()):
                    fastpath.to_float8(module)  # float8 even when the fp8 variant did not run
                for sub in module.modules():
                    if isinstance(sub, fp8):
                        sub.fast_accum = variant == "fp8-compile"
            fastpath.compile_module(module, mode, scope)
        return time.perf_counter() - begin
    if variant == "fp8":
        for module in modules.values():
            module._compiled_call_impl = None  # eager again
            if hasattr(module, "unfuse_qkv_projections"):
                module.unfuse_qkv_projections()
            fastpath.to_float8(module)
        return time.perf_counter() - begin
    raise SystemExit(f"--variants: unknown variant {variant!r}")


#: Substrings of kernel names, by kind (checked in this order; lower case).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "scaled_mm", "sm90_xmma", "matmul", "mm_")),
)


def kernel_kind(name: str) -> str:
    """``attention``, ``matmul`` or ``other`` for a CUDA kernel's name."""
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def flops_by_kind(step: Any) -> dict[str, float]:
    """FLOPs of one step split into attention and matrix products (FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step()
    attention = matmul = 0.0
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        if "attention" in str(op):
            attention += flops
        else:
            matmul += flops  # mm, addmm, bmm, convolution, _scaled_mm
    return {"attention": attention, "matmul": matmul}


def profile(step: Any, flops: dict[str, float], rows: int = 25) -> tuple[str, dict[str, Any]]:
    """Top kernels of two steps by GPU time (torch.profiler), and the GPU time per step split
    by :func:`kernel_kind` with the TFLOP/s each kind reaches in its own kernels."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    steps = 2
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    seconds: dict[str, float] = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    top: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        micros = event.device_time_total  # a kernel's own duration
        kind = kernel_kind(event.name)
        seconds[kind] += micros / 1e6 / steps
        if kind == "other":
            top[event.name[:80]] = top.get(event.name[:80], 0.0) + micros / 1e6 / steps
    split: dict[str, Any] = {f"{kind}_s": s for kind, s in seconds.items()}
    split["kernels_s"] = sum(seconds.values())
    for kind in ("attention", "matmul"):
        if seconds[kind] > 0:
            split[f"{kind}_tflops"] = flops[kind] / seconds[kind] / 1e12
    split["top_other_kernels_s"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows,
                                      max_name_column_width=60)
    return table, split


def host_syncs(step: Any) -> str:
    """Run one step with CUDA's sync debug mode set to error: 'none' or the first sync."""
    import torch

    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "none"
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__":
    main()
