"""flux-dev-turbo and flux-dev-hyper: FLUX.1-dev with a step-distillation LoRA fused in.

The contract, parity with each model card's diffusers recipe on tiny weights (FluxPipeline +
load_lora_weights + fuse_lora + the card's call arguments), the tiny LoRA files' layout, the
fuse itself, the LoRA options and their errors, 8-bit loading, and InfuseNet on both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from adapterswap.denoise import denoise
from adapterswap.errors import InvalidArgumentError, WeightsNotFoundError
from adapterswap.plugins import get_backbone
from adapterswap.testing import BackboneContract

PROMPT = "a portrait photo of a person"
#: As test_flux_parity: the same fp32 CPU arithmetic on both sides, up to kernel reordering.
ATOL = 1e-5
NAMES = ("flux-dev-turbo", "flux-dev-hyper")


@pytest.fixture(scope="module")
def flux_turbo():
    """The tiny flux-dev-turbo backbone (shared in this module; tests must not change it)."""
    return get_backbone("flux-dev-turbo").tiny(0)


@pytest.fixture(scope="module")
def flux_hyper():
    """The tiny flux-dev-hyper backbone (shared in this module)."""
    return get_backbone("flux-dev-hyper").tiny(0)


@pytest.fixture()
def distilled(request, flux_turbo, flux_hyper):
    """The tiny backbone named by the test's ``name`` parameter."""
    return {"flux-dev-turbo": flux_turbo, "flux-dev-hyper": flux_hyper}[request.param]


class TestFluxDevTurboContract(BackboneContract):
    backbone_name = "flux-dev-turbo"

    @pytest.fixture(scope="class")
    def backbone(self, flux_turbo):
        return flux_turbo


class TestFluxDevHyperContract(BackboneContract):
    backbone_name = "flux-dev-hyper"

    @pytest.fixture(scope="class")
    def backbone(self, flux_hyper):
        return flux_hyper


def _lora_file(backbone) -> Path:
    return Path(backbone.options["lora"]) / backbone.lora_filename()


# -- declaration ----------------------------------------------------------------------------------
def test_declared_like_the_model_cards():
    turbo, hyper = get_backbone("flux-dev-turbo"), get_backbone("flux-dev-hyper")
    for cls in (turbo, hyper):
        assert (cls.default_source, cls.default_steps, cls.guidance_mode,
                cls.default_guidance_scale) == ("black-forest-labs/FLUX.1-dev", 8, "embedded",
                                                3.5)
        assert cls.max_sequence_length == 512 and cls.expects_guidance_embeds
        assert cls.family == "flux" and cls.default_adapter == "infusenet"
        assert cls.default_step_grid() == [1, 2, 4, 8]
        assert {"lora", "lora_file", "lora_scale", "cpu_offload", "quantize_8bit"} \
            <= set(cls.option_docs)
        assert "FLUX.1 [dev] Non-Commercial License" in cls.how_to_get
        assert "hf download black-forest-labs/FLUX.1-dev" in cls.how_to_get
    assert (turbo.lora_repo, turbo.lora_file, turbo.lora_scale) == (
        "alimama-creative/FLUX.1-Turbo-Alpha", "diffusion_pytorch_model.safetensors", 1.0)
    assert (hyper.lora_repo, hyper.lora_file, hyper.lora_scale) == (
        "ByteDance/Hyper-SD", "Hyper-FLUX.1-dev-8steps-lora.safetensors", 0.125)
    assert "lora_steps" in hyper.option_docs and "lora_steps" not in turbo.option_docs


