"""Caching of slowly changing blocks (adapterswap.fastpath.blockcache): policies, the residual
algebra with ControlNet (InfuseNet) residuals, install/remove exactness, and the sweep/CLI
wiring."""

from __future__ import annotations

import math

import pytest
import torch

from adapterswap.errors import InvalidArgumentError
from adapterswap.fastpath.blockcache import BlockCache, CachePolicy


@pytest.mark.parametrize("text", ["fast", "threshold", "threshold:", "threshold:0",
                                  "threshold:-1", "threshold:nan", "interval:1", "interval:2.5",
                                  "every:2", "interval:2:3", 3])
def test_bad_policies_name_the_argument(text) -> None:  # noqa: ANN001
    with pytest.raises(InvalidArgumentError) as info:
        CachePolicy.parse(text)
    assert "cache" in str(info.value) and str(text) in str(info.value)


def test_policies_parse_and_print() -> None:
    assert str(CachePolicy.parse("threshold:0.10")) == "threshold:0.1"
    assert str(CachePolicy.parse(" interval : 3 ")) == "interval:3"
    from adapterswap.fastpath import FastPath

    fast = FastPath(cache="interval:2", fp8=False)
    assert fast.cache == "interval:2" and fast.approximate
    assert fast.approximations() == ["cache=interval:2"]
    assert not FastPath().approximate


def _tiny_flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3,
                                  num_single_layers=4, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def _inputs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    n, t = 16, 5
    return dict(hidden_states=torch.randn(batch, n, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, t, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g),
                timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(n, 3),
                txt_ids=torch.zeros(t, 3), return_dict=False,
                controlnet_block_samples=[torch.randn(batch, n, 32, generator=g)
                                          for _ in range(2)],
                controlnet_single_block_samples=[torch.randn(batch, n, 32, generator=g)
                                                 for _ in range(3)])


