"""FLUX dev/schnell + InfuseNet at the published sizes with random weights: adapterswap's engine
against a hand-written diffusers loop (InfiniteYou's pipeline logic) in the same process.

    python benchmarks/gpu/bench_flux.py --out results/flux.json             # H100: ~7 min
    python benchmarks/gpu/bench_flux.py --sweep --out results/flux.json     # + the sweep target
    python benchmarks/gpu/bench_flux.py --size 864x1152 --rows dev,schnell,fast,fp8
    python benchmarks/gpu/bench_flux.py --tiny --out /tmp/flux-tiny.json     # CPU smoke test
    python benchmarks/gpu/bench_flux.py --rows dev,fp8,memory               # a subset of rows

Rows, in this order (each change to the shared modules comes after the rows it would affect):

1. ``flux-dev`` 28 steps: the eager diffusers loop (the baseline every speed-up is against)
   and the eager engine; then (``cache``) the engine with each block-cache policy of
   ``--cache-policies`` (opt-in approximation; distance from the eager engine's image; on
   random weights the threshold policy's skip rate means nothing, the interval policy's
   speed does);
2. ``flux-schnell`` 4 steps: eager diffusers loop, eager engine, then the engine on the fast
   path (regional ``torch.compile`` of transformer and InfuseNet, cuDNN attention, compiled VAE
   decoder, and ``compile_encoders``: text encoders and the VAE encoder), then with
   float8 linears (opt-in approximation; fidelity against the eager engine's image, same seed);
   ``fa3``: the same compiled modules with FlashAttention-3 in SDPA's place (exact);
   ``graphs``: recompiled with CUDA graphs (``reduce-overhead``) over the regions, with the
   best exact attention; the float8 rows then run on CUDA graphs too, with float8
   FlashAttention-3 (``attn=fa3-fp8``) as a further approximation. Each fast row records the
   share of its wall time the GPU spent in kernels (torch.profiler, one image);
3. with ``--sweep``: steps {1,2,4,8,16,28} x 4 seeds, one eager diffusers-loop call per cell
   against the compiled engine sweep (sum of forwards beside the wall time);
4. memory options on a fresh schnell pipeline and InfuseNet: model CPU offload (bf16), 8-bit
   weights (optimum-quanto ``qint8``, as InfiniteYou's ``--quantize_8bit``) and both together
   (InfiniteYou's ``--cpu_offload --quantize_8bit``), peak memory and latency.

Weights do not change latency, so nothing is downloaded. Face detection is not included (as in
the reference figures); the ID tokens come from the resampler applied to a random embedding.
Per-image end-to-end times include text encoding and the control-image VAE encoding (the
engine's control-latent cache is cleared before each timed image).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from adapterswap_flux import published  # noqa: E402
from common import count_flops, gpu_busy, psnr, sync, timed, timed_sweep, write  # noqa: E402

ROWS = ("dev", "cache", "schnell", "fast", "sweep", "fa3", "graphs", "fp8", "memory")


def tiny_configs() -> None:
    """Shrink the published configs (CPU smoke test of the script)."""
    small = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=48, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    published.TRANSFORMER.update(small)
    published.INFUSENET.update(small, num_layers=1, num_single_layers=1)
    published.CLIP_L.update(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=2, projection_dim=32)
    published.T5_XXL.update(d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    published.VAE.update(block_out_channels=(16, 16, 32, 32), norm_num_groups=8)


def build(variant: str, device: str, dtype: Any, shared: dict[str, Any] | None) -> Any:
    """A FluxPipeline of random weights at the published size."""
    return published.random_flux_pipeline(variant, device, dtype, 0, shared)


def build_infusenet(device: str, dtype: Any) -> tuple[Any, Any]:
    return published.random_infusenet(device, dtype)


def engine_adapter(controlnet: Any, resampler: Any, device: str, dtype: Any) -> Any:
    """adapterswap's InfuseNet adapter around in-memory modules (face models not needed)."""
    import torch
    from adapterswap_flux.infusenet import InfuseNet

    adapter = InfuseNet(device=device, dtype=dtype)
    adapter.infusenet, adapter.resampler = controlnet, resampler
    adapter.face = SimpleNamespace(arcface=torch.nn.Identity(), device=device)
    adapter.loaded = True
    return adapter


