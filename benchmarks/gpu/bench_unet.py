"""SDXL + style IP-Adapter (1024 px) and SD1.5 + IP-Adapter Plus (512 px) at the published sizes
with random weights: adapterswap's engine against the plain diffusers pipeline, in one process.

    python benchmarks/gpu/bench_unet.py --out results/unet.json         # H100: ~4 min
    python benchmarks/gpu/bench_unet.py --tiny --out /tmp/unet-tiny.json  # CPU smoke test

Per backbone (base and distilled): one image end to end, engine vs ``pipe(...)`` with the same
IP-Adapter embeddings. Then the sweep target: steps {1,2,4,8,16,28} x 4 seeds with the adapter
attached, adapterswap's sweep against one eager pipeline call per cell (measured first, before
anything is compiled), in the modes of ``--modes``: ``eager-parallel`` / ``eager-sequential``
(no compilation), ``fast-cold`` (the default GPU fast path: compiled UNet with CUDA graphs,
compilation included) and ``fast-warm`` (the same sweep again in a fresh store: compilation
amortised). Each records the sum of its denoiser forwards (CUDA events, no host syncs).

    python benchmarks/gpu/bench_unet.py --skip-single --modes fast-cold,fast-warm  # targets
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from adapterswap_sd15 import published as sd15_published  # noqa: E402
from adapterswap_sdxl import published as sdxl_published  # noqa: E402
from common import count_flops, sync, timed, timed_sweep, write  # noqa: E402

SIZE = {"sdxl": 1024, "sd15": 512}


def tiny_configs() -> None:
    """Shrink the published configs (CPU smoke test of the script)."""
    clip = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                projection_dim=32)
    vit = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
               projection_dim=40)
    vae = dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8)
    sdxl_published.CLIP_L.update(clip)
    sdxl_published.CLIP_BIGG.update(clip, hidden_size=64, projection_dim=64)
    sdxl_published.VIT_BIGG.update(vit)
    sdxl_published.VAE.update(vae)
    sdxl_published.UNET.update(block_out_channels=(32, 64, 64),
                               transformer_layers_per_block=(1, 1, 2),
                               attention_head_dim=(2, 4, 4), cross_attention_dim=96,
                               addition_time_embed_dim=8,
                               projection_class_embeddings_input_dim=112)
    sd15_published.CLIP_L.update(clip)
    sd15_published.VIT_H.update(vit)
    sd15_published.VAE.update(vae)
    sd15_published.UNET.update(cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
                               block_out_channels=(32, 32, 64, 64))
    sd15_published.PLUS.update(heads=1, dim_head=64, num_queries=4)  # diffusers: heads of 64
    SIZE.update(sdxl=64, sd15=64)


def build_sdxl(device: str, dtype: Any) -> tuple[Any, Any]:
    """StableDiffusionXLPipeline + style IP-Adapter weights (random, published size)."""
    pipe = sdxl_published.random_sdxl_pipeline(device, dtype)
    return pipe, sdxl_published.random_style_weights(pipe.unet, device, dtype)


def build_sd15(device: str, dtype: Any) -> tuple[Any, Any]:
    """StableDiffusionPipeline + IP-Adapter Plus weights (random, published size)."""
    pipe = sd15_published.random_sd15_pipeline(device, dtype)
    return pipe, sd15_published.random_plus_weights(pipe.unet, device, dtype)


def adapter_in_memory(cls: Any, weights: Any, device: str, dtype: Any) -> Any:
    state, encoder, processor = weights
    adapter = cls(device=device, dtype=dtype)
    adapter.state_dict, adapter.image_encoder, adapter.feature_extractor = \
        state, encoder, processor
    adapter.loaded = True
    return adapter


def pipeline_call(pipe: Any, conditioning: Any, steps: int, guidance: float | None, size: int,
                  seed: int, scales: Any) -> Any:
    """One plain diffusers pipeline call with the same IP-Adapter image embeddings."""
    import torch

    pipe.set_ip_adapter_scale(scales)
    cfg = guidance is not None and guidance > 1
    cond, neg = conditioning["image_embeds"], conditioning["negative_image_embeds"]
    embeds = torch.cat([neg, cond]) if cfg else cond
    with torch.no_grad():
        return pipe("a photo of a red chair", num_inference_steps=steps,
                    guidance_scale=guidance if cfg else 0.0, height=size, width=size,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    ip_adapter_image_embeds=[embeds], output_type="pt").images


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu/results/unet.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--sweep-steps", default="1,2,4,8,16,28")
    parser.add_argument("--sweep-seeds", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=24)
    parser.add_argument("--modes", default="eager-parallel,eager-sequential,fast-cold,fast-warm")
    parser.add_argument("--compile-scope", default=None, choices=["model", "blocks"],
                        help="what the fast modes compile (default: the backbone's: sd15 model, "
                             "sdxl blocks)")
    parser.add_argument("--skip-single", action="store_true",
                        help="only the sweep target (no single-image rows)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        tiny_configs()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32

    import adapterswap_sd15.plugin
    import adapterswap_sdxl.plugin
    from adapterswap_sd15.adapters import ObjectIPAdapter
    from adapterswap_sd15.backbones import SD15Backbone, SD15LCMBackbone
    from adapterswap_sdxl.adapters import StyleIPAdapter
    from adapterswap_sdxl.backbones import SDXLBackbone, SDXLLightningBackbone

    from adapterswap import plugins
    from adapterswap.denoise import denoise

    for module, name in ((adapterswap_sdxl.plugin, "adapterswap-sdxl"),
                         (adapterswap_sd15.plugin, "adapterswap-sd15")):
        if plugins.pm.get_plugin(name) is None and name.split("-")[1] not in \
                plugins.backbones():
            plugins.register_plugin(module, name=name)

    families = {
        "sdxl": (build_sdxl, StyleIPAdapter, [(SDXLBackbone, 30), (SDXLLightningBackbone, 4)],
                 {"up": {"block_0": [0.0, 1.0, 0.0]}}),
        "sd15": (build_sd15, ObjectIPAdapter, [(SD15Backbone, 50), (SD15LCMBackbone, 4)], 1.0),
    }
    results: dict[str, Any] = {"dtype": str(dtype), "runs": [], "sweeps": []}
    from PIL import Image

    reference = Image.new("RGB", (256, 256), (180, 60, 40))
    for family in args.families.split(","):
        build, adapter_cls, variants, scales = families[family]
        pipe, weights = build(device, dtype)
        adapter = adapter_in_memory(adapter_cls, weights, device, dtype)
        size = SIZE[family]
        for cls, steps in ([] if args.skip_single else variants):
            backbone = cls.from_pipeline(pipe, device=device)
            backbone.dtype = dtype
            backbone.pipe = backbone.configure_pipeline(pipe)
            adapter.attach(backbone)
            conditioning = adapter.encode_reference(reference, backbone)
            guidance = backbone.resolve_guidance_scale(None)

            def engine(steps: int = steps, backbone: Any = backbone,
                       conditioning: Any = conditioning, size: int = size,
                       adapter: Any = adapter) -> Any:
                return denoise(backbone, "a photo of a red chair", num_inference_steps=steps,
                               seeds=[0], height=size, width=size, adapter=adapter,
                               conditioning=conditioning, output_type="pt")

            def baseline(steps: int = steps, conditioning: Any = conditioning,
                         guidance: float | None = guidance, pipe: Any = pipe, size: int = size,
                         scales: Any = scales) -> Any:
                return pipeline_call(pipe, conditioning, steps, guidance, size, 0, scales)

            diff = float((engine().images.float().cpu() - baseline().float().cpu()).abs().max())
            eng, base = timed(engine, repeats=args.repeats), timed(baseline, repeats=args.repeats)
            denoise_s = engine().timings["denoise_s"]
            flops = _step_flops(backbone, adapter, conditioning, size, guidance)
            row = {"backbone": backbone.name, "adapter": adapter.name, "steps": steps,
                   "height": size, "width": size, "engine_s": eng["median_s"],
                   "diffusers_pipeline_s": base["median_s"],
                   "ratio_engine_over_diffusers": eng["median_s"] / base["median_s"],
                   "engine_denoise_s": denoise_s, "per_step_s": denoise_s / steps,
                   "peak_gib_engine": eng["peak_gib"], "peak_gib_diffusers": base["peak_gib"],
                   "step_tflop": flops / 1e12,
                   "achieved_tflops": flops * steps / denoise_s / 1e12,
                   "max_abs_pixel_diff_vs_diffusers": diff}
            results["runs"].append(row)
            print(row, flush=True)
            adapter.detach()
        # the sweep target, on the base backbone
        base_cls = variants[0][0]
        backbone = base_cls.from_pipeline(pipe, device=device)
        backbone.dtype = dtype
        backbone.pipe = backbone.configure_pipeline(pipe)
        results["sweeps"].append(sweep_benchmark(backbone, adapter, scales, size, args))
        print(results["sweeps"][-1], flush=True)
        write(results, args.out)
        adapter.detach()
        del pipe, backbone
        sync()
        if device == "cuda":
            torch.cuda.empty_cache()
    write(results, args.out)


def sweep_benchmark(backbone: Any, adapter: Any, scales: Any, size: int, args: Any) -> dict:
    """steps x seeds with the adapter attached: adapterswap's sweep engine in each mode of
    ``--modes`` against one eager pipeline call per cell (pipeline loaded once)."""
    import time

    steps = [int(s) for s in args.sweep_steps.split(",")]
    seeds = list(range(args.sweep_seeds))
    results: dict[str, Any] = {}
    # the baseline first: compilation changes the UNet in place, and the pipeline shares it
    adapter.attach(backbone)
    conditioning = adapter.encode_reference(adapter.tiny_reference(0), backbone)
    guidance = backbone.resolve_guidance_scale(None)
    pipeline_call(backbone.pipe, conditioning, 1, guidance, size, 0, scales)  # warm-up
    sync()
    start = time.perf_counter()
    for n in steps:
        for seed in seeds:
            pipeline_call(backbone.pipe, conditioning, n, guidance, size, seed, scales)
    sync()
    results["diffusers_per_cell_s"] = time.perf_counter() - start
    from adapterswap.fastpath import Accelerator, FastPath

    accelerator = Accelerator(backbone)  # one for every mode: compiled modules stay compiled
    modes = {"eager-parallel": (True, False), "eager-sequential": (False, False),
             "fast-cold": (False, True), "fast-warm": (False, True)}
    for mode in args.modes.split(","):
        parallel, compiled = modes[mode]
        if compiled and args.compile_scope:  # the engine keeps an equivalent fast path
            accelerator.enable(FastPath(compile=True, compile_scope=args.compile_scope),
                               adapters=[adapter])
        results[mode] = timed_sweep(backbone, adapter, accelerator=accelerator, seeds=seeds,
                                    steps=steps, prompts=["a red chair"], height=size,
                                    width=size, step_parallel=parallel, compile=compiled,
                                    max_batch=args.max_batch)
        results[mode]["speedup_vs_diffusers"] = \
            results["diffusers_per_cell_s"] / results[mode]["wall_s"]
        print(mode, results[mode], flush=True)
    results.update(backbone=backbone.name, steps=steps, seeds=len(seeds), size=size,
                   device=str(backbone.device))
    return results


def _step_flops(backbone: Any, adapter: Any, conditioning: Any, size: int,
                guidance: float | None) -> float:
    import torch

    from adapterswap.denoise import StepContext

    prompt = backbone.encode_prompt(["a photo"], guidance_scale=guidance)
    latents = backbone.prepare_latents([torch.Generator().manual_seed(0)], height=size,
                                       width=size)
    sched = backbone.schedule(4, height=size, width=size)
    ctx = StepContext(sched.timesteps[1:2], (1,), (4,), size, size, None)
    inputs = adapter.denoiser_inputs(backbone, conditioning, latents, ctx, prompt)
    return float(count_flops(lambda: backbone.predict(latents, ctx, prompt,
                                                      guidance_scale=guidance,
                                                      adapter_inputs=inputs)))


if __name__ == "__main__":
    main()
