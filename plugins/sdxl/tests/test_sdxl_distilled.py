"""The distilled SDXL backbones (sdxl-turbo, sdxl-hyper, sdxl-dmd2, sdxl-tcd) on tiny random
weights: the contract, parity with each model card's own diffusers recipe, per-seed noise,
options and file errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from adapterswap_sdxl.distilled import (
    DMD2_UNET,
    HYPER_SDXL_4STEP,
    HYPER_SDXL_8STEP,
    TCD_LORA_FILE,
    SDXLDMD2Backbone,
    SDXLHyperBackbone,
    SDXLTCDBackbone,
    SDXLTurboBackbone,
    dmd2_timesteps,
)

from adapterswap.denoise import denoise
from adapterswap.errors import InvalidArgumentError, UnsafeWeightsError, WeightsNotFoundError
from adapterswap.kit.parity import pipeline_parity
from adapterswap.testing import BackboneContract

PROMPT = "a watercolor painting of a lighthouse"
#: Fused LoRA weights, and the ancestral / LCM / TCD noise added at every step, reorder float
#: additions against the pipeline's own run; images still agree to this (the sd15-lcm parity
#: tolerance). Runs with no LoRA and deterministic steps agree to 1e-6.
NOISY_ATOL = 1e-5


class TestSDXLTurboContract(BackboneContract):
    backbone_name = "sdxl-turbo"


class TestSDXLHyperContract(BackboneContract):
    backbone_name = "sdxl-hyper"


class TestSDXLDMD2Contract(BackboneContract):
    backbone_name = "sdxl-dmd2"


class TestSDXLTCDContract(BackboneContract):
    backbone_name = "sdxl-tcd"


@pytest.fixture(scope="module")
def turbo() -> SDXLTurboBackbone:
    return SDXLTurboBackbone.tiny(0)


@pytest.fixture(scope="module")
def hyper() -> SDXLHyperBackbone:
    return SDXLHyperBackbone.tiny(0)


@pytest.fixture(scope="module")
def dmd2() -> SDXLDMD2Backbone:
    return SDXLDMD2Backbone.tiny(0)


@pytest.fixture(scope="module")
def tcd() -> SDXLTCDBackbone:
    return SDXLTCDBackbone.tiny(0)


def sdxl_pipeline(source, **kwargs):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(source, add_watermarker=False,
                                                     local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def card_lora_pipeline(backbone, filename):
    """The cards' LoRA recipe: load_lora_weights + fuse_lora on SDXL base."""
    pipe = sdxl_pipeline(backbone.source)
    pipe.load_lora_weights(backbone.options["lora"], weight_name=filename)
    pipe.fuse_lora()
    return pipe


def images(backbone, steps, seeds=(0,), **kwargs):
    result = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=list(seeds),
                     output_type="np", **kwargs)
    return np.asarray(result.images)


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_matches_the_pipeline_with_the_scheduler_it_ships(turbo, steps):
    """The card: ``AutoPipelineForText2Image.from_pretrained("stabilityai/sdxl-turbo")``,
    ``guidance_scale=0.0``, 1-4 steps. Ancestral Euler draws noise at every step from each
    seed's own generator, so two seeds in one batch match two pipeline calls."""
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(turbo.source, add_watermarker=False,
                                                     local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert turbo.injects_noise
    parity = pipeline_parity(turbo, pipe, PROMPT, num_inference_steps=steps, seeds=(0, 1))
    assert parity.max_abs_diff < NOISY_ATOL, parity.max_abs_diff
    assert not np.allclose(parity.ours[0], parity.ours[1], atol=1e-3)


@pytest.mark.parametrize("filename, steps", [(HYPER_SDXL_8STEP, 8), (HYPER_SDXL_4STEP, 4)])
def test_hyper_matches_the_cards_recipe(hyper, filename, steps):
    """The card: ``load_lora_weights`` + ``fuse_lora()``, ``DDIMScheduler.from_config(config,
    timestep_spacing="trailing")``, ``guidance_scale=0``; the ``lora_file`` option picks the
    4-step LoRA."""
    from diffusers import DDIMScheduler

    backbone = hyper if filename == HYPER_SDXL_8STEP else SDXLHyperBackbone.tiny(
        0, lora_file=HYPER_SDXL_4STEP)
    pipe = card_lora_pipeline(backbone, filename)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config,
                                               timestep_spacing="trailing")
    parity = pipeline_parity(backbone, pipe, PROMPT, num_inference_steps=steps)
    assert parity.max_abs_diff < NOISY_ATOL, parity.max_abs_diff
    without_lora = images(SDXLHyperBackbone.tiny(0, lora=None), steps)
    assert np.abs(parity.ours - without_lora).max() > 1e-2  # the LoRA was fused in


