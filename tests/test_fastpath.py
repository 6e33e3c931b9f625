"""The fast path (adapterswap.fastpath): switches, validation, float8 layers, compilation on
tiny models, and (on a GPU) no host synchronisation inside the denoising loop."""

from __future__ import annotations

import pytest
import torch

from adapterswap import fastpath
from adapterswap.denoise import StepContext, denoise
from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.plugins import get_adapter, get_backbone


def test_fast_path_validates_each_switch_by_name() -> None:
    with pytest.raises(InvalidArgumentError, match="attention"):
        fastpath.FastPath(attention="fastest")
    with pytest.raises(InvalidArgumentError, match="fp8"):
        fastpath.FastPath(fp8="yes")
    with pytest.raises(InvalidArgumentError, match="compile_mode"):
        fastpath.FastPath(compile_mode="turbo")
    assert not fastpath.FastPath().approximate
    assert fastpath.FastPath(fp8=True).approximate


def test_attention_choice_leaves_cpu_alone() -> None:
    assert fastpath.sdpa_backends("auto", "cpu") is None
    with fastpath.attention_context("cudnn", "cpu"):
        out = torch.nn.functional.scaled_dot_product_attention(*[torch.ones(1, 2, 4, 8)] * 3)
    assert out.shape == (1, 2, 4, 8)


def test_device_tensor_is_made_once_per_value() -> None:
    a = fastpath.device_tensor([0, 2, 3], "cpu")
    b = fastpath.device_tensor((0, 2, 3), "cpu")
    assert a is b and a.dtype == torch.long and a.tolist() == [0, 2, 3]
    scales = fastpath.device_tensor([0.5, 1.0], "cpu", torch.float32)
    assert scales.dtype == torch.float32 and scales is not a


def test_float8_linear_is_close_to_the_bf16_layer() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.GELU(),
                                torch.nn.Linear(2048, 1024, bias=False), torch.nn.Linear(1024, 8))
    x = torch.randn(3, 5, 1024)
    with torch.no_grad():
        reference = model(x)
        replaced = fastpath.to_float8(model)
        out = model(x)
    assert replaced == 2  # the 1024 -> 8 head stays (too small for the float8 path)
    assert type(model[3]) is torch.nn.Linear
    error = float((out - reference).norm() / reference.norm())
    assert 0 < error < 0.08, error  # e4m3 keeps ~2 significant digits per value
    assert "float8_e4m3" in repr(model[0])


def test_compile_regions_compiles_each_block() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
            self.head = torch.nn.Linear(4, 1)

    net = Net()
    assert fastpath.compile_module(net, "default", "regions") == ["blocks[3]"]
    assert all(block._compiled_call_impl is not None for block in net.blocks)
    assert net._compiled_call_impl is None
    flat = torch.nn.Linear(2, 2)
    assert fastpath.compile_module(flat, "default", "regions") == ["forward"]
    with pytest.raises(InvalidArgumentError, match="scope"):
        fastpath.compile_module(flat, "default", "everything")
    unet = get_backbone("sd15").tiny().denoiser()
    parts = fastpath.compile_module(unet, "default", "blocks")
    assert [p.split("[")[0] for p in parts] == ["BasicTransformerBlock", "ResnetBlock2D"]
    assert unet._compiled_call_impl is None


def test_compile_encoder_compiles_text_encoders_block_by_block() -> None:
    backbone = get_backbone("flux-schnell").tiny()
    encoders = backbone.encoder_modules()
    assert sorted(encoders) == ["text_encoder", "text_encoder_2", "vae.encoder"]
    t5, clip, vae = (encoders[k] for k in ("text_encoder_2", "text_encoder", "vae.encoder"))
    blocks = len(t5.encoder.block)
    assert fastpath.compile_encoder(t5) == [f"encoder.block[{blocks}]"]
    assert all(block._compiled_call_impl is not None for block in t5.encoder.block)
    lists = [n for n, m in clip.named_modules() if isinstance(m, torch.nn.ModuleList)]
    assert len(lists) == 1  # CLIP's layers (their path differs between transformers versions)
    layers = clip.get_submodule(lists[0])
    assert fastpath.compile_encoder(clip) == [f"{lists[0]}[{len(layers)}]"]
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert t5._compiled_call_impl is None and vae._compiled_call_impl is None


