"""InfuseNet: the core adapter contract on both backbones, InfiniteYou's on-disk layout, the
resampler, options and errors, the control image, and the swap without reload."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from adapterswap_flux.face import NoFaceError
from adapterswap_flux.infusenet import InfuseNet, model_files
from adapterswap_flux.resampler import Resampler, ResamplerConfig
from flux_reference import resampler_forward

from adapterswap.denoise import StepContext, denoise
from adapterswap.errors import InvalidArgumentError, UnsafeWeightsError, WeightsNotFoundError
from adapterswap.plugins import get_adapter
from adapterswap.testing import AdapterContract

PROMPT = "a portrait photo of a person"


class TestInfuseNetContract(AdapterContract):
    adapter_name = "infusenet"
    backbone_names = ("flux-dev", "flux-schnell")

    # the session's tiny presets (built by the same tiny() methods the contract would call)
    @pytest.fixture(scope="class")
    def backbones(self, flux_dev, flux_schnell):
        return {"flux-dev": flux_dev, "flux-schnell": flux_schnell}

    @pytest.fixture()
    def adapter(self, flux_infusenet):
        return flux_infusenet


def _run(backbone, adapter=None, steps=2, seeds=(0,), **kwargs):
    reference = InfuseNet.tiny_reference(0) if adapter is not None else None
    return denoise(backbone, PROMPT, num_inference_steps=steps, seeds=list(seeds),
                   adapter=adapter, reference=reference, output_type="np", **kwargs).images


# -- layout and loading -------------------------------------------------------------------------
def test_tiny_weights_use_infiniteyous_layout(flux_infusenet):
    root = flux_infusenet.weights_root
    for version in ("aes_stage2", "sim_stage1"):
        model_dir = root / "infu_flux_v1.0" / version
        config = json.loads((model_dir / "InfuseNetModel" / "config.json").read_text())
        assert config["_class_name"] == "FluxControlNetModel"
        assert config["guidance_embeds"] is True
        assert (model_dir / "InfuseNetModel" / "diffusion_pytorch_model.safetensors").is_file()
        checkpoint = torch.load(model_dir / "image_proj_model.bin", weights_only=True)
        assert set(checkpoint) == {"image_proj"}
    assert (root / "supports" / "insightface" / "models" / "antelopev2"
            / "scrfd_10g_bnkps.onnx").is_file()
    assert (root / "supports" / "facexlib" / "recognition_arcface_ir_se50.pth").is_file()
    # loaded through the real loader from those files
    assert flux_infusenet.model_dir == root / "infu_flux_v1.0" / "aes_stage2"
    assert type(flux_infusenet.infusenet).__name__ == "FluxControlNetModel"
    assert flux_infusenet.resampler.config.output_dim == 48  # tiny joint_attention_dim


def test_model_version_selects_the_other_weights(flux_dev, flux_infusenet):
    other = InfuseNet(str(flux_infusenet.weights_root), model_version="sim_stage1",
                      device="cpu", dtype=torch.float32).load()
    assert other.model_dir.name == "sim_stage1"
    reference = InfuseNet.tiny_reference(0)
    flux_infusenet.attach(flux_dev)
    other.attach(flux_dev)
    a = flux_infusenet.encode_reference(reference, flux_dev)["id_embeds"]
    b = other.encode_reference(reference, flux_dev)["id_embeds"]
    assert a.shape == b.shape == (1, 8, 48) and not torch.allclose(a, b)
    other.detach()


def test_wrong_model_version_lists_the_allowed_ones():
    with pytest.raises(InvalidArgumentError) as info:
        InfuseNet(model_version="aes_stage3")
    message = str(info.value)
    assert "model_version='aes_stage3'" in message
    assert "aes_stage2" in message and "sim_stage1" in message
    with pytest.raises(InvalidArgumentError, match="infu_flux_version='v2.0'"):
        InfuseNet(infu_flux_version="v2.0")
    with pytest.raises(InvalidArgumentError, match="option='det_size'"):
        InfuseNet(det_size=640)


def test_missing_files_are_named(flux_infusenet, tmp_path):
    copy = tmp_path / "InfiniteYou"
    shutil.copytree(flux_infusenet.weights_root, copy)
    (copy / "infu_flux_v1.0" / "aes_stage2" / "image_proj_model.bin").unlink()
    with pytest.raises(WeightsNotFoundError) as info:
        InfuseNet(str(copy), device="cpu").load()
    message = str(info.value)
    assert "infu_flux_v1.0/aes_stage2/image_proj_model.bin" in message
    assert "ByteDance/InfiniteYou" in message and "CC-BY-NC-4.0" in message
    with pytest.raises(WeightsNotFoundError, match="no-such-dir"):
        InfuseNet(str(tmp_path / "no-such-dir"), device="cpu").load()


def test_model_version_directory_as_source(flux_infusenet):
    model_dir = flux_infusenet.weights_root / "infu_flux_v1.0" / "aes_stage2"
    adapter = InfuseNet(str(model_dir), device="cpu").load()
    assert adapter.weights_root == flux_infusenet.weights_root
    assert adapter.face.detector_path == flux_infusenet.face.detector_path
    sim = InfuseNet(str(model_dir.parent / "sim_stage1"), device="cpu").load()
    assert sim.model_version == "sim_stage1"
    with pytest.raises(InvalidArgumentError, match="model_version='aes_stage2'.*sim_stage1"):
        InfuseNet(str(model_dir.parent / "sim_stage1"), model_version="aes_stage2").locate()


def test_face_model_roots_are_configurable(flux_infusenet, tmp_path):
    root = flux_infusenet.weights_root
    faces = tmp_path / "faces"
    shutil.copytree(root / "supports" / "insightface", faces)
    adapter = InfuseNet(str(root), device="cpu", insightface_root=str(faces),
                        arcface_path=str(root / "supports" / "facexlib")).load()
    assert adapter.face.detector_path.is_relative_to(faces)
    # the face models load on first use (an image reference), not with InfuseNet
    missing = InfuseNet(str(root), device="cpu", insightface_root=str(tmp_path / "elsewhere"))
    missing.load()
    with pytest.raises(WeightsNotFoundError, match="elsewhere"):
        missing.face  # noqa: B018


def test_unsafe_image_proj_pickle_is_refused(flux_infusenet, tmp_path):
    import pickle

    copy = tmp_path / "InfiniteYou"
    shutil.copytree(flux_infusenet.weights_root, copy)
    path = copy / "infu_flux_v1.0" / "aes_stage2" / "image_proj_model.bin"

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path.write_bytes(pickle.dumps({"image_proj": Payload()}, protocol=2))
    with pytest.raises(UnsafeWeightsError, match="image_proj_model.bin"):
        InfuseNet(str(copy), device="cpu").load()


# -- resampler ----------------------------------------------------------------------------------
def test_resampler_has_infiniteyous_parameter_names_and_shapes():
    with torch.device("meta"):
        model = Resampler(ResamplerConfig.infiniteyou())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "latents": (1, 8, 1280), "proj_in.weight": (1280, 512), "proj_in.bias": (1280,),
        "proj_out.weight": (4096, 1280), "proj_out.bias": (4096,), "norm_out.weight": (4096,),
        "norm_out.bias": (4096,),
    }
    for i in range(4):
        expected.update({
            f"layers.{i}.0.norm1.weight": (1280,), f"layers.{i}.0.norm1.bias": (1280,),
            f"layers.{i}.0.norm2.weight": (1280,), f"layers.{i}.0.norm2.bias": (1280,),
            f"layers.{i}.0.to_q.weight": (1280, 1280), f"layers.{i}.0.to_kv.weight": (2560, 1280),
            f"layers.{i}.0.to_out.weight": (1280, 1280),
            f"layers.{i}.1.0.weight": (1280,), f"layers.{i}.1.0.bias": (1280,),
            f"layers.{i}.1.1.weight": (5120, 1280), f"layers.{i}.1.3.weight": (1280, 5120),
        })
    assert shapes == expected
    config = ResamplerConfig.from_state_dict(model.state_dict())
    assert config == ResamplerConfig(dim=1280, depth=4, dim_head=64, heads=20, num_queries=8,
                                     embedding_dim=512, output_dim=4096, ff_mult=4)


def test_resampler_matches_infiniteyous_forward():
    torch.manual_seed(0)
    model = Resampler(ResamplerConfig(dim=64, depth=2, heads=3, embedding_dim=40,
                                      output_dim=24, ff_mult=2)).eval()
    for parameter in model.parameters():  # non-trivial norms too
        parameter.data.normal_(0, 0.2)
    x = torch.randn(2, 1, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resampler_forward(model.state_dict(), x, heads=3))
    assert Resampler.from_state_dict(model.state_dict()).config == model.config


# -- reference and errors -----------------------------------------------------------------------
def test_no_face_in_reference_names_the_image(flux_dev, flux_infusenet, tmp_path):
    from PIL import Image

    path = tmp_path / "landscape.png"
    Image.new("RGB", (64, 48), (40, 90, 160)).save(path)
    flux_infusenet.attach(flux_dev)
    with pytest.raises(NoFaceError) as info:
        flux_infusenet.encode_reference(str(path), flux_dev)
    message = str(info.value)
    assert "landscape.png" in message and "640x640, 320x320, 160x160" in message
    with pytest.raises(NoFaceError, match="no face"):
        denoise(flux_dev, PROMPT, num_inference_steps=1, adapter=flux_infusenet,
                reference=str(path))


def test_id_tokens_depend_on_the_face(flux_dev, flux_infusenet):
    flux_infusenet.attach(flux_dev)
    a = flux_infusenet.encode_reference(InfuseNet.tiny_reference(0), flux_dev)["id_embeds"]
    b = flux_infusenet.encode_reference(InfuseNet.tiny_reference(5), flux_dev)["id_embeds"]
    assert a.shape == (1, 8, 48) and not torch.allclose(a, b, atol=1e-4)


# -- per-step behaviour -------------------------------------------------------------------------
def test_infusenet_inputs_are_per_sample(flux_dev, flux_infusenet):
    """A step-parallel pair (one sample inside the window, one outside) equals the two samples
    run alone: the inactive one gets exactly the no-adapter prediction."""
    adapter = flux_infusenet
    adapter.attach(flux_dev)
    adapter.set_window(0.0, 0.5)
    conditioning = adapter.encode_reference(InfuseNet.tiny_reference(0), flux_dev).repeat(2)
    prompt = flux_dev.encode_prompt([PROMPT, PROMPT], guidance_scale=3.5)
    latents = flux_dev.prepare_latents([torch.Generator().manual_seed(s) for s in (1, 2)],
                                       height=64, width=64)
    s2, s4 = flux_dev.schedule(2, height=64, width=64), flux_dev.schedule(4, height=64, width=64)
    ctx = StepContext(torch.stack([s2.timesteps[0], s4.timesteps[3]]), (0, 3), (2, 4), 64, 64)
    inputs = adapter.denoiser_inputs(flux_dev, conditioning, latents, ctx, prompt)
    joint = flux_dev.predict(latents, ctx, prompt, guidance_scale=3.5, adapter_inputs=inputs)

    def alone(row, index, num, t):
        c = StepContext(t.reshape(1), (index,), (num,), 64, 64)
        extra = adapter.denoiser_inputs(flux_dev, conditioning.select([row]), latents[row:row + 1],
                                        c, prompt.select([row]))
        return flux_dev.predict(latents[row:row + 1], c, prompt.select([row]), guidance_scale=3.5,
                                adapter_inputs=extra), extra

    first, first_inputs = alone(0, 0, 2, s2.timesteps[0])
    second, second_inputs = alone(1, 3, 4, s4.timesteps[3])
    assert first_inputs is not None and second_inputs is None  # step 3 of 4: outside [0, 0.5]
    torch.testing.assert_close(joint, torch.cat([first, second]), atol=1e-5, rtol=1e-4)


def test_scale_is_linear_in_the_residuals(flux_dev, flux_infusenet):
    adapter = flux_infusenet
    adapter.attach(flux_dev)
    conditioning = adapter.encode_reference(InfuseNet.tiny_reference(0), flux_dev)
    prompt = flux_dev.encode_prompt([PROMPT], guidance_scale=3.5)
    latents = flux_dev.prepare_latents([torch.Generator().manual_seed(0)], height=64, width=64)
    schedule = flux_dev.schedule(2, height=64, width=64)
    ctx = StepContext(schedule.timesteps[:1], (0,), (2,), 64, 64)
    full = adapter.denoiser_inputs(flux_dev, conditioning, latents, ctx, prompt)
    adapter.set_scale(0.25)
    quarter = adapter.denoiser_inputs(flux_dev, conditioning, latents, ctx, prompt)
    for a, b in zip(full.controlnet_block_samples, quarter.controlnet_block_samples):
        torch.testing.assert_close(a * 0.25, b)
    assert full.controlnet_blocks_repeat is False
    assert len(full.controlnet_single_block_samples) == 2  # tiny InfuseNet: 1 + 2 blocks


def test_control_image_keypoints_steer_the_result(flux_dev, flux_infusenet):
    from adapterswap_flux.tiny_face import tiny_face_keypoints

    adapter = flux_infusenet
    adapter.attach(flux_dev)
    blank = _run(flux_dev, adapter)
    blank_latents = adapter.control_latents(flux_dev, 64, 64).clone()
    adapter.set_control_image(InfuseNet.tiny_reference(1))
    canvas = np.asarray(adapter.control_canvas(128, 128))
    x, y = tiny_face_keypoints()[2] / 2  # 256 px reference fitted into 128 px: nose tip
    assert canvas[int(y), int(x)].tolist() == [0, 0, 255]
    with_pose = _run(flux_dev, adapter)
    assert not torch.equal(adapter.control_latents(flux_dev, 64, 64), blank_latents)
    assert not np.allclose(blank, with_pose, atol=1e-4)
    adapter.set_control_image(None)
    np.testing.assert_array_equal(_run(flux_dev, adapter), blank)


def test_control_image_without_a_face_is_named(flux_dev, flux_infusenet):
    from PIL import Image

    flux_infusenet.attach(flux_dev)
    flux_infusenet.set_control_image(Image.new("RGB", (64, 64), (30, 30, 200)))
    with pytest.raises(NoFaceError, match="control_image"):
        _run(flux_dev, flux_infusenet)


# -- the swap -----------------------------------------------------------------------------------
def test_swap_dev_to_schnell_without_reload(flux_dev, flux_schnell, monkeypatch):
    """One loaded object: attach to flux-dev, generate, detach, attach to flux-schnell,
    generate, with load_weights called exactly once and both backbones restored on detach."""
    calls = []
    original = InfuseNet.load_weights

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(InfuseNet, "load_weights", counting)
    adapter = get_adapter("infusenet").tiny(flux_dev, 0)
    assert calls == [1]
    infusenet_module = adapter.infusenet

    dev_plain = _run(flux_dev)
    adapter.attach(flux_dev)
    dev_id = _run(flux_dev, adapter, steps=3)
    adapter.detach()
    np.testing.assert_array_equal(_run(flux_dev), dev_plain)

    schnell_plain = _run(flux_schnell)
    adapter.attach(flux_schnell)
    assert adapter.attached_to is flux_schnell
    schnell_id = _run(flux_schnell, adapter)
    adapter.detach()
    np.testing.assert_array_equal(_run(flux_schnell), schnell_plain)

    assert calls == [1] and adapter.infusenet is infusenet_module
    assert not np.allclose(dev_id, _run(flux_dev, steps=3), atol=1e-4)
    assert not np.allclose(schnell_id, schnell_plain, atol=1e-4)


def test_default_source_and_required_files():
    assert InfuseNet.default_source == "ByteDance/InfiniteYou"
    assert InfuseNet.kind == "identity" and InfuseNet.families == frozenset({"flux"})
    assert model_files("v1.0", "sim_stage1")[-1] == "infu_flux_v1.0/sim_stage1/image_proj_model.bin"


def test_loads_from_the_hf_cache_offline(flux_infusenet, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "models--ByteDance--InfiniteYou"
    shutil.copytree(flux_infusenet.weights_root, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    adapter = InfuseNet(device="cpu", dtype="fp32").load()  # default source ByteDance/InfiniteYou
    assert adapter.source == "ByteDance/InfiniteYou"
    assert adapter.weights_root == repo / "snapshots" / "0123abcd"
    assert adapter.face.detector_path.is_relative_to(adapter.weights_root)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        InfuseNet(device="cpu").load()


def test_id_tokens_of_another_width_than_t5_attach_and_act(flux_dev, tmp_path):
    """InfuseNet attends to ID tokens, not to T5 text: an InfuseNet whose ID-token width
    (its joint_attention_dim, the projection's output) differs from the T5 width still feeds
    the transformer, because what must match is the residual width and the latents."""
    from adapterswap_flux.infusenet import save_tiny_infiniteyou

    t5_width = flux_dev.pipe.transformer.config.joint_attention_dim
    root = save_tiny_infiniteyou(tmp_path / "iy", flux_dev.pipe.transformer.config, seed=3,
                                 id_token_dim=t5_width - 8)
    adapter = InfuseNet(str(root), device="cpu", dtype="fp32").load()
    assert adapter.infusenet.config.joint_attention_dim == t5_width - 8
    try:
        plain = _run(flux_dev)
        with_adapter = _run(flux_dev, adapter)
    finally:
        adapter.detach()
    assert not np.allclose(plain, with_adapter, atol=1e-4)


def test_fit_check_names_what_does_not_match():
    from adapterswap_flux.infusenet import fits_transformer

    transformer = {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
                   "pooled_projection_dim": 32, "joint_attention_dim": 48}

    class Config(dict):
        __getattr__ = dict.__getitem__

    fits = Config(transformer, joint_attention_dim=40)  # another ID-token width: fine
    assert fits_transformer(fits, Config(transformer)) == []
    narrow = Config(transformer, attention_head_dim=8)
    assert "residual width 16" in fits_transformer(narrow, Config(transformer))[0]
    other_latents = Config(transformer, in_channels=64)
    assert fits_transformer(other_latents, Config(transformer)) == [
        "in_channels=64 against the transformer's 16"]


def test_blank_control_pixels_equal_diffusers_preprocessing_of_the_black_canvas(flux_dev):
    from adapterswap_flux.face import blank_canvas
    from adapterswap_flux.infusenet import blank_pixels

    for height, width in ((64, 64), (48, 80)):
        expected = flux_dev.pipe.image_processor.preprocess(
            blank_canvas((width, height)), height=height, width=width)
        made = blank_pixels(height, width, "cpu", expected.dtype)
        assert made.shape == expected.shape and torch.equal(made, expected)
