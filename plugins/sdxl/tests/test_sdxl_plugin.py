"""SDXL backbones and the style IP-Adapter on tiny random weights: parity with diffusers'
StableDiffusionXLPipeline, InstantStyle targeting, h94 file layouts, windows, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from adapterswap_sdxl.adapters import TARGETS, StyleIPAdapter
from adapterswap_sdxl.backbones import LIGHTNING_UNET, SDXLBackbone, SDXLLightningBackbone

from adapterswap.denoise import StepContext, denoise
from adapterswap.errors import InvalidArgumentError, UsageError, WeightsNotFoundError
from adapterswap.kit.ip_adapter_install import ip_processors
from adapterswap.kit.parity import pipeline_parity
from adapterswap.probes import ProbeRecorder

PROMPT = "a watercolor painting of a lighthouse"
STYLE_LAYER = "up_blocks.0.attentions.1."
LAYOUT_LAYER = "down_blocks.2.attentions.1."


@pytest.fixture(scope="module")
def sdxl() -> SDXLBackbone:
    return SDXLBackbone.tiny(0)


@pytest.fixture(scope="module")
def lightning() -> SDXLLightningBackbone:
    return SDXLLightningBackbone.tiny(0)


@pytest.fixture()
def style(sdxl: SDXLBackbone) -> StyleIPAdapter:
    adapter = StyleIPAdapter.tiny(sdxl, 0)
    yield adapter
    adapter.detach()


@pytest.fixture(scope="module")
def reference():
    return StyleIPAdapter.tiny_reference(0)


def run(backbone, steps, adapter=None, reference=None, **kwargs):
    result = denoise(backbone, PROMPT, num_inference_steps=steps, seeds=[0], adapter=adapter,
                     reference=reference, output_type="np", **kwargs)
    return np.asarray(result.images)


def reference_pipeline(backbone, *, lightning: bool, device="cpu", dtype=torch.float32):
    """The plain diffusers pipeline from the same files, built as the model cards do."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    kwargs = {}
    if lightning:
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(backbone.source, subfolder="unet"))
        unet.load_state_dict(load_file(str(Path(backbone.options["unet"]) / LIGHTNING_UNET)))
        kwargs["unet"] = unet.to(dtype)
    pipe = StableDiffusionXLPipeline.from_pretrained(backbone.source, add_watermarker=False,
                                                     local_files_only=True, dtype=dtype,
                                                     **kwargs).to(device)
    if lightning:
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                            timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(pipe, steps, guidance_scale, **kwargs):
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, height=64,
                width=64, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


# ------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", ["sdxl", "sdxl-lightning"])
def test_denoise_matches_pipeline_with_and_without_ip_adapter(name, sdxl, lightning, style,
                                                              reference):
    """3 steps of SDXL-base (its "leading" schedule scales the noise by a step-count-dependent
    sigma) and 4 Lightning steps give the pipeline's images, with the IP-Adapter loaded by
    diffusers' own load_ip_adapter from the same h94-layout file."""
    backbone = sdxl if name == "sdxl" else lightning
    steps, guidance = (3, 5.0) if name == "sdxl" else (4, 0.0)
    pipe = reference_pipeline(backbone, lightning=name != "sdxl")
    parity = pipeline_parity(backbone, pipe, PROMPT, num_inference_steps=steps,
                             guidance_scale=guidance, height=64, width=64)
    plain = parity.ours
    np.testing.assert_allclose(plain, parity.theirs, atol=1e-6, rtol=0)

    ours = run(backbone, steps, style, reference)
    pipe.load_ip_adapter(style.source, subfolder="sdxl_models",
                         weight_name="ip-adapter_sdxl.safetensors",
                         image_encoder_folder="image_encoder", local_files_only=True)
    pipe.set_ip_adapter_scale(TARGETS["style"])
    expected = pipeline_images(pipe, steps, guidance, ip_adapter_image=reference)
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)
    assert np.abs(ours - plain).max() > 1e-3  # the adapter does act


