"""FLUX.1-schnell + InfuseNet under memory budgets (24 and 16 GiB) at 1024 x 1024, 4 steps,
against the unbudgeted bf16 eager pipeline in the same process (issue #20 part 5).

    python benchmarks/gpu/bench_memory.py --out results/memory.json       # one H200
    python benchmarks/gpu/bench_memory.py --budgets 24 --no-compile        # a subset
    python benchmarks/gpu/bench_memory.py --tiny --out /tmp/memory.json    # CPU smoke test

The weights (random, at the published sizes: :mod:`adapterswap_flux.published`) are built once,
on the GPU (initialising 17B parameters on the CPU takes many minutes), so the baseline and every
budget run the same ones:

1. **baseline**: ``flux-schnell`` wrapped as it is, whole on the GPU (bf16, eager), InfuseNet
   attached; its images (one per seed) are what every budgeted image is compared with. Then
   everything moves to the CPU, the master copy the budgets start from.
2. **each budget**: fresh copies of the transformer and InfuseNet (a plan casts them in place),
   the backbone made through the real code path (``FluxSchnell.from_pipeline(pipe,
   memory_budget=B)``: planned, the process capped with
   ``torch.cuda.set_per_process_memory_fraction(B GiB / card memory)``, placed), InfuseNet
   attached through its real ``attach`` (placed by the backbone, float8 where planned); then
   the same images eager and, unless ``--no-compile``, on the fast path (regional
   ``torch.compile`` through the backbone's :class:`~adapterswap.fastpath.Accelerator`).

Per row: text encoding once (as a sweep encodes each prompt once; its time and peak apart),
then 1 warm-up + ``--images`` images, one seed each (0, 1, ...), timed end to end (control
canvas VAE-encoded per image, 4 steps, decode; prompt embeddings given), ``peak_gib`` =
``torch.cuda.max_memory_allocated`` over those images (reset before), ``peak_since_placed_gib``
over everything since the plan was placed (placement, encoding, the warm-up, the images;
before the run of 2026-12-03 it repeated ``peak_gib`` by mistake), s/image (median),
PSNR (dB) of each image against the baseline's image of its seed, the plan and what it did
(float8 layers, streamed blocks, evicted encoders, streaming statistics), and
``allocated_before_gib``: what the process still held on the GPU before the row (the cap
counts it; a first run on the H200 left a compiled row's modules uncollected, and the next row
ran out of memory under 16 GiB).

On the CPU (``--tiny``) no process cap exists: each budget is scaled to the tiny pipeline
(``budget / 16`` times the least budget it can meet) and placed through the same planner and
placement without the cap; the rows say so.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_flux import build, build_infusenet, engine_adapter, free, id_tokens, tiny_configs  # noqa: E402
from common import psnr, sync, write  # noqa: E402

PROMPT = "a portrait photo of a person, soft studio light"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu/results/memory.json")
    parser.add_argument("--budgets", default="24,16", help="GiB, comma-separated")
    parser.add_argument("--images", type=int, default=3, help="timed images per row")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if args.tiny:
        tiny_configs()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = 64 if args.tiny else 1024
    from adapterswap.denoise import TensorBundle

    started = time.perf_counter()
    pipe, _ = build("schnell", device, dtype, None)
    controlnet, resampler = build_infusenet(device, dtype)
    ids = id_tokens(resampler, device, dtype).cpu()
    results: dict[str, Any] = {"dtype": str(dtype), "height": size, "width": size,
                               "steps": args.steps, "images": args.images,
                               "build_s": time.perf_counter() - started, "rows": []}
    bench = Bench(TensorBundle({"id_embeds": ids}), size, args, results)
    baseline = bench.baseline(pipe, controlnet, resampler, device)
    for budget in budgets:
        for compiled in (False,) if args.no_compile or not cuda else (False, True):
            bench.budget_row(pipe, controlnet, resampler, device, budget, compiled, baseline)
    bench.save()
    summary = {row["row"]: {k: row.get(k) for k in ("s_per_image", "peak_gib",
                                                     "peak_since_placed_gib", "min_psnr_db")}
               for row in results["rows"]}
    results["summary"] = summary
    write(results, args.out)


class Bench:
    """Times the rows and keeps the results file up to date."""

    def __init__(self, conditioning: Any, size: int, args: Any,
                 results: dict[str, Any]) -> None:
        self.conditioning, self.size, self.args, self.results = conditioning, size, args, results

    def save(self) -> None:
        write(self.results, self.args.out, quiet=True)

    def baseline(self, pipe: Any, controlnet: Any, resampler: Any, device: str) -> dict:
        """The unbudgeted bf16 eager pipeline, whole on the device: its images by seed; then
        every module moves to the CPU."""
        from adapterswap_flux.backbones import FluxSchnell

        backbone = FluxSchnell.from_pipeline(pipe, device=device)
        adapter = engine_adapter(controlnet, resampler, device, backbone.dtype)
        adapter.attach(backbone)
        label = f"baseline: {str(backbone.dtype).replace('torch.', '')} eager, no budget"
        row, images = self.images(backbone, adapter, label)
        self.results["rows"].append(row)
        print(row, flush=True)
        self.save()
        adapter.detach()
        started = time.perf_counter()
        pipe.to("cpu")
        controlnet.to("cpu")
        resampler.to("cpu")
        free()
        row["to_cpu_s"] = time.perf_counter() - started
        return {"row": row, "images": images}

    def budget_row(self, pipe: Any, controlnet: Any, resampler: Any, device: str,
                   budget: float, compiled: bool, baseline: dict) -> None:
        """One budget, placed through the real code path on fresh copies of the modules a
        plan changes in place."""
        import torch
        from adapterswap_flux.backbones import FluxSchnell
        from diffusers import FluxPipeline

        from adapterswap.fastpath import Accelerator, FastPath

        label = f"memory_budget={budget:g}, {'fast path (compiled)' if compiled else 'eager'}"
        free()  # the previous row's modules (and a compiled row's graphs) are gone by now
        before = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
        fresh = FluxPipeline(**{**pipe.components,
                                "transformer": copy.deepcopy(pipe.transformer)})
        fresh.set_progress_bar_config(disable=True)
        adapter = engine_adapter(copy.deepcopy(controlnet), resampler, "cpu", pipe.vae.dtype)
        row: dict[str, Any] = {"row": label, "budget_gib": budget,
                               "allocated_before_gib": before}
        backbone = None
        try:
            started = time.perf_counter()
            if device == "cuda":  # the user's path: the option, enforced by the process cap
                backbone = FluxSchnell.from_pipeline(fresh, device=device, memory_budget=budget)
            else:  # CPU smoke test: same planner and placement, scaled, without the cap
                backbone = self.tiny_placed(fresh, budget)
                row["note"] = ("CPU smoke test: budget scaled to the tiny pipeline, placed "
                               "without the CUDA cap")
            adapter.attach(backbone)
            row["place_s"] = time.perf_counter() - started
            accelerator = None
            if compiled:
                accelerator = Accelerator(backbone)
                row["fast_path"] = accelerator.enable(FastPath(compile=True),
                                                      adapters=[adapter])
            measured, images = self.images(backbone, adapter, label, accelerator=accelerator)
            row.update(measured)
            row["psnr_db"] = [psnr(images[seed], baseline["images"][seed]) for seed in images]
            row["min_psnr_db"] = min(row["psnr_db"])
            row["baseline_s_per_image"] = baseline["row"]["s_per_image"]
            row["memory"] = backbone.memory_record()
        except (RuntimeError, ValueError) as exc:  # an OOM under the cap is a result too
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            if backbone is not None and backbone.placement is not None:
                row["memory"] = backbone.memory_record()
        finally:
            adapter.detach()
            if backbone is not None:
                backbone.unload()
            fresh.vae.to("cpu")
            del fresh, adapter, backbone
            if device == "cuda":
                torch._dynamo.reset()
            free()
        self.results["rows"].append(row)
        print({k: v for k, v in row.items() if k not in ("memory", "fast_path")}, flush=True)
        self.save()

    def tiny_placed(self, pipe: Any, budget: float) -> Any:
        """The CPU smoke test's budgeted backbone: ``budget`` / 16 times the least budget the
        tiny pipeline can meet (16: every block streams; 24: fewer)."""
        import torch
        from adapterswap_flux.backbones import FluxSchnell
        from adapterswap_flux.budget import parts_and_activations

        from adapterswap.fastpath.memory import least_budget_gib

        backbone = FluxSchnell("<in-memory>", device="cpu", dtype=pipe.vae.dtype)
        backbone.pipe = pipe
        backbone.default_height = backbone.default_width = self.size
        parts, act = parts_and_activations(pipe.components, dtype=backbone.dtype,
                                           height=self.size, width=self.size,
                                           text_tokens=backbone.max_sequence_length)
        least = least_budget_gib(parts, act, float8_available=False)
        backbone.memory_budget = least * budget / 16 * 1.001
        plan = backbone.plan_memory(pipe.components)
        backbone.place_under_budget(plan, copy=lambda dst, src: dst.copy_(src), cap=False)
        assert torch.device(backbone.device).type == "cpu"
        return backbone

    def images(self, backbone: Any, adapter: Any, label: str, *,
               accelerator: Any = None) -> tuple[dict[str, Any], dict[int, Any]]:
        """Encode the prompt once, then 1 warm-up and ``--images`` timed images."""
        import torch

        from adapterswap.denoise import denoise

        def peak_reset() -> None:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def peak() -> float | None:
            return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() \
                else None

        since_placed = peak()  # the budget's placement reset the counter; the baseline's not
        peak_reset()
        sync()
        begin = time.perf_counter()
        encoding = backbone.encode_prompt([PROMPT])
        sync()
        encode_s = time.perf_counter() - begin
        encode_peak = peak()

        def image(seed: int) -> tuple[Any, float]:
            adapter._control_cache.clear()  # the control canvas is encoded per image
            sync()
            start = time.perf_counter()
            result = denoise(backbone, PROMPT, num_inference_steps=self.args.steps,
                             seeds=[seed], height=self.size, width=self.size, adapter=adapter,
                             conditioning=self.conditioning, prompt_encoding=encoding,
                             output_type="pt", accelerator=accelerator)
            sync()
            return result.images.float().cpu(), time.perf_counter() - start

        _, first_s = image(0)  # warm-up (a compiled row compiles here)
        warm_peak = peak()  # encoding and the warm-up
        peak_reset()
        times, images = [], {}
        for seed in range(self.args.images):
            images[seed], seconds = image(seed)
            times.append(seconds)
        row = {"row": label, "s_per_image": statistics.median(times), "times_s": times,
               "first_image_s": first_s, "text_encode_s": encode_s,
               "text_encode_peak_gib": encode_peak, "peak_gib": peak()}
        record = getattr(backbone, "memory_record", lambda: None)()
        if record is not None:  # placement, encoding, warm-up and the timed images
            peaks = [p for p in (since_placed, warm_peak, row["peak_gib"]) if p is not None]
            row["peak_since_placed_gib"] = max(peaks) if peaks else None  # None off CUDA
            row["warm_up_peak_gib"] = warm_peak
            row["plan"] = record["plan"]
            row["enforced"] = record["enforced"]
        elif since_placed is not None:
            row["peak_before_gib"] = since_placed
        return row, images


if __name__ == "__main__":
    main()
