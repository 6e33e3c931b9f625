"""The ``random`` preset (published-size random weights, for latency studies) on CPU, with the
published configurations shrunk so that the real builders, adapters and engine run fast."""

from __future__ import annotations

import pytest

from adapterswap.plugins import backbones
from adapterswap.sweep.engine import run_sweep
from adapterswap.sweep.spec import SweepSpec
from adapterswap.sweep.store import RunStore

SMALL_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                  num_attention_heads=2, projection_dim=32)
SMALL_VIT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=2, projection_dim=40)
SMALL_VAE = dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8)


def shrink(monkeypatch, module, **changes):
    for name, values in changes.items():
        monkeypatch.setattr(module, name, {**getattr(module, name), **values})


@pytest.fixture()
def small_published(monkeypatch):
    if "sd15" in backbones():
        from adapterswap_sd15 import published as sd15

        shrink(monkeypatch, sd15, CLIP_L=SMALL_CLIP, VIT_H=SMALL_VIT, VAE=SMALL_VAE,
               UNET=dict(cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
                         block_out_channels=(32, 32, 64, 64)),
               PLUS=dict(heads=1, dim_head=64, num_queries=4))
    if "sdxl" in backbones():
        from adapterswap_sdxl import published as sdxl

        shrink(monkeypatch, sdxl, CLIP_L=SMALL_CLIP, CLIP_BIGG={**SMALL_CLIP, "hidden_size": 64,
                                                               "projection_dim": 64},
               VIT_BIGG=SMALL_VIT, VAE=SMALL_VAE,
               UNET=dict(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                         attention_head_dim=(2, 4, 4), cross_attention_dim=96,
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=112))
    if "flux-schnell" in backbones():
        from adapterswap_flux import published as flux

        small = dict(num_layers=1, num_single_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32,
                     axes_dims_rope=(4, 6, 6))
        shrink(monkeypatch, flux, TRANSFORMER=small,
               INFUSENET={**small, "num_layers": 1, "num_single_layers": 1},
               CLIP_L=SMALL_CLIP, T5_XXL=dict(d_model=48, d_kv=8, d_ff=64, num_layers=1,
                                              num_heads=2), VAE=SMALL_VAE)


@pytest.mark.parametrize("name", ["sd15", "sdxl-lightning", "flux-schnell"])
def test_random_preset_runs_a_sweep(tmp_path, small_published, name):
    if name not in backbones():
        pytest.skip(f"{name} is not installed")
    spec = SweepSpec(backbones=[name], preset="random", seeds=[0, 1], steps=[1, 2],
                     height=64, width=64, device="cpu", dtype="fp32", out=str(tmp_path))
    summary = run_sweep(spec)
    assert summary.done == 4 and summary.failed == 0
    with RunStore(tmp_path, lock=False) as store:
        rows = store.rows()
        latency = store.latency_rows()
    assert {r["adapter"] for r in rows} == {backbones().get(name).default_adapter}
    assert all("latency" in r["scores"] for r in rows) and latency


def test_random_preset_parts_are_built_in_eval_mode() -> None:
    """A constructed model is in training mode; the presets must not run dropout (T5's
    would make every prompt encoding random)."""
    import torch

    from adapterswap.presets import build_in_dtype

    parts = build_in_dtype("cpu", torch.float32, lambda: {
        "encoder": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)),
        "name": "not a module"})
    single = build_in_dtype("cpu", torch.float32, lambda: torch.nn.Dropout(0.5))
    pair = build_in_dtype("cpu", torch.float32, lambda: (torch.nn.Dropout(0.5), None))
    assert not parts["encoder"].training and not single.training and not pair[0].training
    x = torch.randn(8, 4)
    assert torch.equal(parts["encoder"](x), parts["encoder"](x))