@pytest.mark.parametrize("steps", [1, 3])
def test_timestep_spacing_option_matches_pipeline_with_that_scheduler_config(sdxl, steps):
    """``timestep_spacing="trailing"`` gives the images of the pipeline whose scheduler is
    ``EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")``; at one step
    "leading" would start at sigma 0.041, "trailing" starts at 14.6."""
    from diffusers import EulerDiscreteScheduler

    trailing = SDXLBackbone.tiny(0, timestep_spacing="trailing")
    pipe = reference_pipeline(trailing, lightning=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                        timestep_spacing="trailing")
    ours = run(trailing, steps)
    np.testing.assert_allclose(ours, pipeline_images(pipe, steps, 5.0), atol=1e-6, rtol=0)
    assert np.abs(ours - run(sdxl, steps)).max() > 1e-3  # the option does change the images


def test_predict_x0_is_the_euler_estimate(sdxl):
    """x0 = x_t - sigma_t * eps at the first step, x_t the noise times sqrt(sigma^2 + 1)."""
    prompt = sdxl.encode_prompt([PROMPT], guidance_scale=5.0)
    noise = sdxl.prepare_latents([torch.Generator().manual_seed(0)], height=64, width=64)
    schedule = sdxl.schedule(3, height=64, width=64)
    sigma = schedule.sigmas[0]
    ctx = StepContext(schedule.timesteps[:1], (0,), (3,), 64, 64, schedule.sigmas[:1])
    eps = sdxl.predict(noise, ctx, prompt, guidance_scale=5.0)
    x0 = sdxl.predict_x0(eps, noise, schedule, 0)
    expected = noise * (sigma**2 + 1) ** 0.5 - sigma * eps
    torch.testing.assert_close(x0, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- InstantStyle
@pytest.mark.parametrize("target, layers", [
    ("style", (STYLE_LAYER,)),
    ("style+layout", (STYLE_LAYER, LAYOUT_LAYER)),
    ("global", None),
])
def test_targeting_sets_only_the_targeted_processors(sdxl, reference, target, layers):
    adapter = StyleIPAdapter.tiny(sdxl, 0, target=target, scale=0.5)
    try:
        adapter.attach(sdxl)
        conditioning = adapter.encode_reference(reference, sdxl)
        prompt = sdxl.encode_prompt([PROMPT], guidance_scale=5.0)
        latents = sdxl.prepare_latents([torch.Generator().manual_seed(0)], height=64, width=64)
        schedule = sdxl.schedule(2, height=64, width=64)
        ctx = StepContext(schedule.timesteps[:1], (0,), (2,), 64, 64, schedule.sigmas[:1])
        inputs = adapter.denoiser_inputs(sdxl, conditioning, latents, ctx, prompt)
        sdxl.predict(latents, ctx, prompt, guidance_scale=5.0, adapter_inputs=inputs)
        scales = {name: proc.scale for name, proc in ip_processors(sdxl.pipe.unet).items()}
        cross = [n for n, _ in sdxl.pipe.unet.named_modules() if n.endswith(".attn2")]
        assert len(scales) == len(cross) == 17  # every cross-attention has an IP processor
        on = {name for name, scale in scales.items() if scale != [0.0]}
        if layers is None:
            assert on == set(scales)
        else:
            assert on and all(name.startswith(layers) for name in on)
            assert {name for name in scales if name.startswith(layers)} == on
        assert all(scales[name] == [0.5] for name in on)
        # the same per-layer scales as diffusers' own set_ip_adapter_scale
        sdxl.pipe.set_ip_adapter_scale(TARGETS[target])
        theirs = {name: proc.scale[0] for name, proc in ip_processors(sdxl.pipe.unet).items()}
        assert theirs == adapter.layer_scales(sdxl.pipe.unet)
    finally:
        adapter.detach()


def test_probes_measure_the_targeted_layers_in_proportion_to_the_scale(sdxl, reference):
    """Probes record ||scale * IP attention|| / ||text attention|| for exactly the layers
    InstantStyle targets, one value per sample. In the first targeted layer of the first step
    nothing upstream depends on the scale, so halving the scale halves the value there."""
    records = {}
    for scale in (1.0, 0.5):
        adapter = StyleIPAdapter.tiny(sdxl, 0, scale=scale)
        recorder = ProbeRecorder()
        adapter.attach(sdxl)
        adapter.set_probe(recorder)
        denoise(sdxl, PROMPT, num_inference_steps=1, seeds=[0, 1], adapter=adapter,
                reference=reference, output_type="np")
        adapter.detach()
        assert adapter._probe_hooks is None
        records[scale] = {block: values for block, quantity, values in recorder.drain()
                          if quantity == "ip/text"}
    targeted = {n for n, _ in sdxl.pipe.unet.named_modules()
                if n.startswith(STYLE_LAYER) and n.endswith(".attn2")}
    assert set(records[1.0]) == targeted
    for values in records[1.0].values():
        assert len(values) == 2 and all(v > 0 for v in values)
    first = STYLE_LAYER + "transformer_blocks.0.attn2"
    np.testing.assert_allclose(records[0.5][first], np.multiply(records[1.0][first], 0.5),
                               rtol=1e-5)


def test_style_only_output_differs_from_global_and_from_none(sdxl, reference):
    base = run(sdxl, 2)
    outputs = {}
    for target in ("style", "global"):
        adapter = StyleIPAdapter.tiny(sdxl, 0, target=target)
        outputs[target] = run(sdxl, 2, adapter, reference)
        adapter.detach()
    assert np.abs(outputs["style"] - base).max() > 1e-3
    assert np.abs(outputs["style"] - outputs["global"]).max() > 1e-3


@pytest.mark.parametrize("target, message", [
    ({"up": {"block_2": [0.0, 1.0, 0.0]}}, r"no up_blocks\.2 with attention"),
    ({"down": {"block_0": 1.0}}, r"no down_blocks\.0 with attention"),
    ({"up": {"block_0": [0.0, 1.0]}}, r"list of 3 numbers"),
    ({"middle": 1.0}, r"unknown key"),
])
def test_scale_dict_the_unet_lacks_is_named(sdxl, target, message):
    adapter = StyleIPAdapter.tiny(sdxl, 0, target=target)
    processors = dict(sdxl.pipe.unet.attn_processors)
    with pytest.raises(InvalidArgumentError, match=r"invalid target=\{.*" + message):
        adapter.attach(sdxl)
    assert adapter.attached_to is None
    assert all(sdxl.pipe.unet.attn_processors[k] is v for k, v in processors.items())


def test_unknown_target_and_option_are_named():
    with pytest.raises(InvalidArgumentError, match="invalid target='stile'"):
        StyleIPAdapter(target="stile")
    with pytest.raises(InvalidArgumentError, match="invalid colour='red'"):
        StyleIPAdapter(colour="red")
    with pytest.raises(InvalidArgumentError, match="unknown option 'unet_fille'"):
        SDXLLightningBackbone(unet_fille="x.safetensors")


# --------------------------------------------------------------------------- file layouts
def test_legacy_bin_loads_like_safetensors(sdxl, style, reference):
    legacy = StyleIPAdapter(style.source, weight_name="sdxl_models/ip-adapter_sdxl.bin",
                            device="cpu", dtype="fp32").load()
    for part in ("image_proj", "ip_adapter"):
        assert legacy.state_dict[part].keys() == style.state_dict[part].keys()
        for key, value in style.state_dict[part].items():
            assert torch.equal(value, legacy.state_dict[part][key]), key
    assert style.state_dict["ip_adapter"]["1.to_k_ip.weight"].dtype == torch.float16
    with_safetensors = run(sdxl, 2, style, reference)
    with pytest.raises(UsageError, match="already has an IP-Adapter"):
        legacy.attach(sdxl)  # one IP-Adapter per backbone at a time
    style.detach()
    assert np.array_equal(with_safetensors, run(sdxl, 2, legacy, reference))
    legacy.detach()


def test_missing_adapter_weights_are_named(tmp_path):
    (tmp_path / "sdxl_models").mkdir()
    with pytest.raises(WeightsNotFoundError, match="ip-adapter_sdxl.safetensors"):
        StyleIPAdapter(str(tmp_path), device="cpu").load()
    with pytest.raises(WeightsNotFoundError, match="no-such-dir"):
        StyleIPAdapter(str(tmp_path / "no-such-dir"), device="cpu").load()


def test_missing_lightning_unet_is_named(sdxl, tmp_path):
    with pytest.raises(WeightsNotFoundError,
                       match=f"{tmp_path.name}.*incomplete.*{LIGHTNING_UNET}"):
        SDXLLightningBackbone(sdxl.source, device="cpu", unet=str(tmp_path)).load()


# ------------------------------------------------------------------ windows and detaching
def test_mixed_window_batch_equals_separate_runs(sdxl, style, reference):
    """Two samples of a step-parallel batch, one inside the adapter's window and one outside:
    the outside one gets exactly the no-adapter output, the inside one the adapter's."""
    style.set_window(0.0, 0.5)
    style.attach(sdxl)
    conditioning = style.encode_reference(reference, sdxl)
    prompt = sdxl.encode_prompt([PROMPT], guidance_scale=5.0)
    latents = sdxl.prepare_latents([torch.Generator().manual_seed(s) for s in (1, 2)],
                                   height=64, width=64)
    s2, s4 = sdxl.schedule(2, height=64, width=64), sdxl.schedule(4, height=64, width=64)

    def ctx(rows):
        steps = [(s2, 0, 2), (s4, 3, 4)]
        picked = [steps[r] for r in rows]
        return StepContext(torch.stack([s.timesteps[i] for s, i, _ in picked]),
                           tuple(i for _, i, _ in picked), tuple(n for _, _, n in picked),
                           64, 64, torch.stack([s.sigmas[i] for s, i, _ in picked]))

    def predict(rows, with_adapter=True):
        c = ctx(rows)
        x = latents[rows]
        inputs = None
        if with_adapter:
            inputs = style.denoiser_inputs(sdxl, conditioning.repeat(len(rows)), x, c,
                                           prompt.repeat(len(rows)))
        return sdxl.predict(x, c, prompt.repeat(len(rows)), guidance_scale=5.0,
                            adapter_inputs=inputs)

    recorder = ProbeRecorder()
    style.set_probe(recorder)
    joint = predict([0, 1])
    style.set_probe(None)
    records = recorder.drain()
    assert records and all(v[0] > 0 and v[1] == 0.0 for _, _, v in records)  # row 1 is off
    inputs = style.denoiser_inputs(sdxl, conditioning.repeat(2), latents, ctx([0, 1]),
                                   prompt.repeat(2))
    assert inputs.scales[0] and inputs.scales[1] is None
    active = predict([0])
    inactive = predict([1])
    # a batch of 2 against batches of 1: CPU matmul blocking may differ with the batch size
    torch.testing.assert_close(joint[:1], active, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(joint[1:], inactive, atol=1e-5, rtol=1e-4)
    style.detach()
    assert torch.equal(inactive, predict([1], with_adapter=False))
    assert not torch.allclose(active, predict([0], with_adapter=False), atol=1e-4)
    style.set_window(0.0, 1.0)


def test_detach_restores_the_very_same_modules(sdxl, lightning, style, reference):
    unet = sdxl.pipe.unet
    before = dict(unet.attn_processors)
    style.attach(sdxl)
    assert sdxl.pipe.image_encoder is style.image_encoder
    assert unet.config.encoder_hid_dim_type == "ip_image_proj"
    installed = ip_processors(unet)
    # moving to the distilled backbone re-installs the same modules: nothing is rebuilt
    style.attach(lightning)
    assert all(lightning.pipe.unet.attn_processors[name] is proc
               for name, proc in installed.items())
    assert lightning.pipe.unet.encoder_hid_proj is style._modules.image_projection
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert sdxl.pipe.image_encoder is None and sdxl.pipe.feature_extractor is None
    style.detach()
    assert not ip_processors(lightning.pipe.unet)


def test_predict_without_inputs_while_attached_is_refused(sdxl, style):
    style.attach(sdxl)
    with pytest.raises(UsageError, match="IP-Adapter attached"):
        run(sdxl, 1)


def test_generate_cli_with_tiny_preset(tmp_path):
    from click.testing import CliRunner

    from adapterswap.cli import main

    out = tmp_path / "tiny.png"
    result = CliRunner().invoke(main, ["generate", "--preset", "tiny", "--backbone", "sdxl",
                                       "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    assert "style-ip-adapter" in result.output
