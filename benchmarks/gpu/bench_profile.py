"""Measure a backbone's compile profile on this card: from how much planned work compiling its
denoiser repays itself in a sweep. ``--save`` keeps it as the user's own profile
(``~/.cache/adapterswap/fastpath_profile.json``, ``XDG_CACHE_HOME`` honoured), which then
overrides the figure the plugin ships (see :mod:`adapterswap.fastpath.profile`).

    python benchmarks/gpu/bench_profile.py --backbone sd15 --save      # H100: ~3 min
    python benchmarks/gpu/bench_profile.py --backbone flux-schnell --out results/profile.json
    python benchmarks/gpu/bench_profile.py --backbone sd15 --tiny       # CPU smoke test

One sweep (``--steps`` x ``--seeds``, the backbone's default adapter, random weights at the
published size) runs four times in one process, in the sequential order compiled sweeps use:
eager twice (the second is timed); compiled on a cold inductor cache (a fresh
``TORCHINDUCTOR_CACHE_DIR``, so compile time is included); compiled again (warm). Then

- compile cost = cold wall time - warm wall time;
- saving = (eager forward time - warm forward time) / forwards, per forward; or per
  image-step (/ images per forward) for compute-bound denoisers (``--unit image-steps``,
  the default where the current profile counts image-steps, as FLUX's does);
- break-even = cost / saving, rounded up.

Compile mode and scope are the current profile's unless ``--compile-mode`` /
``--compile-scope`` name others (to measure an alternative).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import timed_sweep, write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15")
    parser.add_argument("--steps", default="1,2,4,8,16,28")
    parser.add_argument("--seeds", type=int, default=4, help="images per forward")
    parser.add_argument("--unit", choices=["forwards", "image-steps"], default=None)
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--compile-scope", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke test)")
    parser.add_argument("--save", action="store_true", help="keep it as the user's profile")
    parser.add_argument("--out", default=None, help="also write the measurement as JSON")
    args = parser.parse_args()
    # before torch is imported: compilation must not find kernels of an earlier run
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="adapterswap-inductor-")

    import torch

    from adapterswap import plugins
    from adapterswap.devices import device_name
    from adapterswap.fastpath import Accelerator, CompileProfile, FastPath, save_profile

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backbone_cls = plugins.backbones().get(args.backbone)
    adapter_cls = plugins.adapters().get(backbone_cls.default_adapter)
    if args.tiny:
        backbone = backbone_cls.tiny()
        adapter = adapter_cls.tiny(backbone)
        height, width = backbone_cls.tiny_size or (64, 64)
    else:
        backbone = backbone_cls.random(device=device, dtype=dtype)
        adapter = adapter_cls.random(backbone)
        height, width = backbone.default_height, backbone.default_width
    adapter.attach(backbone)
    conditioning = adapter.encode_reference(adapter.tiny_reference(), backbone)
    accelerator = Accelerator(backbone)
    current = accelerator.profile
    unit = args.unit or ("image-steps" if current.pays_after_image_steps else "forwards")
    mode = args.compile_mode or current.compile_mode
    scope = args.compile_scope or current.compile_scope
    grid = {"seeds": list(range(args.seeds)), "steps": [int(s) for s in args.steps.split(",")],
            "prompts": ["a portrait photo, soft light"], "height": height, "width": width,
            "step_parallel": False, "max_batch": args.seeds}
    runs: dict[str, dict[str, Any]] = {}
    for label in ("eager-warm-up", "eager"):  # the first pays allocator and kernel warm-up
        runs[label] = timed_sweep(backbone, adapter, conditioning, accelerator=accelerator,
                                  compile=False, **grid)
    # compiled on the CPU too (--tiny): the smoke test runs the same path
    accelerator.enable(FastPath(compile=True, compile_mode=mode, compile_scope=scope),
                       adapters=[adapter])
    for label in ("cold", "warm"):
        runs[label] = timed_sweep(backbone, adapter, conditioning, accelerator=accelerator,
                                  compile=True, **grid)
        print(label, runs[label], flush=True)
    result = measure(runs, unit, args.seeds)
    card = device_name(backbone.execution_device)
    result.update(backbone=backbone.name, adapter=adapter.name, card=card, unit=unit,
                  compile_mode=mode, compile_scope=scope, height=height, width=width,
                  dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                  previous_profile=current.report(), runs=runs)
    print({k: v for k, v in result.items() if k != "runs"}, flush=True)
    if result["break_even"] is not None and (args.save or args.out):
        forwards_unit = unit == "forwards"
        profile = CompileProfile(
            backbone.name, compile_mode=mode, compile_scope=scope,
            pays_after_forwards=result["break_even"] if forwards_unit else None,
            pays_after_image_steps=None if forwards_unit else result["break_even"],
            device=card, measured=describe(result))
        result["profile"] = profile.entry()
        if args.save:
            print("saved to", save_profile(profile), flush=True)
    if args.out:
        write(result, args.out, quiet=True)


def measure(runs: dict[str, dict[str, Any]], unit: str, per_forward: int) -> dict[str, Any]:
    """Compile cost, saving per unit and the break-even from the three sweeps (``None`` when
    compiling saved nothing: it never repays)."""
    forwards = max(1, runs["warm"]["forwards"])
    compile_s = max(0.0, runs["cold"]["wall_s"] - runs["warm"]["wall_s"])
    saved_per_forward = (runs["eager"]["forward_s"] - runs["warm"]["forward_s"]) / forwards
    saved = saved_per_forward / (per_forward if unit == "image-steps" else 1)
    break_even = math.ceil(compile_s / saved) if saved > 0 else None
    return {"compile_s": compile_s, "saved_per_unit_s": saved, "forwards": forwards,
            "eager_forward_s": runs["eager"]["forward_s"],
            "compiled_forward_s": runs["warm"]["forward_s"], "break_even": break_even}


def describe(result: dict[str, Any]) -> str:
    """The profile's ``measured`` text: what ran and what it gave."""
    return (f"{result['backbone']} + {result['adapter']}, {result['dtype']}, "
            f"{result['height']}x{result['width']}, bench_profile.py (torch {result['torch']}): "
            f"compiling took ~{result['compile_s']:.0f} s and saved "
            f"~{result['saved_per_unit_s'] * 1000:.1f} ms per {result['unit'][:-1]} "
            f"({result['forwards']} forwards: {result['eager_forward_s']:.2f} s eager against "
            f"{result['compiled_forward_s']:.2f} s compiled)")


if __name__ == "__main__":
    main()