def id_tokens(resampler: Any, device: str, dtype: Any) -> Any:
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    embedding = torch.randn(1, 1, 512, generator=g).to(device, dtype)
    with torch.no_grad():
        return resampler(embedding)


def diffusers_loop(pipe: Any, controlnet: Any, ids: Any, prompt: str, steps: int,
                   guidance: float | None, height: int, width: int, seed: int) -> Any:
    """Hand-written diffusers loop the way InfiniteYou's pipeline drives the modules: text
    encode, control-image encode, N x (InfuseNet + transformer), VAE decode."""
    import numpy as np
    import torch
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    from PIL import Image

    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt, prompt_2=None, device=device, max_sequence_length=512 if guidance else 256)
        canvas = Image.new("RGB", (width, height))
        pixels = pipe.image_processor.preprocess(canvas, height=height, width=width)
        control = pipe.vae.encode(pixels.to(device, dtype)).latent_dist.mode()
        control = (control - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        c, h, w = control.shape[1:]
        control = pipe._pack_latents(control, 1, c, h, w)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents, image_ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4,
                                                  height, width, dtype, device, generator)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = None
        if pipe.scheduler.config.get("use_dynamic_shifting"):
            mu = calculate_shift(latents.shape[1], pipe.scheduler.config.base_image_seq_len,
                                 pipe.scheduler.config.max_image_seq_len,
                                 pipe.scheduler.config.base_shift,
                                 pipe.scheduler.config.max_shift)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
        g_in = torch.full([1], guidance, device=device) if guidance else None
        txt_ids = torch.zeros(ids.shape[1], 3, device=device, dtype=dtype)
        for t in timesteps:
            ts = t.expand(1).to(dtype) / 1000
            blocks, singles = controlnet(
                hidden_states=latents, controlnet_cond=control, conditioning_scale=1.0,
                timestep=ts, guidance=torch.ones(1, device=device), pooled_projections=pooled,
                encoder_hidden_states=ids, txt_ids=txt_ids, img_ids=image_ids,
                return_dict=False)
            noise = pipe.transformer(
                hidden_states=latents, timestep=ts, guidance=g_in, pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds, controlnet_block_samples=blocks,
                controlnet_single_block_samples=singles, txt_ids=text_ids, img_ids=image_ids,
                return_dict=False)[0]
            latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu/results/flux.json")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--rows", default="dev,cache,schnell,fast,fp8,memory",
                        help=f"comma-separated subset of {','.join(ROWS)} (the schnell eager "
                             "rows always run: they are the reference image)")
    parser.add_argument("--cache-policies", default="interval:2,threshold:0.1",
                        help="block-cache policies of the cache rows (flux-dev, 28 steps)")
    parser.add_argument("--fast-cache-policies", default="interval:2",
                        help="block caches tried on top of the float8 rows (flux-schnell)")
    parser.add_argument("--no-fp8", action="store_true", help="skip the float8 rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory-option rows")
    parser.add_argument("--sweep", action="store_true", help="also the steps x seeds sweep")
    parser.add_argument("--sweep-steps", default="1,2,4,8,16,28")
    parser.add_argument("--sweep-seeds", type=int, default=4)
    args = parser.parse_args()
    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = rows - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)} (choose from {','.join(ROWS)})")
    rows |= {"schnell"} | ({"sweep"} if args.sweep else set())
    rows -= ({"fp8"} if args.no_fp8 else set()) | ({"memory"} if args.no_memory else set())
    if args.tiny:
        tiny_configs()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    height, width = (64, 64) if args.tiny else (int(v) for v in args.size.split("x"))
    from adapterswap_flux.backbones import FluxDev, FluxSchnell

    from adapterswap import fastpath
    from adapterswap.denoise import TensorBundle
    from adapterswap.fastpath import Accelerator

    controlnet, resampler = build_infusenet(device, dtype)
    ids = id_tokens(resampler, device, dtype)
    adapter = engine_adapter(controlnet, resampler, device, dtype)
    conditioning = TensorBundle({"id_embeds": ids})
    results: dict[str, Any] = {"dtype": str(dtype), "height": height, "width": width,
                               "rows": []}
    bench = Bench(adapter, conditioning, ids, height, width, args.repeats, results, args.out)

    # 1. flux-dev, eager: the baseline
    shared = None
    base_dev = eager_dev = None
    if "dev" in rows:
        pipe, shared = build("dev", device, dtype, None)
        dev = FluxDev.from_pipeline(pipe, device=device)
        dev.dtype = dtype
        bench.flops(dev, 3.5)
        base_dev = bench.row("flux-dev", "diffusers loop, eager", dev, 28, 3.5, engine=False)
        eager_dev = bench.row("flux-dev", "engine, eager", dev, 28, 3.5, keep_image=True)
        if "cache" in rows:  # approximation: speed and distance from the eager engine's image
            dev_fast = Accelerator(dev)
            for policy in args.cache_policies.split(","):
                dev_fast.enable(fastpath.FastPath())  # a fresh cache (and counts) each
                dev_fast.enable(fastpath.FastPath(cache=policy))
                row = bench.row("flux-dev", f"engine, block cache {policy} (approximation)",
                                dev, 28, 3.5, accelerator=dev_fast)
                row["cache"] = dev_fast.block_cache.stats()  # over all runs of the row
                bench.save()
            dev_fast.enable(fastpath.FastPath())
        adapter.detach()
        del dev, pipe
        free()

    # 2. flux-schnell: eager, fast path, float8
    pipe, shared = build("schnell", device, dtype, shared)
    schnell = FluxSchnell.from_pipeline(pipe, device=device)
    schnell.dtype = dtype
    schnell_fast = Accelerator(schnell)  # its one accelerator: rows and sweeps share it
    bench.flops(schnell, None)
    base = bench.row("flux-schnell", "diffusers loop, eager", schnell, 4, None, engine=False)
    eager = bench.row("flux-schnell", "engine, eager", schnell, 4, None, keep_image=True)
    if "sweep" in rows:  # the baseline while the modules are still eager
        results["sweep"] = sweep_baseline(schnell, controlnet, ids, height, width, args)
    summary = results.setdefault("summary", {})
    if base_dev is not None:
        summary.update({
            "swap_speedup_eager_engine": eager_dev["end_to_end_s"] / eager["end_to_end_s"],
            "swap_speedup_diffusers_loop": base_dev["end_to_end_s"] / base["end_to_end_s"]})
    if rows & {"fast", "sweep"}:
        start = time.perf_counter()
        report = schnell_fast.enable(fastpath.FastPath(compile=True, compile_encoders=True),
                                     adapters=[adapter])
        fast = bench.row("flux-schnell", "engine, fast path", schnell, 4, None,
                         setup_s=time.perf_counter() - start, fast_path=report,
                         accelerator=schnell_fast)
        summary.update(speedups("fast", fast, base, base_dev))
    if "sweep" in rows:
        results["sweep"].update(sweep(schnell, schnell_fast, adapter, conditioning, height,
                                      width, args))
        for label in ("cold", "warm"):
            results["sweep"][f"speedup_{label}"] = results["sweep"]["diffusers_per_cell_s"] \
                / results["sweep"][f"engine_{label}"]["wall_s"]
        bench.save()
    from adapterswap.fastpath.flash import fa3_unavailable

    no_fa3 = fa3_unavailable(device)
    exact_attention = "auto"
    if "fa3" in rows and rows & {"fast", "sweep"} and no_fa3:
        results["fa3"] = f"not run: {no_fa3}"
    elif "fa3" in rows and rows & {"fast", "sweep"}:
        schnell_fast.enable(fastpath.FastPath(compile=True, compile_encoders=True,
                                              attention="fa3"), adapters=[adapter])
        fa3 = bench.row("flux-schnell", "engine, fast path, FlashAttention-3", schnell, 4, None,
                        accelerator=schnell_fast, busy=True)
        summary.update(speedups("fa3", fa3, base, base_dev))
        if fa3["per_step_s"] < fast["per_step_s"]:
            exact_attention = "fa3"
    mode = "default"
    if "graphs" in rows and device == "cuda":
        torch._dynamo.reset()
        mode = "reduce-overhead"
        schnell_fast = Accelerator(schnell)  # the modules are recompiled in the new mode
        start = time.perf_counter()
        report = schnell_fast.enable(fastpath.FastPath(
            compile=True, compile_encoders=True, compile_mode=mode, attention=exact_attention),
            adapters=[adapter])
        graphs = bench.row("flux-schnell", f"engine, fast path, CUDA graphs, attention "
                           f"{exact_attention}", schnell, 4, None, accelerator=schnell_fast,
                           setup_s=time.perf_counter() - start, fast_path=report, busy=True)
        summary.update(speedups("graphs", graphs, base, base_dev))
    if "fp8" in rows and fastpath.fp8_supported(device):
        start = time.perf_counter()
        layers = 0
        for module in (schnell.pipe.transformer, controlnet):
            layers += fastpath.to_float8(module)
        torch._dynamo.reset()
        for module in (schnell.pipe.transformer, controlnet):
            fastpath.compile_module(module, mode, "regions")
        fp8 = bench.row("flux-schnell", f"engine, fast path ({mode}) + float8 linears "
                        "(approximation)", schnell, 4, None, setup_s=time.perf_counter() - start,
                        fp8_layers=layers, accelerator=schnell_fast, busy=True)
        summary.update(speedups("fp8", fp8, base, base_dev))
        if not no_fa3:
            schnell_fast.fast_path = schnell_fast.fast_path.with_(attention="fa3-fp8")
            fp8_attn = bench.row("flux-schnell", f"engine, fast path ({mode}) + float8 linears "
                                 "+ float8 FlashAttention-3 (approximation)", schnell, 4, None,
                                 accelerator=schnell_fast, busy=True)
            summary.update(speedups("fp8_attention", fp8_attn, base, base_dev))
        for policy in args.fast_cache_policies.split(",") if args.fast_cache_policies else ():
            try:  # every approximation together: float8, float8 attention, a block cache
                schnell_fast.enable(schnell_fast.fast_path.with_(cache=policy))
                row = bench.row("flux-schnell", f"engine, fast path ({mode}) + float8 linears "
                                f"+ float8 attention + block cache {policy} (approximation)",
                                schnell, 4, None, accelerator=schnell_fast, busy=True)
                row["cache"] = schnell_fast.block_cache.stats()
                summary.update(speedups(f"fp8_cache_{policy}", row, base, base_dev))
            except Exception as exc:  # noqa: BLE001 - recorded, the other rows stand
                results.setdefault("errors", []).append(f"block cache {policy}: {exc!r}")
            bench.save()
    elif "fp8" in rows:
        results["fp8"] = f"not run: float8 needs compute capability 8.9+ (device {device})"
    bench.save()
    adapter.detach()  # nothing may keep the modules above alive into the memory rows
    del schnell, pipe, controlnet, adapter
    bench.adapter = None
    torch._dynamo.reset()
    free()

    # 4. memory options, on fresh modules (float8 and compilation changed the ones above)
    if "memory" in rows:
        memory_rows(bench, shared, device, dtype, resampler)
    bench.save()


