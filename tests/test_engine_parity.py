"""The sweep engine's images equal the reference loop's for every installed tiny backbone with
its adapter, and the instruments run for every family (the plugins' own parity tests hold the
reference loop to the plain diffusers pipelines)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from adapterswap.denoise import denoise
from adapterswap.plugins import backbones, get_adapter, get_backbone
from adapterswap.sweep.engine import run_sweep
from adapterswap.sweep.report import build_report
from adapterswap.sweep.spec import DEFAULT_PROMPTS, SweepSpec
from adapterswap.sweep.store import RunStore

BACKBONES = ["flux-dev", "flux-schnell", "sdxl", "sdxl-lightning", "sd15", "sd15-lcm"]


def installed(name: str) -> bool:
    return name in backbones()


@pytest.mark.parametrize("name", BACKBONES)
def test_sweep_engine_equals_reference_loop(tmp_path, name):
    if not installed(name):
        pytest.skip(f"{name} is not installed")
    spec = SweepSpec(backbones=[name], preset="tiny", seeds=[0, 1], steps=[1, 2],
                     metrics=["sharpness"], timing_repeats=0, out=str(tmp_path))
    summary = run_sweep(spec)
    assert summary.done == 4
    backbone = get_backbone(name).tiny(seed=0)
    adapter_name = get_backbone(name).default_adapter
    adapter = get_adapter(adapter_name).tiny(backbone, seed=0)
    reference = adapter.tiny_reference(0)
    with RunStore(tmp_path, lock=False) as store:
        rows = store.rows()
    for row in rows:
        expected = denoise(backbone, DEFAULT_PROMPTS[0], num_inference_steps=row["steps"],
                           seeds=[row["seed"]], height=row["height"], width=row["width"],
                           adapter=adapter, reference=reference).images[0]
        stored = np.asarray(Image.open(tmp_path / row["image"]), dtype=int)
        # step-parallel batches run the denoiser at other batch sizes: float rounding only
        assert np.abs(stored - np.asarray(expected, dtype=int)).max() <= 1, (name, row["steps"])


@pytest.mark.parametrize("name", ["flux-schnell", "sdxl", "sd15"])
def test_instruments_run_for_every_family(tmp_path, name):
    if not installed(name):
        pytest.skip(f"{name} is not installed")
    spec = SweepSpec(backbones=[name], preset="tiny", seeds=[0, 1], steps=[2, 4],
                     metrics=["sharpness", "contrast"], timing_repeats=0, trajectory=True,
                     probes=True, adapter_off=True, out=str(tmp_path))
    run_sweep(spec)
    with RunStore(tmp_path, lock=False) as store:
        assert store.trajectory_rows() and store.probe_rows()
        assert {r["adapter"] for r in store.rows()} == {"none",
                                                        get_backbone(name).default_adapter}
    html = build_report(tmp_path).read_text()
    for section in ("Trajectories", "Attention-stream probes", "Adapter ablation"):
        assert section in html, section


def test_compile_keeps_the_module_and_the_image():
    import torch

    from adapterswap.errors import UsageError
    from adapterswap.fastpath import Accelerator

    with pytest.raises(UsageError, match="no transformer or unet"):
        Accelerator(get_backbone("toy-dev").tiny()).compile()
    if not installed("sd15"):
        pytest.skip("sd15 is not installed")
    backbone = get_backbone("sd15").tiny(seed=0)
    accelerator = Accelerator(backbone)
    before = denoise(backbone, "a cat", num_inference_steps=2, seeds=[0], output_type="pt")
    unet = backbone.pipe.unet
    accelerator.compile(backend="eager")  # the mechanics; inductor is for GPUs
    assert backbone.pipe.unet is unet
    # recorded as the fast path's compilation (CUDA-graph step marks, no second compile)
    fast = accelerator.fast_path
    assert fast.compile and fast.compile_mode == "reduce-overhead"
    after = denoise(backbone, "a cat", num_inference_steps=2, seeds=[0], output_type="pt",
                    accelerator=accelerator)
    torch.testing.assert_close(after.images, before.images, atol=1e-5, rtol=0)