def test_forward_timer_sums_cpu_forwards() -> None:
    import time

    timer = fastpath.ForwardTimer()
    assert timer.span() == 0.0
    for _ in range(3):
        begin = timer.start()
        torch.ones(64, 64) @ torch.ones(64, 64)
        timer.stop(begin)
        time.sleep(0.01)  # work between forwards: in the span, not in the total
    assert timer.count == 3 and timer.total() > 0
    assert timer.span() >= timer.total() + 0.015


def test_sweep_decides_compilation_from_the_planned_forwards() -> None:
    from adapterswap.sweep.spec import SweepSpec

    spec = SweepSpec(backbones=["sd15"], preset="tiny").validate()
    assert not spec.fast_path("cpu", 10**6).compile  # never on a CPU by itself
    assert not spec.fast_path("cuda", fastpath.AUTO_COMPILE_FORWARDS - 1).compile
    assert spec.fast_path("cuda", fastpath.AUTO_COMPILE_FORWARDS).compile
    assert spec.use_step_parallel(compiled=False) and not spec.use_step_parallel(compiled=True)
    # each backbone's own measured break-even (its compile profile for the card)
    from adapterswap.plugins import get_backbone

    h100 = "NVIDIA H100 80GB HBM3"
    flux = fastpath.find_profile(get_backbone("flux-dev"), h100)
    sd15 = fastpath.find_profile(get_backbone("sd15"), h100)
    assert flux.repays(120, 4) and not flux.repays(120, 1)  # per image-step
    assert not sd15.repays(2999, 8) and sd15.repays(3000, 1)  # per forward
    assert spec.fast_path("cuda", 10, repays=True).compile
    assert not spec.fast_path("cpu", 10, repays=True).compile
    assert not spec.fast_path("cuda", 10**6, repays=False).compile
    spec.compile, spec.step_parallel = False, True
    assert not spec.fast_path("cuda", 10**6).compile and spec.use_step_parallel(compiled=True)
    for field, value in (("attention", "quick"), ("fp8", 1), ("compile", "yes")):
        bad = SweepSpec(backbones=["sd15"], preset="tiny")
        setattr(bad, field, value)
        with pytest.raises(InvalidArgumentError, match=field):
            bad.validate()


def test_fp8_cells_get_keys_of_their_own(tmp_path) -> None:  # noqa: ANN001
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    keys = []
    for fp8 in (False, True):
        spec = SweepSpec(backbones=["sd15"], preset="tiny", steps=[1], fp8=fp8,
                         out=str(tmp_path / str(fp8))).validate()
        with RunStore(spec.out) as store:
            engine = SweepEngine(spec, store)
            keys.append({k for _, k in engine.keyed_cells(engine.versions())})
    assert keys[0] and not keys[0] & keys[1]


@pytest.mark.parametrize("parallel, forwards", [(False, 3), (True, 2)])
def test_sweep_summary_accounts_forwards_and_finishing(tmp_path, parallel: bool,  # noqa: ANN001
                                                       forwards: int) -> None:
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    # steps {1, 2} x 2 seeds: sequential = 1 + 2 forwards, step-parallel = 2 ticks
    spec = SweepSpec(backbones=["sd15"], preset="tiny", steps=[1, 2], seeds=[0, 1],
                     step_parallel=parallel, timing_repeats=0, metrics=["sharpness"],
                     out=str(tmp_path)).validate()
    with RunStore(spec.out) as store:
        summary = SweepEngine(spec, store).run()
    assert summary.done == 4 and summary.forwards == forwards
    assert summary.forward_seconds > 0 and 0 < summary.decode_seconds <= summary.finish_seconds
    assert summary.forward_seconds + summary.finish_seconds <= summary.seconds
    assert summary.fast_path["sd15"]["compiled"] == []  # a CPU sweep does not compile


def test_backbone_to_moves_and_forgets_device_caches() -> None:
    backbone = get_backbone("sd15").tiny()
    first = backbone.step_schedulers
    assert backbone.to("cpu") is backbone and backbone.step_schedulers is not first
    flux = get_backbone("flux-schnell").tiny()
    flux.latent_image_ids(64, 64)
    flux.to("cpu")
    assert flux._image_ids == {}


