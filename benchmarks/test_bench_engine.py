"""Engine overhead, step-parallel sweeps, encoding reuse and metric throughput (tiny, CPU)."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

from adapterswap.denoise import StepContext, denoise

STEPS = 4
_counter = itertools.count()


def _ctx_inputs(backbone):
    h, w = backbone.default_height, backbone.default_width
    scale = backbone.resolve_guidance_scale(None)
    prompt = backbone.encode_prompt(["a photo of a cat"], guidance_scale=scale)
    latents = backbone.prepare_latents([torch.Generator().manual_seed(0)], height=h, width=w)
    schedule = backbone.schedule(STEPS, height=h, width=w)
    sig = None if schedule.sigmas is None else schedule.sigmas[:1]
    ctx = StepContext(schedule.timesteps[:1], (0,), (STEPS,), h, w, sig)
    return prompt, latents, ctx, scale


@pytest.mark.benchmark(group="step: denoiser forward")
def test_denoiser_forward(benchmark, tiny_backbone):
    """One backbone.predict call (the denoiser with CFG/packing): the floor per step."""
    prompt, latents, ctx, scale = _ctx_inputs(tiny_backbone)
    with torch.no_grad():
        out = benchmark(tiny_backbone.predict, latents, ctx, prompt, guidance_scale=scale)
    assert out.shape == latents.shape


@pytest.mark.benchmark(group="step: engine loop")
def test_engine_denoise_loop(benchmark, tiny_backbone):
    """The engine's loop for STEPS steps, latents out (divide by STEPS for per step)."""
    encoding = tiny_backbone.encode_prompt(
        ["a photo of a cat"], guidance_scale=tiny_backbone.resolve_guidance_scale(None))

    def run():
        with torch.no_grad():
            return denoise(tiny_backbone, "a photo of a cat", num_inference_steps=STEPS,
                           prompt_encoding=encoding, output_type="pt")

    result = benchmark(run)
    assert torch.isfinite(result.images).all()


@pytest.mark.benchmark(group="step: diffusers pipeline")
def test_plain_diffusers_pipeline(benchmark, tiny_backbone):
    """The plain diffusers pipeline call for the same STEPS (prompt encoding included)."""
    pipe = tiny_backbone.pipe
    kwargs = {}
    if tiny_backbone.guidance_mode == "none":
        kwargs["guidance_scale"] = 0.0 if tiny_backbone.family != "flux" else 0.0
    images = benchmark(lambda: pipe("a photo of a cat", num_inference_steps=STEPS,
                                    height=tiny_backbone.default_height,
                                    width=tiny_backbone.default_width,
                                    generator=torch.Generator().manual_seed(0),
                                    output_type="pt", **kwargs).images)
    assert torch.isfinite(images).all()


def _sweep(tmp_path, backbone_name, step_parallel):
    from adapterswap.sweep.engine import run_sweep
    from adapterswap.sweep.spec import SweepSpec

    spec = SweepSpec(backbones=[backbone_name], preset="tiny", seeds=[0, 1, 2, 3],
                     steps=[1, 2, 4, 8], metrics=["sharpness"], timing_repeats=0,
                     out=str(tmp_path / f"run-{next(_counter)}"), step_parallel=step_parallel,
                     save_images=False)
    return run_sweep(spec)


@pytest.mark.parametrize("mode", ["step-parallel", "sequential"])
@pytest.mark.benchmark(group="sweep: 4 seeds x steps 1,2,4,8")
def test_sweep_step_parallel_vs_sequential(benchmark, tiny_backbone, tmp_path, mode):
    summary = benchmark.pedantic(_sweep, args=(tmp_path, tiny_backbone.name,
                                               mode == "step-parallel"), rounds=3,
                                 iterations=1, warmup_rounds=1)
    assert summary.done == 16


@pytest.mark.parametrize("reuse", [True, False], ids=["encode-once", "encode-every-run"])
@pytest.mark.benchmark(group="encoding reuse: 8 runs of 2 steps")
def test_encoding_reuse(benchmark, tiny_backbone, reuse):
    scale = tiny_backbone.resolve_guidance_scale(None)

    def run():
        encoding = tiny_backbone.encode_prompt(["a photo"], guidance_scale=scale) \
            if reuse else None
        with torch.no_grad():
            for seed in range(8):
                denoise(tiny_backbone, "a photo", num_inference_steps=2, seeds=[seed],
                        prompt_encoding=encoding, output_type="pt")

    benchmark(run)


@pytest.mark.parametrize(("name", "options"), [
    ("sharpness", {}), ("contrast", {}),
    # LPIPS with a random AlexNet trunk: the same arithmetic as the real weights, no download
    ("lpips", {"random_backbone": True}),
])
@pytest.mark.benchmark(group="metric throughput: 16 images 256x256")
def test_metric_throughput(benchmark, name, options):
    from adapterswap.errors import MetricUnavailableError
    from adapterswap.metrics import MetricBatch
    from adapterswap.plugins import metrics

    if name not in metrics():
        pytest.skip(f"metric {name!r} is not installed")
    metric = metrics().get(name)(**options)
    try:
        metric.load()
    except MetricUnavailableError as exc:
        pytest.skip(str(exc))
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(256, 256, 3, generator=g) * 255).byte().numpy())
              for _ in range(16)]
    batch = MetricBatch(images=images, references=images[::-1], prompts=["a photo"] * 16)
    scores = benchmark(metric.score, batch)
    assert len(scores) == 16
