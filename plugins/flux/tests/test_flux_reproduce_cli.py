"""``reproduce="infiniteyou"`` from the command line, the way an InfiniteYou user runs it: the
backbone and InfiniteYou's weights from local folders in their published layouts, the identity
as a 512-d embedding file, and InfiniteYou's own handling of sizes and defaults.

- ``adapterswap generate --backbone flux-dev --source DIR/flux-dev --adapter infusenet
  --adapter-source DIR/InfiniteYou --ref id.npy --adapter-option reproduce=infiniteyou --seed 42
  --steps 4 --height 64 --width 64 --prompt "a portrait of a man" --out x.png`` writes, byte for
  byte, the image ``flux_reference.infiniteyou_generate`` gives with InfiniteYou's global
  seeding for that embedding (the reference runs diffusers' FLUX ControlNet pieces and a
  functional resampler on the same files; nothing of the plugin's denoising), on flux-dev and
  flux-schnell; no face model is loaded for an embedding.
- Sizes that are not multiples of 16 are rounded down with a note, and give the reference's
  image for the size as requested (diffusers rounds it there); without the option they are
  refused. Where no size or step count is given, InfiniteYou's (864 x 1152; 30 steps on
  flux-dev) are used, noted; in a sweep 30 joins flux-dev's default grid.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from adapterswap_flux.infusenet import save_tiny_infiniteyou
from click.testing import CliRunner
from flux_reference import infiniteyou_generate, pipeline_components, resampler_forward
from PIL import Image

from adapterswap.cli import main

PROMPT = "a portrait of a man"
MODEL_DIR = ("infu_flux_v1.0", "aes_stage2")


@pytest.fixture(scope="module")
def published(tmp_path_factory, flux_dev, flux_schnell):
    """``DIR/flux-dev``, ``DIR/flux-schnell`` (the tiny pipelines in diffusers' layout),
    ``DIR/InfiniteYou`` (tiny weights in InfiniteYou's layout, 512-d embeddings as the real
    IR-SE50's, without the face models of ``supports/``) and ``DIR/id.npy``, a 512-d
    embedding."""
    root = tmp_path_factory.mktemp("published")
    for backbone in (flux_dev, flux_schnell):
        shutil.copytree(backbone.source, root / backbone.name)
    save_tiny_infiniteyou(root / "InfiniteYou", flux_dev.pipe.transformer.config, seed=5)
    shutil.rmtree(root / "InfiniteYou" / "supports")  # no face models: embeddings need none
    vector = np.random.default_rng(7).standard_normal(512).astype(np.float32)
    np.save(root / "id.npy", vector)
    return root


def _reference(root, name, *, seed, steps, height, width):
    """InfiniteYou's image for the embedding in ``root / "id.npy"`` (global seeding)."""
    from diffusers import FluxControlNetModel, FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(root / name), torch_dtype=torch.float32)
    components = pipeline_components(pipe)
    model_dir = root.joinpath("InfiniteYou", *MODEL_DIR)
    infusenet = FluxControlNetModel.from_pretrained(str(model_dir / "InfuseNetModel"),
                                                    torch_dtype=torch.float32)
    state = torch.load(model_dir / "image_proj_model.bin", weights_only=True)["image_proj"]
    embedding = torch.from_numpy(np.load(root / "id.npy")).reshape(1, -1, 512)
    with torch.no_grad():  # the tiny resampler has 2 heads (save_tiny_infiniteyou)
        id_embed = resampler_forward(state, embedding, heads=2)
    images = infiniteyou_generate(
        components, infusenet, id_embed, prompt=PROMPT, seed=seed, num_steps=steps,
        height=height, width=width, guidance_scale=3.5, max_sequence_length=512,
        seeding="global")
    return (images[0] * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil


def _generate(root, name, out, *extra):
    args = ["generate", "--backbone", name, "--source", str(root / name),
            "--adapter", "infusenet", "--adapter-source", str(root / "InfiniteYou"),
            "--ref", str(root / "id.npy"), "--adapter-option", "reproduce=infiniteyou",
            "--seed", "42", "--prompt", PROMPT, "--out", str(out), *extra]
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_generate_from_an_embedding_gives_infiniteyous_image(name, published, tmp_path,
                                                             monkeypatch):
    from adapterswap_flux import infusenet as module

    def no_face_models(self):
        raise AssertionError("an embedding reference must not load face models")

    monkeypatch.setattr(module.InfuseNet, "_load_face", no_face_models)
    out = tmp_path / "x.png"
    result = _generate(published, name, out, "--steps", "4", "--height", "64", "--width", "64")
    assert result.exit_code == 0, result.output
    expected = _reference(published, name, seed=42, steps=4, height=64, width=64)
    assert np.array_equal(np.asarray(Image.open(out)), expected)


def test_sizes_are_rounded_down_as_infiniteyou_rounds_them(published, tmp_path):
    out = tmp_path / "x.png"
    result = _generate(published, "flux-schnell", out, "--steps", "2", "--height", "72",
                       "--width", "88")
    assert result.exit_code == 0, result.output
    assert "--height 72 rounded down to 64" in result.output
    assert "--width 88 rounded down to 80" in result.output
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 80, 3)
    # InfiniteYou asked for 72 x 88: diffusers rounds the control image and the latents down
    expected = _reference(published, "flux-schnell", seed=42, steps=2, height=72, width=88)
    assert np.array_equal(image, expected)

    # without the option such a size is refused, naming it, before anything loads
    plain = CliRunner().invoke(main, [
        "generate", "--backbone", "flux-schnell", "--source", str(published / "flux-schnell"),
        "--adapter", "none", "--prompt", PROMPT, "--height", "72", "--out",
        str(tmp_path / "y.png")])
    assert plain.exit_code == 2 and "--height" in plain.output and "72" in plain.output


def test_generate_takes_infiniteyous_defaults_where_none_are_given(published, tmp_path,
                                                                   monkeypatch):
    import adapterswap.denoise

    seen = {}

    def capture(backbone, prompt, **kwargs):
        seen.update(kwargs, backbone=backbone.name)
        raise KeyboardInterrupt  # stop before 30 steps at 864 x 1152

    monkeypatch.setattr(adapterswap.denoise, "denoise", capture)
    result = _generate(published, "flux-dev", tmp_path / "x.png")
    assert result.exit_code == 130, result.output  # the CLI's exit code for an interrupt
    assert (seen["height"], seen["width"], seen["num_inference_steps"]) == (1152, 864, 30)
    assert "--height 1152 and --width 864 by default" in result.output
    assert "--steps 30 by default on flux-dev" in result.output
    seen.clear()
    result = _generate(published, "flux-schnell", tmp_path / "x.png")
    assert (seen["height"], seen["width"], seen["num_inference_steps"]) == (1152, 864, None)
    seen.clear()
    result = _generate(published, "flux-dev", tmp_path / "x.png", "--steps", "3",
                       "--height", "512", "--width", "256")  # given: kept
    assert (seen["height"], seen["width"], seen["num_inference_steps"]) == (512, 256, 3)
    assert "by default" not in result.output


def test_sweep_specs_take_the_defaults_and_round(tmp_path):
    from adapterswap.plugins import get_backbone
    from adapterswap.sweep.spec import SweepSpec

    dev, schnell = get_backbone("flux-dev"), get_backbone("flux-schnell")
    reproduce = {"reproduce": "infiniteyou"}
    spec = SweepSpec(backbones=["flux-dev", "flux-schnell"], adapter_options=reproduce,
                     out=str(tmp_path)).validate()
    assert spec.size(dev) == spec.size(schnell) == (1152, 864)
    assert 30 in spec.step_grid(dev) and set(dev.default_step_grid()) < set(spec.step_grid(dev))
    assert spec.step_grid(schnell) == schnell.default_step_grid()
    assert any("steps 30 added to the default step grid" in n for n in spec.defaults_used)
    only = SweepSpec(backbones=["flux-dev"], adapter_options=reproduce, only_default_steps=True,
                     out=str(tmp_path)).validate()
    assert only.step_grid(dev) == [30]

    rounded = SweepSpec(backbones=["flux-dev"], adapter_options=reproduce, height=72,
                        width=100, steps=[2], out=str(tmp_path)).validate()
    assert (rounded.height, rounded.width) == (64, 96)
    assert rounded.step_grid(dev) == [2]
    assert {c.height for c in rounded.cells()} == {64}
    assert any("height 72 rounded down to 64" in n for n in rounded.defaults_used)

    tiny = SweepSpec(backbones=["flux-dev"], preset="tiny", adapter_options=reproduce,
                     out=str(tmp_path)).validate()
    assert tiny.size(dev) == tuple(dev.tiny_size)  # the tiny preset keeps its size
    plain = SweepSpec(backbones=["flux-dev"], out=str(tmp_path)).validate()
    assert plain.size(dev) == (dev.default_height, dev.default_width)
    assert 30 not in plain.step_grid(dev)


def test_a_tiny_sweep_takes_an_embedding_reference(published, tmp_path):
    """The embedding file is a reference of the sweep like an image: its cells run and name
    the file as their reference."""
    from adapterswap.sweep.store import RunStore

    result = CliRunner().invoke(main, [
        "sweep", "--backbone", "flux-schnell", "--preset", "tiny", "--steps", "1",
        "--seeds", "0", "--ref", str(published / "id.npy"), "--metrics", "sharpness",
        "--timing-repeats", "0", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    with RunStore(tmp_path / "run", lock=False) as store:
        rows = store.rows()
    assert rows and all(r["reference"] == str(published / "id.npy") for r in rows)


def test_an_image_reference_without_face_models_fails_before_flux_loads(published, tmp_path,
                                                                        monkeypatch):
    from adapterswap.backbone import Backbone

    def no_loading(self, *args, **kwargs):
        raise AssertionError("the backbone must not load")

    monkeypatch.setattr(Backbone, "load", no_loading)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.insightface of the developer's
    face = tmp_path / "face.png"
    Image.new("RGB", (64, 64)).save(face)
    for command in (
        ["generate", "--backbone", "flux-schnell", "--source", str(published / "flux-schnell"),
         "--out", str(tmp_path / "x.png"), "--prompt", PROMPT],
        ["sweep", "--backbone", "flux-schnell", "--source",
         f"flux-schnell={published / 'flux-schnell'}",
         "--steps", "1", "--seeds", "0", "--prompt", PROMPT, "--out", str(tmp_path / "run")],
    ):
        result = CliRunner().invoke(main, [
            *command, "--adapter", "infusenet", "--adapter-source",
            str(published / "InfiniteYou"), "--ref", str(face)])
        assert result.exit_code != 0 and "antelopev2" in result.output, result.output
        assert "must not load" not in result.output
    assert not (tmp_path / "run").exists()  # refused before the store was created