def test_hyper_lora_files_differ(hyper):
    four = SDXLHyperBackbone.tiny(0, lora_file=HYPER_SDXL_4STEP)
    assert np.abs(images(hyper, 2) - images(four, 2)).max() > 1e-3


def test_hyper_lora_steps_picks_the_4_step_file_and_runs_4_steps(hyper, tmp_path):
    """``lora_steps=4`` loads the 4-step file and makes 4 this instance's default step count,
    as the card runs it; naming the 4-step file (by ``lora_file`` or as ``lora``) does the
    same; the class keeps 8 for every other instance."""
    import shutil

    lora = hyper.options["lora"]
    four = SDXLHyperBackbone.tiny(0, lora_steps=4)
    assert four.lora_filename() == HYPER_SDXL_4STEP
    assert four.default_steps == 4 and SDXLHyperBackbone.default_steps == 8
    assert hyper.default_steps == 8
    assert denoise(four, PROMPT, seeds=[0], output_type="np").forwards == 4
    by_name = SDXLHyperBackbone.tiny(0, lora_file=HYPER_SDXL_4STEP)
    assert by_name.default_steps == 4
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(by_name.pipe.unet.state_dict()[key], four.pipe.unet.state_dict()[key])
    assert not torch.equal(hyper.pipe.unet.state_dict()[key], four.pipe.unet.state_dict()[key])
    shutil.copy(Path(lora) / HYPER_SDXL_4STEP, tmp_path / HYPER_SDXL_4STEP)
    assert SDXLHyperBackbone(lora=str(tmp_path / HYPER_SDXL_4STEP)).default_steps == 4
    assert SDXLHyperBackbone(lora_steps=8).default_steps == 8
    assert SDXLHyperBackbone(lora_file="my-hyper.safetensors").default_steps == 8
    assert SDXLHyperBackbone(lora=None, lora_steps=4).default_steps == 4  # a fused 4-step model


@pytest.mark.parametrize("steps", [4, 2])
def test_dmd2_matches_the_cards_recipe(dmd2, steps):
    """The card: a UNet built from SDXL base's config with ``load_state_dict(torch.load(
    "dmd2_sdxl_4step_unet_fp16.bin"))``, ``LCMScheduler.from_config``, ``guidance_scale=0`` and
    ``timesteps=[999, 749, 499, 249]``; 2 steps run at DMD2's grid rule, [999, 499]."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(dmd2.source, subfolder="unet"))
    unet.load_state_dict(torch.load(Path(dmd2.options["unet"]) / DMD2_UNET, weights_only=True))
    pipe = sdxl_pipeline(dmd2.source, unet=unet)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    timesteps = [999, 749, 499, 249] if steps == 4 else [999, 499]
    parity = pipeline_parity(dmd2, pipe, PROMPT, num_inference_steps=steps, seeds=(0, 1),
                             timesteps=timesteps)
    assert parity.max_abs_diff < NOISY_ATOL, parity.max_abs_diff
    assert [int(t) for t in dmd2.schedule(steps, height=64, width=64).timesteps] == timesteps


def test_dmd2_timestep_rule():
    """t_k = 999 - k * (1000 // N): the card's 4 steps, and DMD2's training grid otherwise."""
    assert dmd2_timesteps(4) == [999, 749, 499, 249]
    assert dmd2_timesteps(1) == [999]
    assert dmd2_timesteps(3) == [999, 666, 333]
    assert dmd2_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert dmd2_timesteps(1000)[-1] == 0
    with pytest.raises(InvalidArgumentError, match="num_inference_steps=0"):
        dmd2_timesteps(0)


def test_dmd2_reads_the_bin_with_weights_only_and_refuses_other_pickles(dmd2, tmp_path):
    """The published UNet is a pickled state dict: read with torch.load(weights_only=True),
    so a pickle that needs code is refused; a safetensors copy with the same keys loads the
    same UNet."""
    from safetensors.torch import save_file

    state = torch.load(Path(dmd2.options["unet"]) / DMD2_UNET, weights_only=True)
    save_file(state, str(tmp_path / "dmd2.safetensors"))
    copy = SDXLDMD2Backbone(dmd2.source, device="cpu", dtype="fp32",
                            unet=str(tmp_path / "dmd2.safetensors")).load()
    for key, value in dmd2.pipe.unet.state_dict().items():
        assert torch.equal(value, copy.pipe.unet.state_dict()[key]), key
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "code.bin")
    with pytest.raises(UnsafeWeightsError, match="code.bin"):
        SDXLDMD2Backbone(dmd2.source, device="cpu", unet=str(tmp_path / "code.bin")).load()
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(WeightsNotFoundError, match="list.bin.*not hold a UNet state dict"):
        SDXLDMD2Backbone(dmd2.source, device="cpu", unet=str(tmp_path / "list.bin")).load()


