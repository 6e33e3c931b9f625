"""The distilled SD 1.5 backbone sd15-hyper (Hyper-SD LoRA) on tiny random weights: the
contract, parity with the model card's own diffusers recipe, options and file errors; and the
shared tiny LoRA writer (:mod:`adapterswap.kit.tiny_lora`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapterswap_sd15.distilled import HYPER_SD15_4STEP, HYPER_SD15_8STEP, SD15HyperBackbone

from adapterswap.denoise import denoise
from adapterswap.errors import InvalidArgumentError, WeightsNotFoundError
from adapterswap.kit.parity import pipeline_parity
from adapterswap.testing import BackboneContract

PROMPT = "a photo of a red teapot on a table"
#: A fused LoRA may reorder float additions against the pipeline's own fused run; images
#: still agree to this (the sd15-lcm parity tolerance).
FUSED_ATOL = 1e-5
#: Two seeds in one batch against one pipeline call per seed: the UNet's float sums run in
#: another order at batch 2 (1.7e-5 seen after 8 steps on CPU).
BATCH_ATOL = 1e-4


class TestSD15HyperContract(BackboneContract):
    backbone_name = "sd15-hyper"


@pytest.fixture(scope="module")
def hyper() -> SD15HyperBackbone:
    return SD15HyperBackbone.tiny(0)


def images(backbone, steps):
    result = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=[0], output_type="np")
    return np.asarray(result.images)


@pytest.mark.parametrize("filename, steps", [(HYPER_SD15_8STEP, 8), (HYPER_SD15_4STEP, 4),
                                             (HYPER_SD15_8STEP, 1)])
def test_hyper_matches_the_cards_recipe(hyper, filename, steps):
    """The card: ``load_lora_weights`` + ``fuse_lora()`` on SD 1.5,
    ``DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")``,
    ``guidance_scale=0``; the ``lora_file`` option picks the 4-step LoRA. "Trailing" starts
    even a single step at t = 999."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    backbone = hyper if filename == HYPER_SD15_8STEP else SD15HyperBackbone.tiny(
        0, lora_file=HYPER_SD15_4STEP)
    pipe = StableDiffusionPipeline.from_pretrained(backbone.source, safety_checker=None,
                                                   requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.load_lora_weights(backbone.options["lora"], weight_name=filename)
    pipe.fuse_lora()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config,
                                               timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    parity = pipeline_parity(backbone, pipe, PROMPT, num_inference_steps=steps)
    assert parity.max_abs_diff < FUSED_ATOL, parity.max_abs_diff
    batched = pipeline_parity(backbone, pipe, PROMPT, num_inference_steps=steps, seeds=(0, 1))
    assert batched.max_abs_diff < BATCH_ATOL, batched.max_abs_diff
    assert int(backbone.schedule(steps, height=64, width=64).timesteps[0]) == 999
    assert not backbone.injects_noise  # DDIM at eta 0: no per-step noise
    without_lora = images(SD15HyperBackbone.tiny(0, lora=None), steps)
    assert np.abs(parity.ours - without_lora).max() > 1e-2  # the LoRA was fused in


def test_hyper_lora_files_differ(hyper):
    four = SD15HyperBackbone.tiny(0, lora_file=HYPER_SD15_4STEP)
    assert np.abs(images(hyper, 2) - images(four, 2)).max() > 1e-3


def test_hyper_lora_steps_picks_the_4_step_file_and_runs_4_steps(hyper, tmp_path):
    """``lora_steps=4`` loads the 4-step file and makes 4 this instance's default step count,
    as the card runs it; naming the 4-step file (by ``lora_file`` or as ``lora``) does the
    same; the class keeps 8 for every other instance."""
    import shutil
    from pathlib import Path

    lora = hyper.options["lora"]
    four = SD15HyperBackbone.tiny(0, lora_steps=4)
    assert four.lora_filename() == HYPER_SD15_4STEP
    assert four.default_steps == 4 and SD15HyperBackbone.default_steps == 8
    assert hyper.default_steps == 8
    assert denoise(four, PROMPT, seeds=[0], output_type="np").forwards == 4
    by_name = SD15HyperBackbone.tiny(0, lora_file=HYPER_SD15_4STEP)
    assert by_name.default_steps == 4
    for key, value in four.pipe.unet.state_dict().items():
        assert torch.equal(by_name.pipe.unet.state_dict()[key], value), key
    assert np.abs(images(hyper, 2) - images(four, 2)).max() > 1e-3
    shutil.copy(Path(lora) / HYPER_SD15_4STEP, tmp_path / HYPER_SD15_4STEP)
    assert SD15HyperBackbone(lora=str(tmp_path / HYPER_SD15_4STEP)).default_steps == 4
    assert SD15HyperBackbone(lora_steps=8).default_steps == 8
    assert SD15HyperBackbone(lora_file="my-hyper.safetensors").default_steps == 8
    assert SD15HyperBackbone(lora=None, lora_steps=4).default_steps == 4  # a fused 4-step model


@pytest.mark.parametrize("options, message", [
    ({"lora_file": 8}, r"invalid lora_file=8: must be a file name"),
    ({"lora": 3.5}, r"invalid lora=3.5: must be a path, a repo id or None"),
    ({"timestep_spacing": "sideways"}, r"invalid timestep_spacing='sideways'"),
    ({"eta": 0.3}, r"unknown option 'eta' of backbone 'sd15-hyper'"),
    ({"lora_steps": 2}, r"invalid lora_steps=2: choose one of 8, 4"),
    ({"lora_steps": True}, r"invalid lora_steps=True"),
    ({"lora_steps": 4, "lora_file": "x.safetensors"},
     r"invalid lora_steps=4: give lora_steps or lora_file='x.safetensors', not both"),
])
def test_bad_options_are_one_line_naming_option_and_value(options, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        SD15HyperBackbone(**options)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError, match=message):  # before anything is built
        SD15HyperBackbone.tiny(0, cache_dir="/nonexistent/not-built", **options)


def test_missing_lora_is_named(hyper, tmp_path):
    with pytest.raises(WeightsNotFoundError,
                       match=f"{tmp_path.name}.*incomplete.*{HYPER_SD15_8STEP}"):
        SD15HyperBackbone(hyper.source, device="cpu", lora=str(tmp_path)).load()
    (tmp_path / HYPER_SD15_8STEP).write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsNotFoundError, match="truncated or corrupt"):
        SD15HyperBackbone(hyper.source, device="cpu", lora=str(tmp_path)).load()