def test_listed_by_the_cli():
    from click.testing import CliRunner

    from adapterswap.cli import main

    result = CliRunner().invoke(main, ["list", "backbones", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    for name in NAMES:
        assert rows[name]["guidance_mode"] == "embedded" and rows[name]["default_steps"] == 8


# -- the tiny LoRA files --------------------------------------------------------------------------
@pytest.mark.parametrize("distilled, dtype", [("flux-dev-turbo", torch.bfloat16),
                                              ("flux-dev-hyper", torch.float32)],
                         indirect=["distilled"])
def test_tiny_lora_has_the_published_layout(distilled, dtype, flux_dev):
    """diffusers PEFT keys ``transformer.<module>.lora_A/B.weight``, no alpha, on every linear
    layer (embedders, block projections and modulations, norm_out, proj_out), in the
    published file's dtype; the base is flux-dev's own tiny directory."""
    assert distilled.source == flux_dev.source
    linears = {name for name, module in flux_dev.pipe.transformer.named_modules()
               if isinstance(module, torch.nn.Linear)}
    with safe_open(str(_lora_file(distilled)), framework="pt") as lora:
        keys = set(lora.keys())
        dtypes = {lora.get_tensor(key).dtype for key in keys}
    assert keys == {f"transformer.{name}.lora_{ab}.weight" for name in linears for ab in "AB"}
    for module in ("x_embedder", "context_embedder", "norm_out.linear", "proj_out",
                   "time_text_embed.guidance_embedder.linear_1",
                   "transformer_blocks.0.norm1_context.linear",
                   "single_transformer_blocks.0.proj_mlp"):
        assert module in linears
    assert dtypes == {dtype}


# -- the fuse -------------------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", NAMES, indirect=True)
def test_fused_weights_are_base_plus_scaled_lora(distilled, flux_dev):
    """Every adapted layer is a plain Linear holding W + lora_scale * B @ A (no alpha: the
    PEFT scaling is 1), so nothing LoRA-specific is left in the forward."""
    ours = dict(distilled.pipe.transformer.named_modules())
    base = dict(flux_dev.pipe.transformer.named_modules())
    assert not any("lora" in name for name in ours)
    with safe_open(str(_lora_file(distilled)), framework="pt") as lora:
        for name in ("x_embedder", "transformer_blocks.0.attn.to_q",
                     "single_transformer_blocks.3.proj_out", "norm_out.linear"):
            down = lora.get_tensor(f"transformer.{name}.lora_A.weight").float()
            up = lora.get_tensor(f"transformer.{name}.lora_B.weight").float()
            assert type(ours[name]) is torch.nn.Linear
            expected = base[name].weight + distilled.lora_scale * (up @ down)
            torch.testing.assert_close(ours[name].weight, expected, atol=1e-6, rtol=1e-5)


def _card_recipe(backbone, *, lora_scale, steps, seed, height, width):
    """The model card's diffusers code on the tiny files: FluxPipeline from the base
    directory, load_lora_weights, fuse_lora, then the card's call (guidance 3.5, 8 steps, T5
    at 512 tokens; Turbo's card passes max_sequence_length=512, Hyper's leaves the default,
    512), at the tiny size."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(backbone.source, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(_lora_file(backbone)))
    if lora_scale is None:
        pipe.fuse_lora()  # Turbo-Alpha's card
    else:
        pipe.fuse_lora(lora_scale=lora_scale)  # Hyper-SD's card: 0.125
    return pipe(prompt=PROMPT, guidance_scale=3.5, height=height, width=width,
                num_inference_steps=steps, max_sequence_length=512, output_type="np",
                generator=torch.Generator("cpu").manual_seed(seed)).images


@pytest.mark.parametrize("distilled, lora_scale, size", [
    ("flux-dev-turbo", None, (64, 64)),
    ("flux-dev-turbo", None, (64, 96)),
    ("flux-dev-hyper", 0.125, (64, 64)),
    ("flux-dev-hyper", 0.125, (96, 64)),
], indirect=["distilled"])
def test_denoise_equals_the_model_card_recipe(distilled, lora_scale, size, flux_dev):
    height, width = size
    ours = denoise(distilled, PROMPT, seeds=[7], height=height, width=width,
                   output_type="np").images  # default steps (8) and guidance (3.5)
    theirs = _card_recipe(distilled, lora_scale=lora_scale, steps=8, seed=7, height=height,
                          width=width)
    assert ours.shape == (1, height, width, 3)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    # and the LoRA does act: flux-dev's image at the same settings differs
    plain = denoise(flux_dev, PROMPT, num_inference_steps=8, seeds=[7], height=height,
                    width=width, output_type="np").images
    assert not np.allclose(ours, plain, atol=1e-3)


def test_lora_none_or_scale_zero_is_flux_dev(flux_dev, flux_turbo):
    """``lora=None`` (the source has it fused) loads the source as it is; ``lora_scale=0``
    fuses nothing: both give flux-dev's image."""
    cls = get_backbone("flux-dev-turbo")
    expected = denoise(flux_dev, PROMPT, num_inference_steps=2, seeds=[1], output_type="np")
    for options in ({"lora": None}, {"lora": flux_turbo.options["lora"], "lora_scale": 0.0}):
        backbone = cls(flux_turbo.source, device="cpu", dtype="fp32", **options).load()
        backbone.default_height, backbone.default_width = cls.tiny_size
        got = denoise(backbone, PROMPT, num_inference_steps=2, seeds=[1], output_type="np")
        np.testing.assert_allclose(got.images, expected.images, atol=ATOL, rtol=0)


def test_lora_given_as_the_file_itself(flux_hyper):
    """The ``.safetensors`` path works as the ``lora`` option and fuses the same weights."""
    backbone = get_backbone("flux-dev-hyper")(flux_hyper.source, device="cpu", dtype="fp32",
                                              lora=str(_lora_file(flux_hyper))).load()
    torch.testing.assert_close(backbone.pipe.transformer.proj_out.weight,
                               flux_hyper.pipe.transformer.proj_out.weight, atol=0, rtol=0)


def test_hyper_lora_steps_picks_the_16_step_file(flux_hyper):
    cls = get_backbone("flux-dev-hyper")
    backbone = cls(flux_hyper.source, device="cpu", dtype="fp32", lora_steps=16,
                   lora=flux_hyper.options["lora"]).load()
    assert backbone.lora_filename() == "Hyper-FLUX.1-dev-16steps-lora.safetensors"
    assert backbone.default_steps == 16 and cls.default_steps == 8
    assert not torch.equal(backbone.pipe.transformer.proj_out.weight,
                           flux_hyper.pipe.transformer.proj_out.weight)
    by_name = cls(flux_hyper.source, device="cpu", dtype="fp32",
                  lora_file="Hyper-FLUX.1-dev-16steps-lora.safetensors",
                  lora=flux_hyper.options["lora"]).load()
    assert torch.equal(by_name.pipe.transformer.proj_out.weight,
                       backbone.pipe.transformer.proj_out.weight)
    assert by_name.default_steps == 16  # the file's own step count, however it is named
    with pytest.raises(InvalidArgumentError, match="not both"):  # checked before loading
        cls.check_options({"lora_steps": 16, "lora_file": "x.safetensors"})


# -- options and errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, match", [
    ("flux-dev-turbo", {"lora": 3}, r"invalid lora=3: must be a path"),
    ("flux-dev-turbo", {"lora_file": 5}, r"invalid lora_file=5: must be a file name"),
    ("flux-dev-turbo", {"lora_scale": "high"}, r"invalid lora_scale='high': must be a finite"),
    ("flux-dev-hyper", {"lora_scale": float("nan")}, r"invalid lora_scale=nan"),
    ("flux-dev-hyper", {"lora_steps": 4}, r"invalid lora_steps=4: choose one of 8, 16"),
    ("flux-dev-hyper", {"lora_steps": True}, r"invalid lora_steps=True"),
    ("flux-dev-hyper", {"lora_steps": 16, "lora_file": "x.safetensors"},
     r"invalid lora_steps=16: give lora_steps or lora_file='x.safetensors', not both"),
    ("flux-dev-turbo", {"lora_steps": 8}, r"unknown option 'lora_steps'"),
    ("flux-dev-turbo", {"max_sequence_length": 1024}, r"max_sequence_length=1024"),
])
def test_bad_options_are_named_in_one_line(name, options, match):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        get_backbone(name)(**options)
    assert "\n" not in str(info.value)


