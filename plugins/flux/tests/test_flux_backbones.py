"""flux-dev and flux-schnell: the core contract, schedules, loading and options."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from adapterswap.errors import InvalidArgumentError, UsageError, WeightsNotFoundError
from adapterswap.plugins import get_backbone
from adapterswap.testing import BackboneContract


class TestFluxDevContract(BackboneContract):
    backbone_name = "flux-dev"

    @pytest.fixture(scope="class")
    def backbone(self, flux_dev):  # the session's tiny preset (built by the same tiny())
        return flux_dev


class TestFluxSchnellContract(BackboneContract):
    backbone_name = "flux-schnell"

    @pytest.fixture(scope="class")
    def backbone(self, flux_schnell):
        return flux_schnell


def test_declared_like_the_real_checkpoints():
    dev, schnell = get_backbone("flux-dev"), get_backbone("flux-schnell")
    assert (dev.default_source, dev.default_steps, dev.guidance_mode,
            dev.default_guidance_scale) == ("black-forest-labs/FLUX.1-dev", 28, "embedded", 3.5)
    assert (schnell.default_source, schnell.default_steps, schnell.guidance_mode,
            schnell.default_guidance_scale) == ("black-forest-labs/FLUX.1-schnell", 4, "none",
                                                None)
    assert dev.max_sequence_length == 512 and schnell.max_sequence_length == 256
    assert dev.family == schnell.family == "flux"
    assert dev.default_adapter == schnell.default_adapter == "infusenet"
    assert dev.default_step_grid()[-1] == 28 and schnell.default_step_grid()[-1] == 4


def test_tiny_preset_is_the_diffusers_layout_loaded_back(flux_dev, flux_schnell):
    from pathlib import Path

    from adapterswap.hub import missing_files

    for backbone, embeds in ((flux_dev, True), (flux_schnell, False)):
        root = Path(backbone.source)
        assert missing_files(root, type(backbone).required_files) == []
        index = json.loads((root / "model_index.json").read_text())
        assert index["_class_name"] == "FluxPipeline"
        assert backbone.pipe.transformer.config.guidance_embeds is embeds
        assert (backbone.default_height, backbone.default_width) == (64, 64)
        assert backbone.device == "cpu" and backbone.dtype == torch.float32


def _flux_sigmas(n, *, mu=None, shift=1.0):
    """FLUX's schedule written out: linspace(1, 1/n, n), then the exponential time shift with
    ``mu`` (dev) or the plain shift (schnell), then a final 0."""
    sigmas = np.linspace(1.0, 1 / n, n)
    if mu is not None:
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    else:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.append(sigmas, 0.0)


@pytest.mark.parametrize("height, width", [(64, 64), (128, 192)])
def test_dev_schedule_has_dynamic_shift_from_sequence_length(flux_dev, height, width):
    seq_len = (height // 16) * (width // 16)
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = seq_len * slope + (0.5 - slope * 256)
    schedule = flux_dev.schedule(5, height=height, width=width)
    np.testing.assert_allclose(schedule.sigmas.numpy(), _flux_sigmas(5, mu=mu), atol=1e-6)
    np.testing.assert_allclose(schedule.timesteps.numpy(), schedule.sigmas[:-1].numpy() * 1000,
                               rtol=1e-6)


def test_schnell_schedule_is_unshifted(flux_schnell):
    small = flux_schnell.schedule(4, height=64, width=64)
    large = flux_schnell.schedule(4, height=256, width=256)
    np.testing.assert_allclose(small.sigmas.numpy(), _flux_sigmas(4), atol=1e-7)
    assert torch.equal(small.sigmas, large.sigmas)  # no resolution dependence


def test_step_and_x0_are_flow_matching_euler(flux_dev):
    schedule = flux_dev.schedule(3, height=64, width=64)
    latents = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    velocity = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    s0, s1 = schedule.sigmas[1], schedule.sigmas[2]
    torch.testing.assert_close(flux_dev.step(velocity, latents, schedule, 1),
                               latents + (s1 - s0) * velocity)
    torch.testing.assert_close(flux_dev.predict_x0(velocity, latents, schedule, 1),
                               latents - s0 * velocity)
    # x_t = (1 - sigma) x0 + sigma * noise with v = noise - x0 gives x0 back exactly
    x0, noise = torch.randn(1, 16, 16), torch.randn(1, 16, 16)
    x_t = (1 - s0) * x0 + s0 * noise
    torch.testing.assert_close(flux_dev.predict_x0(noise - x0, x_t, schedule, 1), x0)


def test_latents_are_flux_pipeline_noise(flux_dev):
    generator = torch.Generator("cpu").manual_seed(11)
    ours = flux_dev.prepare_latents([torch.Generator("cpu").manual_seed(11)], height=64,
                                    width=96)
    theirs, _ = flux_dev.pipe.prepare_latents(1, 4, 64, 96, torch.float32, "cpu", generator)
    assert ours.shape == (1, 4 * 6, 16)
    assert torch.equal(ours, theirs)


def test_predict_refuses_unknown_adapter_inputs(flux_schnell):
    from adapterswap.denoise import StepContext

    prompt = flux_schnell.encode_prompt(["a cat"])
    latents = flux_schnell.prepare_latents([torch.Generator().manual_seed(0)], height=64,
                                           width=64)
    schedule = flux_schnell.schedule(2, height=64, width=64)
    ctx = StepContext(schedule.timesteps[:1], (0,), (2,), 64, 64)
    with pytest.raises(UsageError, match="ip_adapter_image_embeds"):
        flux_schnell.predict(latents, ctx, prompt, guidance_scale=None,
                             adapter_inputs={"ip_adapter_image_embeds": None})


def test_negative_prompts_and_bad_output_type_are_refused(flux_schnell):
    with pytest.raises(InvalidArgumentError, match="negative_prompts"):
        flux_schnell.encode_prompt(["a"], negative_prompts=["b"])
    latents = flux_schnell.prepare_latents([torch.Generator().manual_seed(0)], height=64,
                                           width=64)
    with pytest.raises(InvalidArgumentError, match="output_type='latent'"):
        flux_schnell.decode(latents, height=64, width=64, output_type="latent")


def test_output_types(flux_schnell):
    latents = flux_schnell.prepare_latents([torch.Generator().manual_seed(0)], height=64,
                                           width=64)
    pil = flux_schnell.decode(latents, height=64, width=64, output_type="pil")
    array = flux_schnell.decode(latents, height=64, width=64, output_type="np")
    tensor = flux_schnell.decode(latents, height=64, width=64, output_type="pt")
    assert pil[0].size == (64, 64) and array.shape == (1, 64, 64, 3)
    assert tensor.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(tensor.permute(0, 2, 3, 1).numpy(), array, atol=1e-6)


# -- loading --------------------------------------------------------------------------------------
def test_missing_component_file_is_named(flux_schnell, tmp_path):
    copy = tmp_path / "FLUX.1-schnell"
    shutil.copytree(flux_schnell.source, copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError) as info:
        get_backbone("flux-schnell")(str(copy), device="cpu").load()
    message = str(info.value)
    assert "FLUX.1-schnell" in message and "vae/diffusion_pytorch_model.safetensors" in message
    assert "hf download black-forest-labs/FLUX.1-schnell" in message


def test_dev_refuses_a_schnell_directory(flux_schnell):
    with pytest.raises(InvalidArgumentError, match="use backbone 'flux-schnell'"):
        get_backbone("flux-dev")(flux_schnell.source, device="cpu").load()


def test_loads_from_the_hf_cache_offline(flux_schnell, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    snapshot = tmp_path / "models--black-forest-labs--FLUX.1-schnell" / "snapshots" / "abc123"
    shutil.copytree(flux_schnell.source, snapshot)
    refs = tmp_path / "models--black-forest-labs--FLUX.1-schnell" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    backbone = get_backbone("flux-schnell")(device="cpu", dtype="fp32").load()
    assert backbone.source == "black-forest-labs/FLUX.1-schnell"
    assert backbone.pipe.transformer.config.guidance_embeds is False


@pytest.mark.parametrize("options, match", [
    ({"no_such_option": 1}, "unknown option 'no_such_option'"),
    ({"cpu_offload": "yes"}, "cpu_offload='yes'"),
    ({"max_sequence_length": 1024}, "max_sequence_length=1024"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises(InvalidArgumentError, match=match):
        get_backbone("flux-dev")(**options)


def test_cpu_offload_needs_cuda(flux_schnell):
    with pytest.raises(InvalidArgumentError, match="cpu_offload=True.*CUDA"):
        get_backbone("flux-schnell")(flux_schnell.source, device="cpu", cpu_offload=True).load()


def test_quantize_8bit_without_optimum_quanto_is_explained(flux_schnell, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_quanto(name, *args, **kwargs):
        if name.startswith("optimum"):
            raise ImportError("No module named 'optimum'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_quanto)
    with pytest.raises(InvalidArgumentError, match=r"adapterswap-flux\[quantize\]"):
        get_backbone("flux-schnell")(flux_schnell.source, device="cpu",
                                     quantize_8bit=True).load()


def test_quantize_8bit_with_optimum_quanto(flux_schnell):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    from adapterswap.denoise import denoise

    backbone = get_backbone("flux-schnell")(flux_schnell.source, device="cpu", dtype="fp32",
                                            quantize_8bit=True).load()
    backbone.default_height = backbone.default_width = 64
    linears = [m for m in backbone.pipe.transformer.modules() if isinstance(m, QLinear)]
    assert linears and all(m.weight.qtype.bits == 8 for m in linears)
    quantized = denoise(backbone, "a cat", num_inference_steps=2, output_type="np").images
    full = denoise(flux_schnell, "a cat", num_inference_steps=2, output_type="np").images
    assert quantized.shape == full.shape and np.isfinite(quantized).all()
    assert np.abs(quantized - full).mean() < 0.05  # 8-bit weights: close, not equal


def test_listed_by_the_cli():
    from click.testing import CliRunner

    from adapterswap.cli import main

    result = CliRunner().invoke(main, ["list", "backbones", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["flux-dev"]["guidance_mode"] == "embedded"
    assert rows["flux-schnell"]["guidance_mode"] == "none"
    result = CliRunner().invoke(main, ["list", "adapters", "--json"])
    assert "infusenet" in {row["name"] for row in json.loads(result.output)}


@pytest.mark.gpu
def test_cuda_bf16_with_and_without_cpu_offload(flux_dev):
    """On a GPU: bf16 by default, model CPU offload gives the same image as the plain GPU run;
    in fp32 the GPU image is the CPU image (noise is drawn on the CPU, as diffusers does)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from adapterswap.denoise import denoise

    images = {}
    for offload in (False, True):
        backbone = get_backbone("flux-dev")(flux_dev.source, device="cuda",
                                            cpu_offload=offload).load()
        assert backbone.dtype == torch.bfloat16
        assert str(backbone.execution_device).startswith("cuda")
        images[offload] = denoise(backbone, "a cat", num_inference_steps=3, height=64,
                                  width=64, output_type="np").images
    np.testing.assert_array_equal(images[False], images[True])
    fp32 = get_backbone("flux-dev")(flux_dev.source, device="cuda", dtype="fp32").load()
    gpu = denoise(fp32, "a cat", num_inference_steps=3, height=64, width=64,
                  output_type="np").images
    cpu = denoise(flux_dev, "a cat", num_inference_steps=3, output_type="np").images
    assert np.abs(gpu - cpu).max() < 5e-3