# ---------------------------------------------------------------------- the tiny LoRA writer
def test_tiny_lora_layouts_fuse_into_the_same_unet(hyper, tmp_path):
    """The same factors in kohya (``lora_unet_*``, the Hyper-SD / LCM / TCD files), diffusers
    (``unet.*.lora.down``) and PEFT (``unet.*.lora_A``) layouts fuse into the same UNet, so
    the backbone does not depend on which layout a copy of the file is in."""
    from adapterswap.kit.tiny_lora import LORA_LAYOUTS, save_tiny_unet_lora, tiny_unet_lora

    fused = {}
    for layout in LORA_LAYOUTS:
        path = save_tiny_unet_lora(hyper.pipe.unet, tmp_path / layout / "lora.safetensors", 5,
                                   layout=layout)
        backbone = SD15HyperBackbone(hyper.source, device="cpu", dtype="fp32",
                                     lora=str(path)).load()
        fused[layout] = backbone.pipe.unet.state_dict()
    plain = SD15HyperBackbone(hyper.source, device="cpu", dtype="fp32", lora=None).load()
    changed = [k for k, v in plain.pipe.unet.state_dict().items()
               if not torch.equal(v, fused["kohya"][k])]
    assert any("resnets" in k for k in changed) and any("attn2.to_k" in k for k in changed)
    for layout in LORA_LAYOUTS[1:]:
        for name, value in fused["kohya"].items():
            torch.testing.assert_close(fused[layout][name], value, atol=1e-6, rtol=0)
    kohya = tiny_unet_lora(hyper.pipe.unet, 5)
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in kohya} == \
        {"lora_down", "lora_up", "alpha"}
    with pytest.raises(ValueError, match="invalid layout='webui'"):
        tiny_unet_lora(hyper.pipe.unet, 5, layout="webui")
