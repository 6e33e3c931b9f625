"""Tests for the tiny presets: :mod:`adapterswap.kit.tiny` (the shared recipe) and each
built-in plugin's ``tiny`` module (``adapterswap_flux.tiny``, ``adapterswap_sdxl.tiny``,
``adapterswap_sd15.tiny``): tiny real-class components that run offline on a CPU.

Each family's pipeline is built once per module (``reference``) and the other tests compare against
that output: the same seed must give the same image, and a saved-and-reloaded pipeline must give
it too, up to float32 rounding (``RELOAD_ATOL``). diffusers and transformers are imported inside
the tests so that ``HF_HUB_OFFLINE`` below is set before ``huggingface_hub`` reads it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from adapterswap.kit import tiny

# Nothing here may reach the network; should anything try, fail instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"

PROMPT = "a photo of a woman wearing a red hat, oil painting"

#: The plugin module that builds each family's tiny pipeline.
FAMILY_MODULES = {
    "flux-dev": "adapterswap_flux.tiny",
    "flux-schnell": "adapterswap_flux.tiny",
    "sdxl": "adapterswap_sdxl.tiny",
    "sd15": "adapterswap_sd15.tiny",
}
FAMILIES = tuple(FAMILY_MODULES)

PIPELINE_CLASS_NAMES = {
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd15": "StableDiffusionPipeline",
}

# Guidance as each model is normally run: FLUX.1-dev's distilled guidance, no guidance for
# schnell, classifier-free guidance (a batch of 2 through the UNet) for SDXL and SD 1.5.
GUIDANCE_SCALE = {"flux-dev": 3.5, "flux-schnell": 0.0, "sdxl": 5.0, "sd15": 7.5}

# Reloaded weights are the same values in other memory (as diffusers loads safetensors), and the
# CPU GEMM kernels may take other code paths for them (cloning the reloaded FLUX transformer's
# parameters made its image bit-equal again): pixels in [0, 1] may move by about ten float32
# ulps (at most 1.6e-6 measured across thread counts and CPU ISAs; this allows 6x that).
RELOAD_ATOL = 1e-5


def pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASS_NAMES[family])


def recipes(family: str):
    """The plugin's tiny module for ``family`` (skips when the plugin is not installed)."""
    return pytest.importorskip(FAMILY_MODULES[family])


def flux_tiny():
    return pytest.importorskip("adapterswap_flux.tiny")


def tiny_size(family: str) -> tuple[int, int]:
    """The tiny ``(height, width)`` the family's backbone class declares."""
    from adapterswap.plugins import backbones, get_backbone

    if family not in backbones():
        pytest.skip(f"backbone {family!r} is not installed")
    return tuple(get_backbone(family).tiny_size)


def run_pipeline(pipe, family: str, **kwargs) -> np.ndarray:
    """Two steps at the family's tiny size with a fixed generator; images as a numpy array."""
    height, width = tiny_size(family)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        height=height,
        width=width,
        num_inference_steps=2,
        guidance_scale=GUIDANCE_SCALE[family],
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).images


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request) -> tuple[str, np.ndarray]:
    """(family, images) from the family's pipeline built from seed-0 components."""
    family = request.param
    pipe = pipeline_class(family)(**recipes(family).tiny_components(family, seed=0))
    return family, run_pipeline(pipe, family)


# --------------------------------------------------------------------------------------------------
# Whole pipelines
# --------------------------------------------------------------------------------------------------