def speedups(label: str, row: dict[str, Any], base: dict[str, Any],
             base_dev: dict[str, Any] | None) -> dict[str, float]:
    """``row``'s speed-up over the eager schnell loop and (when run) the eager dev loop."""
    out = {f"{label}_schnell_vs_eager_schnell_baseline":
           base["end_to_end_s"] / row["end_to_end_s"]}
    if base_dev is not None:
        out[f"{label}_schnell_vs_eager_dev_baseline"] = \
            base_dev["end_to_end_s"] / row["end_to_end_s"]
    return out


class Bench:
    """Times rows (engine or diffusers loop) and keeps the results file up to date."""

    def __init__(self, adapter: Any, conditioning: Any, ids: Any, height: int, width: int,
                 repeats: int, results: dict[str, Any], out: str) -> None:
        self.adapter, self.conditioning, self.ids = adapter, conditioning, ids
        self.height, self.width, self.repeats = height, width, repeats
        self.results, self.out = results, out
        self.step_flops: dict[str, float] = {}
        self.reference_images: dict[str, Any] = {}  # per backbone: the eager engine's image

    def flops(self, backbone: Any, guidance: float | None) -> None:
        self.step_flops[backbone.name] = _step_flops(backbone, self.adapter, self.conditioning,
                                                     self.height, self.width, guidance)

    def row(self, backbone_name: str, label: str, backbone: Any, steps: int,
            guidance: float | None, *, engine: bool = True, keep_image: bool = False,
            warmup: int = 1, repeats: int | None = None, accelerator: Any = None,
            busy: bool = False, **extra: Any) -> dict[str, Any]:
        """Time one image of ``backbone`` (the engine's loop, through ``accelerator`` when
        its fast path is on, or the hand-written diffusers loop) and record the row."""

        from adapterswap.denoise import denoise

        prompt = "a portrait photo of a person, soft studio light"
        phases: dict[str, list[float]] = {"encode_s": [], "denoise_s": [], "decode_s": []}

        def run() -> Any:
            if not engine:
                return diffusers_loop(backbone.pipe, self.adapter.infusenet, self.ids, prompt,
                                      steps, guidance, self.height, self.width, 0)
            self.adapter._control_cache.clear()  # per image: encode the control canvas too
            result = denoise(backbone, prompt, num_inference_steps=steps, seeds=[0],
                             height=self.height, width=self.width, adapter=self.adapter,
                             conditioning=self.conditioning, output_type="pt",
                             accelerator=accelerator)
            for phase, values in phases.items():
                values.append(result.timings[phase])
            return result.images

        sync()
        begin = time.perf_counter()
        image = run().float().cpu()
        sync()
        first_s = time.perf_counter() - begin
        timing = timed(run, warmup=warmup, repeats=repeats or self.repeats)
        if busy:  # the share of one image's wall time spent in GPU kernels
            extra["gpu"] = gpu_busy(run)
        flops = self.step_flops.get(backbone.name, 0.0)
        row: dict[str, Any] = {"backbone": backbone_name, "row": label, "steps": steps,
                               "end_to_end_s": timing["median_s"], "min_s": timing["min_s"],
                               "first_call_s": first_s, "peak_gib": timing["peak_gib"],
                               "step_tflop": flops / 1e12, **extra}
        if phases["denoise_s"]:  # medians of the engine's phases (text encoding, decoding)
            median = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
            per_step = median["denoise_s"] / steps
            row.update(per_step_s=per_step, achieved_tflops=flops / per_step / 1e12,
                       text_encode_s=median["encode_s"], decode_s=median["decode_s"])
        reference = self.reference_images.get(backbone_name)
        if keep_image:
            self.reference_images[backbone_name] = image
        elif reference is not None and engine and reference.shape == image.shape:
            row.update(max_abs_pixel_diff_vs_eager=float((image - reference).abs().max()),
                       psnr_db_vs_eager=psnr(image, reference))
        self.results["rows"].append(row)
        print(row, flush=True)
        self.save()
        return row

    def save(self) -> None:
        write(self.results, self.out, quiet=True)