def test_missing_lora_file_is_named_before_the_base_loads(flux_turbo, tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        get_backbone("flux-dev-turbo")(flux_turbo.source, device="cpu",
                                       lora=str(tmp_path)).load()
    message = str(info.value)
    assert str(tmp_path) in message and "diffusion_pytorch_model.safetensors" in message
    assert "hf download alimama-creative/FLUX.1-Turbo-Alpha" in message


def test_default_lora_offline_cache_miss_is_named(flux_hyper, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=r"'ByteDance/Hyper-SD'.*HF_HUB_OFFLINE"):
        get_backbone("flux-dev-hyper")(flux_hyper.source, device="cpu").load()


def test_a_lora_diffusers_cannot_load_is_named(flux_turbo, tmp_path):
    from safetensors.torch import save_file

    sd15 = tmp_path / "lcm.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
               torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)},
              str(sd15))
    with pytest.raises(WeightsNotFoundError, match=r"lcm.safetensors.*not a FLUX.1-dev LoRA"):
        get_backbone("flux-dev-turbo")(flux_turbo.source, device="cpu", lora=str(sd15)).load()
    # keys in diffusers' format that name no layer of the pipeline: diffusers only warns
    foreign = tmp_path / "foreign.safetensors"
    save_file({"unet.down.0.lora_A.weight": torch.zeros(4, 8),
               "unet.down.0.lora_B.weight": torch.zeros(8, 4)}, str(foreign))
    with pytest.raises(WeightsNotFoundError, match=r"foreign.safetensors.*none of its keys"):
        get_backbone("flux-dev-turbo")(flux_turbo.source, device="cpu",
                                       lora=str(foreign)).load()