def test_pipeline_runs_at_tiny_size(reference):
    family, images = reference
    height, width = tiny_size(family)
    assert images.shape == (1, height, width, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.01, "a constant image means the pipeline did not really run"


def test_same_seed_gives_the_same_images(reference):
    family, images = reference
    rebuilt = pipeline_class(family)(**recipes(family).tiny_components(family, seed=0))
    np.testing.assert_array_equal(run_pipeline(rebuilt, family), images)


def test_other_seed_gives_other_weights(reference):
    family, images = reference
    other = pipeline_class(family)(**recipes(family).tiny_components(family, seed=1))
    assert not np.allclose(run_pipeline(other, family), images)


def test_save_and_reload_gives_the_same_images(reference, tmp_path):
    family, images = reference
    saved = recipes(family).save_tiny_pipeline(family, tmp_path / family, seed=0)

    assert saved == tmp_path / family
    model_index = json.loads((saved / "model_index.json").read_text())
    assert model_index["_class_name"] == PIPELINE_CLASS_NAMES[family]
    for folder in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert (saved / folder).is_dir(), folder
    assert list(saved.glob("*/*.safetensors")), "weights should be saved as safetensors"

    reloaded = tiny.reload_pipeline(pipeline_class(family), saved)
    assert type(reloaded) is pipeline_class(family)
    np.testing.assert_allclose(run_pipeline(reloaded, family), images, rtol=0,
                               atol=RELOAD_ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_tiny_pipeline_uses_the_real_class(family):
    module = recipes(family)
    pipe = module.build_tiny_pipeline(family)
    assert type(pipe) is pipeline_class(family) is module.tiny_pipeline_class(family)
    assert family in module.TINY_FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_models_are_float32_and_in_eval_mode(family):
    models = [
        value
        for value in recipes(family).tiny_components(family).values()
        if isinstance(value, torch.nn.Module)
    ]
    assert models
    for model in models:
        assert not model.training, type(model).__name__
        assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_unknown_family_is_refused_with_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match="family 'sdxl-bse'") as error:
        recipes("sdxl").save_tiny_pipeline("sdxl-bse", tmp_path)
    assert "Did you mean 'sdxl'?" in str(error.value)
    assert "Allowed: sdxl" in str(error.value)
    with pytest.raises(ValueError, match="family 'flux-dve'") as error:
        flux_tiny().save_tiny_pipeline("flux-dve", tmp_path)
    assert "Did you mean 'flux-dev'?" in str(error.value)
    assert "flux-dev, flux-schnell" in str(error.value)
    assert not any(tmp_path.iterdir()), "nothing should be written for a bad family"

    with pytest.raises(ValueError, match="scaling_factor"):
        tiny.tiny_vae(scaling_factor=0)


def test_vae_takes_its_latent_normalisation_explicitly():
    shifted = tiny.tiny_vae(scaling_factor=0.5, shift_factor=0.25, quant_convs=False).config
    assert (shifted.scaling_factor, shifted.shift_factor) == (0.5, 0.25)
    assert (shifted.use_quant_conv, shifted.use_post_quant_conv) == (False, False)
    plain = tiny.tiny_vae(scaling_factor=0.5).config
    assert plain.shift_factor is None and plain.use_quant_conv and plain.use_post_quant_conv
    assert plain.latent_channels == tiny.VAE_LATENT_CHANNELS
    assert len(plain.block_out_channels) == 4, "8x down-sampling, as in the real VAEs"


# --------------------------------------------------------------------------------------------------
# FLUX
# --------------------------------------------------------------------------------------------------


def test_flux_scheduler_configs_follow_the_real_checkpoints():
    dev = flux_tiny().flux_scheduler_config("dev")
    schnell = flux_tiny().flux_scheduler_config("schnell")

    assert dev["shift"] == 3.0 and dev["use_dynamic_shifting"] is True
    assert (dev["base_shift"], dev["max_shift"]) == (0.5, 1.15)
    assert (dev["base_image_seq_len"], dev["max_image_seq_len"]) == (256, 4096)
    assert schnell["shift"] == 1.0 and schnell["use_dynamic_shifting"] is False
    assert dev["num_train_timesteps"] == schnell["num_train_timesteps"] == 1000

    dev["shift"] = 99.0
    assert flux_tiny().flux_scheduler_config("dev")["shift"] == 3.0, "callers get a copy"

    with pytest.raises(ValueError, match="variant 'pro'"):
        flux_tiny().flux_scheduler_config("pro")


@pytest.mark.parametrize(("guidance_embeds", "variant"), [(True, "dev"), (False, "schnell")])
def test_flux_components_pair_guidance_with_the_matching_scheduler(guidance_embeds, variant):
    components = flux_tiny().tiny_flux_components(guidance_embeds=guidance_embeds)
    assert components["transformer"].config.guidance_embeds is guidance_embeds
    scheduler_config = components["scheduler"].config
    for key, value in flux_tiny().flux_scheduler_config(variant).items():
        assert scheduler_config[key] == value, key
    assert components["image_encoder"] is None and components["feature_extractor"] is None


def test_flux_widths_line_up():
    components = flux_tiny().tiny_flux_components()
    transformer = components["transformer"].config
    vae = components["vae"].config

    assert transformer.in_channels == vae.latent_channels * 4  # packed 2x2 latent patches
    assert transformer.joint_attention_dim == components["text_encoder_2"].config.d_model
    assert transformer.pooled_projection_dim == components["text_encoder"].config.hidden_size
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert (vae.use_quant_conv, vae.use_post_quant_conv) == (False, False)
    assert vae.shift_factor is not None and vae.scaling_factor != 0.18215


@pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")
def test_flux_controlnet_matches_the_transformer():
    transformer = flux_tiny().tiny_flux_components(guidance_embeds=False)["transformer"]
    controlnet = flux_tiny().tiny_flux_controlnet(transformer_config=transformer.config)

    for key in ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim"):
        assert controlnet.config[key] == transformer.config[key], key
    assert tuple(controlnet.config.axes_dims_rope) == tuple(transformer.config.axes_dims_rope)
    assert controlnet.config.guidance_embeds is False, "follows the transformer by default"
    # Fewer blocks than the transformer, like InfuseNet: each residual feeds several blocks.
    assert len(controlnet.transformer_blocks) < len(transformer.transformer_blocks)
    assert len(controlnet.single_transformer_blocks) < len(transformer.single_transformer_blocks)
    assert len(controlnet.controlnet_single_blocks) == len(controlnet.single_transformer_blocks)

    default = flux_tiny().tiny_flux_controlnet()
    assert default.config.guidance_embeds is True
    assert default.config.joint_attention_dim == transformer.config.joint_attention_dim


@pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")
def test_flux_controlnet_pipeline_runs_and_the_control_shows():
    from diffusers import FluxControlNetPipeline

    family = "flux-dev"
    control_image = Image.new("RGB", tiny_size(family)[::-1], (200, 30, 30))

    def images(controlnet, scale: float) -> np.ndarray:
        components = flux_tiny().tiny_flux_components(seed=0)
        pipe = FluxControlNetPipeline(**components, controlnet=controlnet)
        return run_pipeline(
            pipe, family, control_image=control_image, controlnet_conditioning_scale=scale
        )

    controlnet = flux_tiny().tiny_flux_controlnet(seed=0)
    controlled = images(controlnet, 1.0)
    height, width = tiny_size(family)
    assert controlled.shape == (1, height, width, 3)
    assert np.isfinite(controlled).all()

    uncontrolled = images(controlnet, 0.0)
    assert not np.allclose(controlled, uncontrolled), "random residuals must change the image"

    # diffusers' own zero initialisation: a fresh controlnet changes nothing.
    zero = flux_tiny().tiny_flux_controlnet(seed=0, zero_residuals=True)
    np.testing.assert_array_equal(images(zero, 1.0), uncontrolled)


# --------------------------------------------------------------------------------------------------
# SDXL and SD 1.5
# --------------------------------------------------------------------------------------------------


def test_sdxl_unet_has_instantstyle_blocks():
    components = recipes("sdxl").tiny_sdxl_components()
    unet = components["unet"]

    assert len(unet.up_blocks[0].attentions) == 3
    assert len(unet.down_blocks[2].attentions) == 2
    depth = len(unet.up_blocks[0].attentions[1].transformer_blocks)
    assert depth >= 2
    processors = unet.attn_processors
    for block in range(depth):
        # InstantStyle's style block and layout block.
        for attention in ("up_blocks.0.attentions.1", "down_blocks.2.attentions.1"):
            assert f"{attention}.transformer_blocks.{block}.attn2.processor" in processors
    assert not hasattr(unet.down_blocks[0], "attentions"), "SDXL's first down block is plain"


def test_sdxl_widths_line_up():
    components = recipes("sdxl").tiny_sdxl_components()
    unet = components["unet"].config
    text_1 = components["text_encoder"].config
    text_2 = components["text_encoder_2"].config

    assert text_1.hidden_size != text_2.hidden_size, "distinct widths catch crossed wires"
    assert unet.cross_attention_dim == text_1.hidden_size + text_2.hidden_size
    assert unet.projection_class_embeddings_input_dim == (
        text_2.projection_dim + 6 * unet.addition_time_embed_dim
    )
    assert components["vae"].config.scaling_factor == 0.13025


def test_sdxl_scheduler_is_sdxl_base_euler():
    scheduler = recipes("sdxl").tiny_sdxl_components()["scheduler"]
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    config = scheduler.config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert (config.steps_offset, config.timestep_spacing) == (1, "leading")
    assert (config.num_train_timesteps, config.prediction_type) == (1000, "epsilon")


def test_sd15_components_follow_sd15():
    components = recipes("sd15").tiny_sd15_components()
    unet = components["unet"]
    scheduler = components["scheduler"]

    assert unet.config.cross_attention_dim == components["text_encoder"].config.hidden_size
    assert not hasattr(unet.up_blocks[0], "attentions"), "SD 1.5's first up block is plain"
    assert [len(block.attentions) for block in unet.up_blocks[1:]] == [3, 3, 3]
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor" in unet.attn_processors
    assert components["vae"].config.scaling_factor == 0.18215
    assert type(scheduler).__name__ == "PNDMScheduler"
    assert scheduler.config.skip_prk_steps is True
    assert scheduler.config.set_alpha_to_one is False
    assert scheduler.config.steps_offset == 1
    assert components["safety_checker"] is None
    assert components["requires_safety_checker"] is False


# --------------------------------------------------------------------------------------------------
# Tokenizers and the image encoder
# --------------------------------------------------------------------------------------------------


def test_clip_tokenizer_encodes_pads_truncates_and_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = tiny.tiny_clip_tokenizer()
    assert isinstance(tokenizer, CLIPTokenizer)
    assert tokenizer.model_max_length == 77

    ids = tokenizer(PROMPT + " — naïve café 😀").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1], "byte-level BPE needs no unknown token"
    assert max(ids) < len(tokenizer)
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("a photo of a woman")

    padded = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.pad_token_id
    truncated = tokenizer(PROMPT * 20, padding="max_length", max_length=77, truncation=True)
    assert len(truncated.input_ids) == 77 and truncated.input_ids[-1] == tokenizer.eos_token_id

    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded.model_max_length == 77
    assert reloaded(PROMPT, padding="max_length", max_length=77).input_ids == padded