def _before_norm_out(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    """The hidden states after the last block and its ControlNet residual."""
    seen = []
    handle = model.norm_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        handle.remove()
    return seen[0]


def test_a_cached_step_reproduces_the_computed_one_and_keeps_the_adapter_live() -> None:
    """Same inputs: the cached step equals the computed step. New ControlNet residuals: the
    cached step carries the *new* ones (not the stored ones twice), so the hidden states
    before the output norm move by exactly the change of the summed residuals."""
    model = _tiny_flux()
    kwargs = _inputs()
    computed = _before_norm_out(model, kwargs)
    cache = BlockCache(model, "threshold:1e9").install()
    assert torch.equal(_before_norm_out(model, kwargs), computed)  # first call computes
    cached = _before_norm_out(model, kwargs)
    assert cache.stats() == {"policy": "threshold:1e+09", "computed_steps": 1,
                             "cached_steps": 1}
    torch.testing.assert_close(cached, computed, atol=1e-5, rtol=1e-5)

    doubled = dict(kwargs, controlnet_block_samples=[2 * x for x in
                                                     kwargs["controlnet_block_samples"]],
                   controlnet_single_block_samples=[2 * x for x in
                                                    kwargs["controlnet_single_block_samples"]])
    # every double block adds sample i // 2 (3 blocks, 2 samples); every single block i // 2
    added = sum(kwargs["controlnet_block_samples"][i // 2] for i in range(3)) + \
        sum(kwargs["controlnet_single_block_samples"][i // 2] for i in range(4))
    moved = _before_norm_out(model, doubled)
    assert cache.cached == 2
    torch.testing.assert_close(moved - computed, added, atol=1e-4, rtol=1e-4)

    cache.remove()
    assert torch.equal(_before_norm_out(model, kwargs), computed)  # back to exact
    assert all("forward" not in vars(block) for block in cache.blocks)


def test_interval_policy_and_batch_changes() -> None:
    model = _tiny_flux()
    cache = BlockCache(model, "interval:3").install()
    kwargs = _inputs()
    for _ in range(6):
        _before_norm_out(model, kwargs)
    assert (cache.computed, cache.cached) == (2, 4)  # steps 0 and 3
    cache.reset()
    _before_norm_out(model, kwargs)
    _before_norm_out(model, _inputs(batch=1))  # a row finished: nothing stored fits
    assert (cache.computed, cache.cached) == (4, 4)


def test_stored_residuals_follow_the_rows_that_go_on() -> None:
    """Row 0 of a batch of two finishes: the cache keeps row 1's residuals, and a cached step
    for it alone equals the computed step for it."""
    model = _tiny_flux()
    both = _inputs(batch=2)
    computed = _before_norm_out(model, both)
    cache = BlockCache(model, "threshold:1e9").install()
    _before_norm_out(model, both)
    cache.keep_rows([1])
    row = {k: (v[1:] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections",
                              "timestep") else [x[1:] for x in v] if k.startswith("controlnet")
               else v) for k, v in both.items()}
    alone = _before_norm_out(model, row)
    assert (cache.computed, cache.cached) == (1, 1)
    torch.testing.assert_close(alone, computed[1:], atol=1e-5, rtol=1e-5)


def test_a_threshold_of_almost_zero_never_caches_and_changes_nothing() -> None:
    from adapterswap.denoise import denoise
    from adapterswap.fastpath import Accelerator, FastPath
    from adapterswap.plugins import get_adapter, get_backbone

    backbone = get_backbone("flux-dev").tiny()
    accelerator = Accelerator(backbone)
    adapter = get_adapter("infusenet").tiny(backbone)
    reference = adapter.encode_reference(adapter.tiny_reference(), backbone)

    def run() -> torch.Tensor:
        return denoise(backbone, "a photo", num_inference_steps=4, seeds=[0, 1], height=64,
                       width=64, adapter=adapter, conditioning=reference,
                       output_type="pt", accelerator=accelerator).images

    exact = run()
    accelerator.enable(FastPath(cache="threshold:1e-9"))
    assert torch.equal(run(), exact)
    assert accelerator.block_cache.stats()["cached_steps"] == 0
    accelerator.enable(FastPath(cache="interval:2"))
    approximate = run()
    assert accelerator.block_cache.stats() == {"policy": "interval:2", "computed_steps": 2,
                                               "cached_steps": 2}
    assert not torch.equal(approximate, exact)
    assert (approximate - exact).abs().max() < 0.5  # close, not equal
    accelerator.enable(FastPath())
    assert accelerator.block_cache is None and torch.equal(run(), exact)


def test_unsupported_denoisers_and_probes_are_clear_errors(tmp_path) -> None:  # noqa: ANN001
    from adapterswap.fastpath import Accelerator, FastPath
    from adapterswap.plugins import get_backbone
    from adapterswap.sweep.spec import SweepSpec

    sd15 = Accelerator(get_backbone("sd15").tiny())
    with pytest.raises(InvalidArgumentError, match="cache.*UNet2DConditionModel"):
        sd15.enable(FastPath(cache="interval:2"))
    with pytest.raises(InvalidArgumentError, match="probes"):
        SweepSpec(backbones=["flux-schnell"], preset="tiny", steps=[1], cache="interval:2",
                  probes=True, out=str(tmp_path)).validate()


def test_sweep_cells_with_a_cache_are_keyed_apart(tmp_path) -> None:  # noqa: ANN001
    from adapterswap.sweep.engine import SweepEngine
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    keys = {}
    for cache in (None, "interval:2"):
        spec = SweepSpec(backbones=["flux-schnell"], preset="tiny", steps=[1, 4], seeds=[0],
                         cache=cache, timing_repeats=0, metrics=["sharpness"],
                         out=str(tmp_path / str(cache))).validate()
        with RunStore(spec.out) as store:
            summary = SweepEngine(spec, store).run()
            keys[cache] = store.finished_keys()
            if cache:
                stats = store.meta("block_cache:flux-schnell")
                assert stats["policy"] == "interval:2" and stats["cached_steps"] >= 1
                assert summary.fast_path["flux-schnell"]["block_cache"] == stats
        assert summary.done == 2
    assert not keys[None] & keys["interval:2"]


def test_cli_cache_flag(tmp_path) -> None:  # noqa: ANN001
    from click.testing import CliRunner

    from adapterswap.cli import main

    runner = CliRunner()
    bad = runner.invoke(main, ["sweep", "--backbone", "flux-schnell", "--preset", "tiny",
                               "--steps", "1", "--cache", "sometimes", "--out",
                               str(tmp_path / "a")])
    assert bad.exit_code == 2 and "cache" in bad.stderr and "sometimes" in bad.stderr
    ok = runner.invoke(main, ["sweep", "--backbone", "flux-schnell", "--preset", "tiny",
                              "--steps", "2", "--cache", "interval:2", "--out",
                              str(tmp_path / "b")])
    assert ok.exit_code == 0, ok.stderr
    assert "block cache" in ok.stdout + ok.stderr


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["interval:2", "threshold:0.5"])
def test_compiled_blocks_keep_the_cache(policy: str) -> None:
    """Regional compilation after the cache wraps the blocks: same steps cached, same images
    as the eager cached run (float32 tolerance)."""
    from adapterswap.denoise import denoise
    from adapterswap.fastpath import Accelerator, FastPath
    from adapterswap.plugins import get_adapter, get_backbone

    images, stats = [], []
    for compile_ in (False, True):
        backbone = get_backbone("flux-dev").tiny()
        accelerator = Accelerator(backbone)
        adapter = get_adapter("infusenet").tiny(backbone)
        adapter.attach(backbone)
        accelerator.enable(FastPath(cache=policy, compile=compile_), adapters=[adapter])
        reference = adapter.encode_reference(adapter.tiny_reference(), backbone)
        images.append(denoise(backbone, "a photo", num_inference_steps=4, seeds=[0, 1],
                              height=64, width=64, adapter=adapter, conditioning=reference,
                              output_type="pt", accelerator=accelerator).images)
        stats.append(accelerator.block_cache.stats())
    assert stats[0] == stats[1] and stats[0]["cached_steps"] >= 1
    torch.testing.assert_close(images[1], images[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- compare (fidelity cost)
@pytest.fixture(scope="module")
def exact_and_cached(tmp_path_factory) -> tuple[str, str]:  # noqa: ANN001
    from adapterswap.sweep.engine import run_sweep
    from adapterswap.sweep.spec import SweepSpec

    root = tmp_path_factory.mktemp("compare")
    outs = []
    for cache in (None, "interval:2"):
        out = str(root / (cache or "exact").replace(":", "-"))
        spec = SweepSpec(backbones=["flux-dev"], preset="tiny", steps=[1, 3], seeds=[0, 1],
                         cache=cache, metrics=["sharpness", "contrast", "latency"], out=out)
        run_sweep(spec)
        outs.append(out)
    return outs[0], outs[1]


# The exact run shares its first step (one row per seed), the cached run cannot (its stored
# residuals follow the batch), so their 1-step images come from the same computation in
# batches of 2 and 4 rows, whose CPU GEMM blocking and so rounding may differ: at most one
# 8-bit level on 1% of the pixels, i.e. PSNR >= 68 dB (measured: equal, or 89 dB), and an
# LPIPS within BATCH_ROUNDING_LPIPS of 0 (measured <= 1e-8).
BATCH_ROUNDING_PSNR_DB = 10 * math.log10(255 ** 2 / 0.01)
BATCH_ROUNDING_LPIPS = 1e-6


def test_compare_pairs_cells_and_measures_the_cost(exact_and_cached, tmp_path) -> None:  # noqa: ANN001
    import json
    import shutil

    from click.testing import CliRunner

    from adapterswap.cli import main
    from adapterswap.sweep.compare import compare_runs

    exact, cached = exact_and_cached
    result = compare_runs(exact, cached, lpips_options={"random_backbone": True})
    assert result["approx"]["approximation"] == "cache=interval:2"
    assert result["exact"]["approximation"] is None and result["lpips"] is None
    one, three = result["groups"]
    assert (one["steps"], one["pairs"]) == (1, 2)  # step 0 computes: equal up to rounding
    assert one["psnr_db_min"] >= BATCH_ROUNDING_PSNR_DB
    assert one["lpips_max"] == pytest.approx(0, abs=BATCH_ROUNDING_LPIPS)
    assert three["steps"] == 3 and three["identical"] == 0  # step 1 was served from the cache
    assert 20 < three["psnr_db_min"] < float("inf") and three["lpips_mean"] is not None
    assert set(three["deltas"]) >= {"sharpness", "contrast"}
    assert three["deltas"]["sharpness"]["n"] == 2
    assert three["latency_exact_s"] > 0 and three["speedup"] > 0

    runner = CliRunner()
    run = runner.invoke(main, ["compare", exact, cached, "--no-lpips"])
    assert run.exit_code == 0, run.stderr
    assert "PSNR" in run.stdout and "not asked for" in run.stdout

    # a byte-for-byte copy of the exact run: every pair identical, PSNR inf (null in JSON)
    copy = tmp_path / "copy"
    shutil.copytree(exact, copy)
    out = tmp_path / "cost.json"
    same = runner.invoke(main, ["compare", exact, str(copy), "--no-lpips", "--json",
                                str(out)])
    assert same.exit_code == 0, same.stderr
    assert "identical" in same.stdout
    data = json.loads(out.read_text())
    assert [(g["identical"], g["psnr_db_min"]) for g in data["groups"]] == [(2, None), (2, None)]


def test_compare_errors_name_the_argument(exact_and_cached, tmp_path) -> None:  # noqa: ANN001
    from click.testing import CliRunner

    from adapterswap.cli import main

    exact, cached = exact_and_cached
    runner = CliRunner()
    missing = runner.invoke(main, ["compare", str(tmp_path / "nowhere"), cached])
    assert missing.exit_code == 2 and "EXACT" in missing.stderr and "nowhere" in missing.stderr
    same = runner.invoke(main, ["compare", exact, exact, "--no-lpips"])
    assert same.exit_code == 2 and "APPROX" in same.stderr
    option = runner.invoke(main, ["compare", exact, cached, "--metric-option", "clip.x=1"])
    assert option.exit_code == 2 and "--metric-option" in option.stderr

    from adapterswap.sweep.engine import run_sweep
    from adapterswap.sweep.spec import SweepSpec

    other = str(tmp_path / "other-seeds")
    run_sweep(SweepSpec(backbones=["flux-dev"], preset="tiny", steps=[1], seeds=[7],
                        metrics=["sharpness"], out=other))
    unmatched = runner.invoke(main, ["compare", exact, other, "--no-lpips"])
    assert unmatched.exit_code != 0 and "no finished cell" in unmatched.stderr