def free() -> None:
    import gc

    import torch

    gc.collect()
    sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_rows(bench: Bench, shared: dict[str, Any], device: str, dtype: Any,
                resampler: Any) -> None:
    """Model CPU offload (bf16), 8-bit weights, and both, on a fresh schnell pipeline and
    InfuseNet (same seeds as above, so the images compare with the eager engine's)."""
    import torch
    from adapterswap_flux.backbones import FluxSchnell

    if device != "cuda":
        bench.results["memory"] = "not run: CPU offload and the 8-bit timings need a GPU"
        return
    controlnet, _ = build_infusenet(device, dtype)
    bench.adapter = engine_adapter(controlnet, resampler, device, dtype)
    pipe, shared = build("schnell", device, dtype, shared)

    def offloaded(label: str, **extra: Any) -> None:
        pipe.to("cpu")
        free()
        pipe.enable_model_cpu_offload(device=device)
        backbone = FluxSchnell("<in-memory>", device=device, dtype=dtype, cpu_offload=True)
        backbone.pipe = pipe  # from_pipeline would move the offloaded pipeline to the GPU
        bench.row("flux-schnell", label, backbone, 4, None, warmup=0, repeats=2,
                  note="InfuseNet stays on the GPU, as in InfiniteYou", **extra)
        bench.adapter.detach()
        pipe.remove_all_hooks()

    offloaded("engine, model CPU offload (bf16)")
    try:
        import optimum.quanto as quanto
    except ImportError:
        bench.results["memory_8bit"] = "not run: optimum-quanto is not installed"
        return
    pipe.to(device)
    start = time.perf_counter()
    for module in (pipe.transformer, pipe.text_encoder_2, controlnet):
        quanto.quantize(module, weights=quanto.qint8)
        quanto.freeze(module)
    setup_s = time.perf_counter() - start
    free()
    backbone = FluxSchnell.from_pipeline(pipe, device=device)
    backbone.dtype = dtype
    bench.row("flux-schnell", "engine, 8-bit weights (quanto qint8: transformer, T5, "
              "InfuseNet)", backbone, 4, None, setup_s=setup_s,
              weights_gib=torch.cuda.memory_allocated() / 2**30)
    bench.adapter.detach()
    del backbone
    offloaded("engine, 8-bit weights + model CPU offload")