# -- 8-bit weights --------------------------------------------------------------------------------
def test_quantize_8bit_fuses_before_quantizing(flux_turbo):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    backbone = get_backbone("flux-dev-turbo")(flux_turbo.source, device="cpu", dtype="fp32",
                                              quantize_8bit=True,
                                              lora=flux_turbo.options["lora"]).load()
    backbone.default_height = backbone.default_width = 64
    linears = [m for m in backbone.pipe.transformer.modules() if isinstance(m, QLinear)]
    assert linears and all(m.weight.qtype.bits == 8 for m in linears)
    quantized = denoise(backbone, PROMPT, num_inference_steps=2, output_type="np").images
    full = denoise(flux_turbo, PROMPT, num_inference_steps=2, output_type="np").images
    assert np.isfinite(quantized).all()
    assert np.abs(quantized - full).mean() < 0.05  # 8-bit weights: close, not equal


# -- InfuseNet ------------------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", NAMES, indirect=True)
def test_infusenet_attaches_as_to_flux_dev(distilled, flux_infusenet):
    """Same transformer shapes as flux-dev: InfuseNet feeds its residuals and changes the
    image; detaching leaves the plain backbone."""
    reference = flux_infusenet.tiny_reference(0)
    plain = denoise(distilled, PROMPT, num_inference_steps=2, seeds=[3], output_type="np")
    with_id = denoise(distilled, PROMPT, num_inference_steps=2, seeds=[3],
                      adapter=flux_infusenet, reference=reference, output_type="np")
    assert with_id.images.shape == (1, 64, 64, 3) and np.isfinite(with_id.images).all()
    assert not np.allclose(with_id.images, plain.images, atol=1e-3)
    flux_infusenet.detach()
    again = denoise(distilled, PROMPT, num_inference_steps=2, seeds=[3], output_type="np")
    np.testing.assert_array_equal(again.images, plain.images)


# -- provenance ----------------------------------------------------------------------------------
def test_provenance_identifies_the_lora_file(flux_turbo, tmp_path):
    """A cell records the LoRA's identity beside the base weights': another LoRA file at the
    same path is another cell."""
    import shutil

    from adapterswap.sweep.provenance import resolve_provenance
    from adapterswap.sweep.spec import SweepSpec

    lora = tmp_path / "turbo.safetensors"
    shutil.copy(Path(flux_turbo.options["lora"]) / "diffusion_pytorch_model.safetensors", lora)

    def identity():
        spec = SweepSpec(backbones=["flux-dev-turbo"], adapter="none",
                         sources={"flux-dev-turbo": flux_turbo.source},
                         backbone_options={"lora": str(lora)}, out=str(tmp_path / "run"))
        return resolve_provenance(spec.validate()).weights["backbone:flux-dev-turbo"]

    first = identity()
    base, _, extra = first.partition(" + lora:local:")
    assert base.startswith("local:") and extra
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora))
    name = next(iter(state))
    state[name] = state[name] + 1
    save_file(state, str(lora))
    second = identity()
    assert second.startswith(base + " + lora:local:") and second != first