@pytest.mark.parametrize("eta", [0.3, 0.0, 0.8])
def test_tcd_matches_the_cards_recipe_at_its_eta(tcd, eta):
    """The card: ``TCDScheduler.from_config``, ``load_lora_weights`` + ``fuse_lora()``, 4
    steps, ``guidance_scale=0``, ``eta=0.3``; the ``eta`` option is the pipeline's ``eta``.
    With eta > 0 every step but the last draws noise from each seed's generator; eta 0 is
    deterministic and hands out no generators."""
    from diffusers import TCDScheduler

    backbone = tcd if eta == 0.3 else SDXLTCDBackbone.tiny(0, eta=eta)
    pipe = card_lora_pipeline(backbone, TCD_LORA_FILE)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    parity = pipeline_parity(backbone, pipe, PROMPT, num_inference_steps=4, seeds=(0, 1),
                             eta=eta)
    assert parity.max_abs_diff < NOISY_ATOL, parity.max_abs_diff
    assert backbone.injects_noise == (eta > 0)


def test_tcd_predicted_x0_is_the_clean_estimate(tcd):
    """x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t), the estimate TCD computes in its step."""
    from adapterswap.denoise import StepContext

    prompt = tcd.encode_prompt([PROMPT], guidance_scale=None)
    latents = tcd.prepare_latents([torch.Generator().manual_seed(0)], height=64, width=64)
    schedule = tcd.schedule(4, height=64, width=64)
    ctx = StepContext(schedule.timesteps[:1], (0,), (4,), 64, 64)
    eps = tcd.predict(latents, ctx, prompt, guidance_scale=None)
    alpha = tcd.pipe.scheduler.alphas_cumprod[int(schedule.timesteps[0])]
    expected = (latents - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    torch.testing.assert_close(tcd.predict_x0(eps, latents, schedule, 0), expected,
                               atol=1e-5, rtol=1e-5)


def test_noise_drawing_runs_with_different_step_counts_keep_their_own_noise(turbo):
    """Step-parallel batching: a 2-step and a 4-step run advanced together give what each
    gives alone (each row's ancestral noise comes from its own seed's generator)."""
    from adapterswap.denoise import StepContext

    prompt = turbo.encode_prompt([PROMPT], guidance_scale=None)
    runs = {1: 2, 2: 4}  # seed -> steps
    latents = turbo.prepare_latents([torch.Generator().manual_seed(s) for s in runs],
                                    height=64, width=64)
    schedules = {n: turbo.schedule(n, height=64, width=64) for n in runs.values()}
    rows, finished = list(runs.items()), {}
    for tick in range(max(runs.values())):
        steps = [n for _, n in rows]
        ctx = StepContext(torch.stack([schedules[n].timesteps[tick] for n in steps]),
                          (tick,) * len(rows), tuple(steps), 64, 64,
                          torch.stack([schedules[n].sigmas[tick] for n in steps]))
        output = turbo.predict(latents, ctx, prompt.repeat(len(rows)), guidance_scale=None)
        for r, n in reversed(list(enumerate(steps))):
            latents[r:r + 1] = turbo.step(output[r:r + 1], latents[r:r + 1], schedules[n], tick)
        finished.update({seed: latents[r:r + 1] for r, (seed, n) in enumerate(rows)
                         if n == tick + 1})
        keep = [r for r, (_, n) in enumerate(rows) if n > tick + 1]
        rows, latents = [rows[r] for r in keep], latents[keep]
    for seed, n in runs.items():
        alone = denoise(turbo, PROMPT, num_inference_steps=n, seeds=[seed], output_type="pt")
        torch.testing.assert_close(finished[seed], alone.latents, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------- options and files
@pytest.mark.parametrize("cls, options, message", [
    (SDXLTCDBackbone, {"eta": 1.5}, r"invalid eta=1.5: must be a number from 0 to 1"),
    (SDXLTCDBackbone, {"eta": "high"}, r"invalid eta='high'"),
    (SDXLTCDBackbone, {"eta": True}, r"invalid eta=True"),
    (SDXLTCDBackbone, {"timestep_spacing": "leading"},
     r"unknown option 'timestep_spacing'.*TCDScheduler ignores it"),
    (SDXLHyperBackbone, {"lora_file": 8}, r"invalid lora_file=8: must be a file name"),
    (SDXLHyperBackbone, {"lora": 3}, r"invalid lora=3"),
    (SDXLHyperBackbone, {"timestep_spacing": "sideways"}, r"invalid timestep_spacing='sideways'"),
    (SDXLHyperBackbone, {"lora_steps": 2}, r"invalid lora_steps=2: choose one of 8, 4"),
    (SDXLHyperBackbone, {"lora_steps": True}, r"invalid lora_steps=True"),
    (SDXLHyperBackbone, {"lora_steps": 4, "lora_file": "x.safetensors"},
     r"invalid lora_steps=4: give lora_steps or lora_file='x.safetensors', not both"),
    (SDXLTCDBackbone, {"lora_steps": 4}, r"unknown option 'lora_steps'"),
    (SDXLDMD2Backbone, {"unet_file": 4}, r"invalid unet_file=4"),
    (SDXLDMD2Backbone, {"timestep_spacing": "trailing"},
     r"unknown option 'timestep_spacing'.*DMD2 runs at its own timesteps"),
    (SDXLTurboBackbone, {"lora": "x"}, r"unknown option 'lora'"),
])
def test_bad_options_are_one_line_naming_option_and_value(cls, options, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        cls(**options)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError, match=message):  # before anything is built
        cls.tiny(0, cache_dir="/nonexistent/not-built", **options)


def test_missing_lora_and_unet_files_are_named(hyper, tmp_path):
    with pytest.raises(WeightsNotFoundError, match=f"{tmp_path.name}.*{HYPER_SDXL_8STEP}"):
        SDXLHyperBackbone(hyper.source, device="cpu", lora=str(tmp_path)).load()
    with pytest.raises(WeightsNotFoundError, match=f"{tmp_path.name}.*{TCD_LORA_FILE}"):
        SDXLTCDBackbone(hyper.source, device="cpu", lora=str(tmp_path)).load()
    with pytest.raises(WeightsNotFoundError, match=f"{tmp_path.name}.*{DMD2_UNET}"):
        SDXLDMD2Backbone(hyper.source, device="cpu", unet=str(tmp_path)).load()


def test_lora_fuses_the_same_from_every_key_layout(hyper, tmp_path):
    """Hyper-SD and TCD publish ``lora_unet_*`` (kohya) keys, which the tiny presets write;
    the diffusers and PEFT layouts of the same factors fuse into the same UNet, so the
    backbone does not depend on which layout a copy of the file is in."""
    from adapterswap.kit.tiny_lora import LORA_LAYOUTS, save_tiny_unet_lora

    fused = {}
    for layout in LORA_LAYOUTS:
        path = save_tiny_unet_lora(hyper.pipe.unet, tmp_path / layout / "lora.safetensors",
                                   7, layout=layout)
        backbone = SDXLHyperBackbone(hyper.source, device="cpu", dtype="fp32",
                                     lora=str(path)).load()
        fused[layout] = backbone.pipe.unet.state_dict()
    plain = SDXLHyperBackbone(hyper.source, device="cpu", dtype="fp32", lora=None).load()
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.allclose(fused["kohya"][key], plain.pipe.unet.state_dict()[key])
    for layout in LORA_LAYOUTS[1:]:
        for name, value in fused["kohya"].items():
            torch.testing.assert_close(fused[layout][name], value, atol=1e-6, rtol=0)