SWEEP_PROMPT = "a portrait photo of a person, soft studio light"


def sweep_baseline(backbone: Any, controlnet: Any, ids: Any, height: int, width: int,
                   args: Any) -> dict:
    """One eager diffusers-loop call per cell of the steps x seeds grid."""
    steps = [int(s) for s in args.sweep_steps.split(",")]
    seeds = list(range(args.sweep_seeds))
    sync()
    begin = time.perf_counter()
    for n in steps:
        for seed in seeds:
            diffusers_loop(backbone.pipe, controlnet, ids, SWEEP_PROMPT, n, None, height,
                           width, seed)
    sync()
    result = {"steps": steps, "seeds": len(seeds),
              "diffusers_per_cell_s": time.perf_counter() - begin}
    print("sweep baseline", result, flush=True)
    return result


def sweep(backbone: Any, accelerator: Any, adapter: Any, conditioning: Any, height: int,
          width: int, args: Any) -> dict[str, Any]:
    """The engine's sweep of the same grid on the (already compiled) fast path: cold (first
    sweep at this batch shape) and warm (again, in a fresh store)."""
    steps = [int(s) for s in args.sweep_steps.split(",")]
    seeds = list(range(args.sweep_seeds))
    results: dict[str, Any] = {}
    for label in ("cold", "warm"):
        results[f"engine_{label}"] = timed_sweep(
            backbone, adapter, conditioning, accelerator=accelerator, seeds=seeds, steps=steps,
            prompts=[SWEEP_PROMPT], height=height, width=width, compile=True)
        print(label, results[f"engine_{label}"], flush=True)
    return results


def _step_flops(backbone: Any, adapter: Any, conditioning: Any, height: int, width: int,
                guidance: float | None) -> float:
    import torch

    from adapterswap.denoise import StepContext

    prompt = backbone.encode_prompt(["a photo"], guidance_scale=guidance)
    latents = backbone.prepare_latents([torch.Generator().manual_seed(0)], height=height,
                                       width=width)
    schedule = backbone.schedule(4, height=height, width=width)
    ctx = StepContext(schedule.timesteps[:1], (0,), (4,), height, width, schedule.sigmas[:1])

    def step() -> Any:
        inputs = adapter.denoiser_inputs(backbone, conditioning, latents, ctx, prompt)
        return backbone.predict(latents, ctx, prompt, guidance_scale=guidance,
                                adapter_inputs=inputs)

    if adapter.attached_to is not backbone:
        adapter.attach(backbone)
    return float(count_flops(step))


if __name__ == "__main__":
    main()