def test_t5_tokenizer_encodes_pads_truncates_and_round_trips(tmp_path):
    from transformers import T5TokenizerFast

    tokenizer = tiny.tiny_t5_tokenizer()
    assert isinstance(tokenizer, T5TokenizerFast)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512

    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids, "plain English needs no unknown token"
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert tokenizer.unk_token_id in tokenizer("naïve").input_ids

    padded = tokenizer(PROMPT, padding="max_length", max_length=512, truncation=True)
    assert len(padded.input_ids) == 512 and padded.input_ids[-1] == tokenizer.pad_token_id
    assert sum(padded.attention_mask) == len(ids)
    truncated = tokenizer(PROMPT * 100, padding="max_length", max_length=512, truncation=True)
    assert len(truncated.input_ids) == 512 and truncated.input_ids[-1] == tokenizer.eos_token_id

    tokenizer.save_pretrained(tmp_path)
    reloaded = T5TokenizerFast.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded.model_max_length == 512
    assert reloaded(PROMPT, padding="max_length", max_length=512).input_ids == padded.input_ids


def test_text_encoders_accept_every_token_id():
    """The embedding tables must cover the tokenizers' whole vocabularies."""
    flux = flux_tiny().tiny_flux_components()
    assert flux["text_encoder"].config.vocab_size >= len(flux["tokenizer"])
    assert flux["text_encoder_2"].config.vocab_size >= len(flux["tokenizer_2"])
    assert flux["text_encoder"].config.eos_token_id == flux["tokenizer"].eos_token_id