def test_enable_fast_path_refuses_changing_compiled_modules() -> None:
    backbone = fastpath.Accelerator(get_backbone("sd15").tiny())
    report = backbone.enable(fastpath.FastPath(compile=True))
    assert report["compiled"] == ["denoiser: forward (reduce-overhead)"]
    assert backbone.enable(fastpath.FastPath(compile=True))["already"]
    with pytest.raises(UsageError, match="reload"):
        backbone.enable(fastpath.FastPath())
    with pytest.raises(InvalidArgumentError, match="fp8"):
        fastpath.Accelerator(get_backbone("sd15").tiny()).enable(fastpath.FastPath(fp8=True))
    # compiled encoders are exact: asking with or without them is the same compiled path
    backbone.enable(fastpath.FastPath(compile=True, compile_encoders=True))
    assert backbone.fast_path.compile_encoders  # added (compiles on CUDA only)
    assert backbone.enable(fastpath.FastPath(compile=True))["already"]
    assert backbone.fast_path.compile_encoders  # kept: compilation cannot be undone


@pytest.mark.slow
def test_compiled_flux_matches_eager_on_tiny_weights() -> None:
    eager = get_backbone("flux-schnell").tiny()
    fast = get_backbone("flux-schnell").tiny()
    adapter = get_adapter("infusenet").tiny(eager)
    reference = adapter.encode_reference(adapter.tiny_reference(), eager)
    expected = denoise(eager, "a photo", num_inference_steps=2, seeds=[0, 1], height=64,
                       width=64, adapter=adapter, conditioning=reference, output_type="pt").images
    adapter.attach(fast)
    accelerator = fastpath.Accelerator(fast)
    report = accelerator.enable(fastpath.FastPath(compile=True), adapters=[adapter])
    assert [part.split(":")[0] for part in report["compiled"]] == ["denoiser",
                                                                   "infusenet.infusenet"]
    assert all("transformer_blocks[" in part for part in report["compiled"])
    got = denoise(fast, "a photo", num_inference_steps=2, seeds=[0, 1], height=64, width=64,
                  adapter=adapter, conditioning=reference, output_type="pt",
                  accelerator=accelerator).images
    assert torch.allclose(got, expected, atol=1e-4)


