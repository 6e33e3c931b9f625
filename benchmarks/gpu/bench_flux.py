"""FLUX dev/schnell + InfuseNet at the published sizes with random weights: adapterswap's engine
against a hand-written diffusers loop (InfiniteYou's pipeline logic) in the same process.

    python benchmarks/gpu/bench_flux.py --out results/flux.json            # H100: ~5 min
    python benchmarks/gpu/bench_flux.py --tiny --out /tmp/flux-tiny.json    # CPU smoke test

Weights do not change latency, so nothing is downloaded. Face detection is not included (as in
the reference figures); the ID tokens come from the resampler applied to a random embedding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from adapterswap_flux import published  # noqa: E402
from common import count_flops, sync, timed, write  # noqa: E402


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
    parser.add_argument("--sizes", default="1024x1024,864x1152")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer and InfuseNet (both paths)")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--variants", default="dev,schnell")
    args = parser.parse_args()
    if args.tiny:
        tiny_configs()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.tiny:
        sizes = [(64, 64)]
    from adapterswap_flux.backbones import FluxDev, FluxSchnell

    from adapterswap.denoise import TensorBundle, denoise

    controlnet, resampler = build_infusenet(device, dtype)
    ids = id_tokens(resampler, device, dtype)
    adapter = engine_adapter(controlnet, resampler, device, dtype)
    conditioning = TensorBundle({"id_embeds": ids})
    results: dict[str, Any] = {"dtype": str(dtype), "compiled": args.compile, "runs": []}
    shared = None
    prompt = "a portrait photo of a person, soft studio light"
    runs = [r for r in (("dev", FluxDev, 28, 3.5), ("schnell", FluxSchnell, 4, None))
            if r[0] in args.variants.split(",")]
    for variant, cls, steps, guidance in runs:
        pipe, shared = build(variant, device, dtype, shared)
        backbone = cls.from_pipeline(pipe, device=device)
        backbone.dtype = dtype
        if args.compile:  # the shared module: the diffusers loop runs compiled too
            backbone.compile(mode=args.compile_mode)
            controlnet.compile(mode=args.compile_mode)
        params = sum(p.numel() for p in pipe.transformer.parameters())
        for height, width in sizes:
            def engine(steps: int = steps, h: int = height, w: int = width,
                       backbone: Any = backbone) -> Any:
                return denoise(backbone, prompt, num_inference_steps=steps, seeds=[0],
                               height=h, width=w, adapter=adapter, conditioning=conditioning,
                               output_type="pt")

            def baseline(steps: int = steps, h: int = height, w: int = width, pipe: Any = pipe,
                         guidance: float | None = guidance) -> Any:
                return diffusers_loop(pipe, controlnet, ids, prompt, steps, guidance, h, w, 0)

            same = engine().images.float().cpu()
            ref = baseline().float().cpu()
            max_diff = float((same - ref).abs().max())
            eng = timed(engine, repeats=args.repeats)
            base = timed(baseline, repeats=args.repeats)
            step_flops = _step_flops(backbone, adapter, conditioning, height, width, guidance)
            denoise_s = engine().timings["denoise_s"]
            row = {
                "backbone": f"flux-{variant}", "adapter": "infusenet", "steps": steps,
                "height": height, "width": width, "transformer_params": params,
                "engine_s": eng["median_s"], "diffusers_loop_s": base["median_s"],
                "ratio_engine_over_diffusers": eng["median_s"] / base["median_s"],
                "engine_denoise_s": denoise_s, "per_step_s": denoise_s / steps,
                "peak_gib_engine": eng["peak_gib"], "peak_gib_diffusers": base["peak_gib"],
                "step_tflop": step_flops / 1e12,
                "achieved_tflops": step_flops * steps / denoise_s / 1e12,
                "max_abs_pixel_diff_vs_diffusers": max_diff,
            }
            results["runs"].append(row)
            print(row, flush=True)
        del backbone, pipe
        sync()
        if device == "cuda":
            torch.cuda.empty_cache()
    schnell = {(r["height"], r["width"]): r for r in results["runs"]
               if r["backbone"] == "flux-schnell"}
    for r in results["runs"]:
        if r["backbone"] == "flux-dev" and (r["height"], r["width"]) in schnell:
            s = schnell[(r["height"], r["width"])]
            results.setdefault("swap_speedup", {})[f"{r['height']}x{r['width']}"] = {
                "engine": r["engine_s"] / s["engine_s"],
                "diffusers_loop": r["diffusers_loop_s"] / s["diffusers_loop_s"]}
    write(results, args.out)


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