def test_clip_vision_encoder_and_processor_are_tiny():
    encoder, processor = tiny.tiny_clip_vision_encoder(projection_dim=24, image_size=32)
    pixels = processor(images=Image.new("RGB", (100, 60), (10, 200, 90)), return_tensors="pt")
    assert tuple(pixels.pixel_values.shape) == (1, 3, 32, 32)

    with torch.no_grad():
        output = encoder(pixels.pixel_values, output_hidden_states=True)
    assert tuple(output.image_embeds.shape) == (1, 24)
    assert len(output.hidden_states) >= 3, "IP-Adapter Plus reads the penultimate layer"

    again, _ = tiny.tiny_clip_vision_encoder(projection_dim=24, image_size=32)
    with torch.no_grad():
        torch.testing.assert_close(again(pixels.pixel_values).image_embeds, output.image_embeds)


# --------------------------------------------------------------------------------------------------
# The module itself
# --------------------------------------------------------------------------------------------------


TINY_MODULES = ("adapterswap.kit.tiny", "adapterswap.kit.tiny_tokenizers",
                *sorted(set(FAMILY_MODULES.values())))


@pytest.mark.parametrize("module", TINY_MODULES)
def test_importing_tiny_does_not_import_torch(module):
    """Fast CLI paths (``--help``, ``plugins``) may import the module."""
    pytest.importorskip(module.partition(".")[0])
    code = (
        f"import sys, {module}; "
        "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_every_public_function_has_a_docstring():
    public = []
    for name in TINY_MODULES:
        module = importlib.import_module(name)
        public += [
            obj
            for key, obj in vars(module).items()
            if not key.startswith("_") and inspect.isfunction(obj)
            and obj.__module__ == module.__name__
        ]
    assert len(public) >= 10
    for function in public:
        assert inspect.getdoc(function), function.__name__
    for method in vars(tiny.TinyPipelines).values():
        if inspect.isfunction(method) and not method.__name__.startswith("_"):
            assert inspect.getdoc(method), method.__name__