# ---------------------------------------------------------------------------- GPU
LOOPS = ["flux-dev", "flux-schnell", "sdxl", "sdxl-lightning", "sd15", "flux-dev+interval:2"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", LOOPS)
def test_no_host_sync_inside_the_loop(name: str) -> None:
    """Steps after the first (which makes the cached constants) never synchronise with the
    host: CUDA's sync debug mode turns any synchronising call into an error; also with the
    interval block cache, which decides on the host. (sd15-lcm is left out: LCM draws fresh
    noise at every step from CPU generators, as diffusers does; so is the threshold cache,
    which reads one number per step by design.)"""
    from adapterswap.fastpath import Accelerator, FastPath

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    name, _, cache = name.partition("+")
    backbone = get_backbone(name).tiny().to("cuda")
    adapter = get_adapter(backbone.default_adapter).tiny(backbone)
    adapter.attach(backbone)
    assert next(backbone.denoiser().parameters()).is_cuda
    accelerator = Accelerator(backbone)
    accelerator.enable(FastPath(cache=cache or None))
    accelerator.begin_run()
    guidance = backbone.resolve_guidance_scale(None)
    prompt = backbone.encode_prompt(["a photo"], guidance_scale=guidance).repeat(2)
    conditioning = adapter.encode_reference(adapter.tiny_reference(), backbone).repeat(2)
    size = 64
    latents = backbone.prepare_latents(
        [torch.Generator(backbone.generator_device).manual_seed(s) for s in (0, 1)],
        height=size, width=size)
    steps = 4
    schedule = backbone.schedule(steps, height=size, width=size)

    def step(i: int, latents: torch.Tensor) -> torch.Tensor:
        ctx = StepContext(schedule.timesteps[i].expand(2), (i, i), (steps, steps), size, size,
                          None if schedule.sigmas is None else schedule.sigmas[i].expand(2))
        accelerator.begin_step()
        inputs = adapter.denoiser_inputs(backbone, conditioning, latents, ctx, prompt)
        out = backbone.predict(latents, ctx, prompt, guidance_scale=guidance,
                               adapter_inputs=inputs)
        return backbone.step(out, latents, schedule, i)

    with torch.no_grad(), accelerator.step_context():
        latents = step(0, latents)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(1, steps):
                latents = step(i, latents)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(latents).all()
    if cache:
        assert accelerator.block_cache.stats()["cached_steps"] == 2  # steps 1 and 3


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flux-schnell", "sd15", "sdxl"])
def test_new_noise_and_schedules_do_not_wait_for_queued_kernels(name: str) -> None:
    """A sweep draws noise and builds schedules for every group; their copies to the GPU are
    queued (pinned memory) instead of waiting for the kernels before them, and give the same
    values as plain copies."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    backbone = get_backbone(name).tiny().to("cuda")

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        latents = backbone.prepare_latents(
            [torch.Generator(backbone.generator_device).manual_seed(s) for s in (0, 1)],
            height=64, width=64)
        return latents, backbone.schedule(4, height=64, width=64).timesteps

    expected = [t.clone() for t in draw()]  # the first call may allocate pinned memory
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = draw()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(g.is_cuda and torch.equal(g, e) for g, e in zip(got, expected))
    host = torch.randn(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fastpath.host_to_device(host, "cuda").cpu(), host)


def test_cli_fast_path_flags(tmp_path) -> None:  # noqa: ANN001
    """--attention is checked by click; --fp8 on a CPU is one clear error naming fp8 (exit 2);
    the summary line reports forwards and finishing time."""
    from click.testing import CliRunner

    from adapterswap.cli import main

    runner = CliRunner()
    bad = runner.invoke(main, ["sweep", "--backbone", "toy-dev", "--preset", "tiny",
                               "--attention", "fastest", "--out", str(tmp_path / "a")])
    assert bad.exit_code == 2 and "fastest" in bad.stderr
    fp8 = runner.invoke(main, ["sweep", "--backbone", "sd15", "--preset", "tiny", "--steps",
                               "1", "--fp8", "--out", str(tmp_path / "b")])
    assert fp8.exit_code == 2, fp8.stderr
    errors = [line for line in fp8.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fp8" in errors[0] and "8.9" in errors[0]
    ok = runner.invoke(main, ["sweep", "--backbone", "sd15", "--preset", "tiny", "--steps",
                              "1", "--no-compile", "--attention", "flash", "--out",
                              str(tmp_path / "c")])
    assert ok.exit_code == 0, ok.stderr
    assert "denoiser forwards" in ok.stdout and "decoding, scoring, storing" in ok.stdout


@pytest.mark.parametrize("name,device", [
    ("sd15", "cpu"), ("flux-schnell", "cpu"),
    pytest.param("sd15", "cuda", marks=pytest.mark.gpu),
    pytest.param("flux-schnell", "cuda", marks=pytest.mark.gpu)])
def test_overlapped_finishing_stores_the_same_cells(tmp_path, name: str,  # noqa: ANN001
                                                    device: str) -> None:
    """Finishing on the background thread (as on a GPU, where the decode also runs on its own
    stream beside the next forwards) gives the same cells, scores and images as finishing
    inline, and every cell is stored once."""
    import hashlib

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    results = []
    for overlap in (False, True):
        spec = SweepSpec(backbones=[name], preset="tiny", steps=[1, 2], seeds=[0, 1],
                         overlap=overlap, timing_repeats=0, metrics=["sharpness", "contrast"],
                         device=device, out=str(tmp_path / str(overlap))).validate()
        with RunStore(spec.out) as store:
            summary = SweepEngine(spec, store).run()
            rows = sorted(store.rows(), key=lambda r: r["key"])
        assert summary.done == 4 and summary.failed == 0 and len(rows) == 4
        images = [hashlib.sha256((tmp_path / str(overlap) / r["image"]).read_bytes()).hexdigest()
                  for r in rows]
        results.append(([(r["key"], r["scores"]) for r in rows], images))
    assert results[0] == results[1]


def test_a_failing_finishing_job_stops_the_sweep_and_keeps_finished_cells(
        tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from adapterswap.errors import StoreWriteError
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    spec = SweepSpec(backbones=["sd15"], preset="tiny", steps=[1, 2], seeds=[0], overlap=True,
                     step_parallel=False, timing_repeats=0, metrics=["sharpness"],
                     out=str(tmp_path)).validate()
    original = RunStore.record_cell
    calls = []

    def flaky(self, key, config, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(key)
        if len(calls) == 2:
            raise StoreWriteError("disk full (injected)")
        return original(self, key, config, **kwargs)

    monkeypatch.setattr(RunStore, "record_cell", flaky)
    with RunStore(spec.out) as store, pytest.raises(StoreWriteError, match="injected"):
        SweepEngine(spec, store).run()
    monkeypatch.setattr(RunStore, "record_cell", original)
    with RunStore(spec.out) as store:
        assert len(store.finished_keys()) == 1  # the first cell, stored before the failure
        summary = SweepEngine(spec, store).run()  # resume finishes the other one
        assert summary.done == 1 and summary.skipped == 1
