"""Tiny, random-initialised diffusion components for tests and the ``--preset tiny`` demo.

Every builder here constructs the *real* diffusers / transformers classes
(``FluxTransformer2DModel``, ``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
``T5EncoderModel`` ...) from small configs, so the code under test follows the same paths as with
real checkpoints, only with at most a few million parameters instead of billions. A whole
pipeline runs two steps on a laptop CPU in well under a second.

- **Seeded.** Each builder takes ``seed`` and calls ``torch.manual_seed(seed)`` right before it
  constructs each model, so the same seed always gives the same weights. Models come back in eval
  mode and float32.
- **Same module names as the real models.** The UNets keep the block layout of SDXL-base and
  SD 1.5 (which blocks have cross-attention, how many attentions each up block has), the VAEs keep
  the 8x down-sampling of the real ones, and the FLUX transformer keeps its double/single block
  split. Adapter code that addresses layers by name (IP-Adapter processors, InstantStyle's
  ``up_blocks.0.attentions.1``, ControlNet residual intervals) therefore works on tiny and real
  models alike. The text widths are tiny and deliberately different from one another (CLIP 32,
  T5 48, SDXL's second CLIP 64) so that a wire crossed between them fails loudly.
- **Offline.** Nothing here touches the network: the tokenizers are built locally from a small
  byte-level BPE (CLIP) and a small Unigram vocabulary (T5); both tokenize any English prompt and
  survive ``save_pretrained`` / ``from_pretrained``.

Build a pipeline from the components exactly as from a checkpoint::

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**tiny_sd15_components(seed=0))

or write the real diffusers on-disk layout with :func:`save_tiny_pipeline` and load it back with
``<PipelineClass>.from_pretrained(path, local_files_only=True)``.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline, FluxControlNetModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
        T5TokenizerFast,
    )

#: Families that :func:`save_tiny_pipeline` and :func:`build_tiny_pipeline` accept.
TINY_FAMILIES: tuple[str, ...] = ("flux-dev", "flux-schnell", "sd15", "sdxl")

#: Default ``(height, width)`` of a tiny image per family. Every tiny VAE down-samples 8x like the
#: real ones, so 64 px gives an 8x8 latent (a 4x4 grid of packed 2x2 patches for FLUX).
_TINY_SIDE = 64
TINY_SIZE: dict[str, tuple[int, int]] = {name: (_TINY_SIDE, _TINY_SIDE) for name in TINY_FAMILIES}

#: VAE families that :func:`tiny_vae` accepts.
TINY_VAE_FAMILIES: tuple[str, ...] = ("flux", "sd15", "sdxl")

_FLUX_SCHEDULER_VARIANTS: tuple[str, ...] = ("dev", "schnell")

# Widths. Kept distinct on purpose: mixing up the text width and the image width must not "just
# work" by coincidence.
_CLIP_TEXT_WIDTH = 32  # FLUX pooled text, SD 1.5 text, SDXL text_encoder
_CLIP_TEXT_2_WIDTH = 64  # SDXL text_encoder_2 (hidden size and projection)
_T5_WIDTH = 48  # FLUX joint_attention_dim
_SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim; real SDXL uses 256
_VAE_LATENT_CHANNELS = 4
_VAE_BLOCK_OUT_CHANNELS = (16, 16, 32, 32)  # four blocks: 8x down-sampling, as in the real VAEs


def _require_choice(argument: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the argument, the bad value, a close match and the choices."""
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown {argument} {value!r}.{hint} Allowed: {', '.join(allowed)}")


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _ready(model: Any) -> Any:
    """Put a freshly built model in eval mode, float32."""
    import torch

    # Models are built in float32 unless the default dtype was changed. Cast only then: diffusers
    # warns on every ``.to(dtype)`` ("modules that should be kept in float32"), even a no-op one.
    if any(parameter.dtype != torch.float32 for parameter in model.parameters()):
        model = model.to(torch.float32)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses to stand for the 256 byte values.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes (control
    characters, space, ...) follow in byte order, shifted to code points 256 and up. This is the
    layout of CLIP's and GPT-2's vocabularies, so the tiny vocabulary covers any UTF-8 text.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]


# A handful of merges so that common words become single tokens, as with the real vocabulary.
_CLIP_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "f</w>"),
    ("i", "n</w>"),
    ("o", "n</w>"),
    ("p", "h"),
    ("ph", "o"),
    ("pho", "t"),
    ("phot", "o</w>"),
)


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer with a ~530-token vocabulary, built locally.

    The vocabulary holds the 256 byte characters, their end-of-word (``</w>``) forms, a few merges
    and ``<|startoftext|>`` / ``<|endoftext|>`` last, laid out like the real CLIP vocabulary, so it
    tokenizes any prompt. ``model_max_length`` is 77, as for every Stable Diffusion / FLUX CLIP.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(char + "</w>" for char in alphabet)]:
        vocab[token] = len(vocab)
    for left, right in _CLIP_MERGES:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(_CLIP_MERGES), model_max_length=77)


_T5_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "portrait", "man", "woman",
    "person", "face", "cat", "dog", "style", "painting", "wearing", "red", "blue", "light",
)  # fmt: skip


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer with a ~120-piece vocabulary, built locally.

    ``<pad>`` = 0, ``</s>`` = 1 and ``<unk>`` = 2 as in T5; then the metaspace ``▁``, every
    printable ASCII character and a few whole words. Words split on whitespace, ``</s>`` is
    appended, characters outside ASCII become ``<unk>``. ``model_max_length`` is 512 (FLUX's
    ``max_sequence_length`` limit). No sentinel ``<extra_id_*>`` tokens: FLUX never uses them.
    """
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces.append(("\N{LOWER ONE EIGHTH BLOCK}", -6.0))  # "▁", SentencePiece's word marker
    pieces += [(char, -8.0) for char in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\N{LOWER ONE EIGHTH BLOCK}" + word, -4.0) for word in _T5_WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


# --------------------------------------------------------------------------------------------------
# Text and image encoders
# --------------------------------------------------------------------------------------------------


def _clip_text_config(tokenizer: CLIPTokenizer, width: int, *, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=projection_dim or width,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden state
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_clip_text_model(seed: int, tokenizer: CLIPTokenizer, width: int):
    from transformers import CLIPTextModel

    config = _clip_text_config(tokenizer, width)
    _seed(seed)
    return _ready(CLIPTextModel(config))


def _tiny_clip_text_model_with_projection(seed: int, tokenizer: CLIPTokenizer, width: int):
    from transformers import CLIPTextModelWithProjection

    config = _clip_text_config(tokenizer, width, projection_dim=width)
    _seed(seed)
    return _ready(CLIPTextModelWithProjection(config))


def _tiny_t5_encoder(seed: int, tokenizer: T5TokenizerFast):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_WIDTH,
        d_kv=12,
        d_ff=2 * _T5_WIDTH,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, the family FLUX uses
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    _seed(seed)
    return _ready(T5EncoderModel(config))


def tiny_clip_vision_encoder(
    seed: int = 0, *, projection_dim: int = 32, hidden_size: int = 32, image_size: int = 32
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """A tiny CLIP image encoder and the processor that feeds it, for IP-Adapter tests.

    The processor resizes and centre-crops any image to ``image_size`` and normalises with CLIP's
    mean and std, exactly as the real ``CLIPImageProcessor`` does at 224 px. The encoder has two
    layers, so IP-Adapter Plus (which reads the penultimate hidden state) works too.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=max(1, image_size // 4),  # 4x4 patches + the class token
        hidden_act="quick_gelu",
    )
    _seed(seed)
    encoder = _ready(CLIPVisionModelWithProjection(config))
    processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        do_convert_rgb=True,
    )
    return encoder, processor


# --------------------------------------------------------------------------------------------------
# VAEs
# --------------------------------------------------------------------------------------------------


def tiny_vae(seed: int = 0, *, family: str) -> AutoencoderKL:
    """A tiny ``AutoencoderKL`` with 4 latent channels and the real 8x down-sampling.

    ``family`` picks the latent normalisation of the real VAE: ``"flux"`` (``shift_factor`` 0.1159,
    ``scaling_factor`` 0.3611, no quant convs), ``"sdxl"`` (``scaling_factor`` 0.13025) or
    ``"sd15"`` (``scaling_factor`` 0.18215).
    """
    _require_choice("family", family, TINY_VAE_FAMILIES)
    from diffusers import AutoencoderKL

    if family == "flux":
        latent_normalisation = {
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        }
    elif family == "sdxl":
        latent_normalisation = {"scaling_factor": 0.13025}
    else:
        latent_normalisation = {"scaling_factor": 0.18215}

    blocks = len(_VAE_BLOCK_OUT_CHANNELS)
    _seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=_VAE_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=_TINY_SIDE,
        **latent_normalisation,
    )
    return _ready(vae)


# --------------------------------------------------------------------------------------------------
# FLUX
# --------------------------------------------------------------------------------------------------

# FLUX.1 scheduler configs, as published with the checkpoints (scheduler/scheduler_config.json).
_FLUX_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "dev": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    "schnell": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}


def flux_scheduler_config(variant: str) -> dict[str, Any]:
    """The ``FlowMatchEulerDiscreteScheduler`` config of FLUX.1-dev or FLUX.1-schnell.

    ``variant`` is ``"dev"`` (shift 3.0 with resolution-dependent dynamic shifting) or
    ``"schnell"`` (shift 1.0, no dynamic shifting). Returns a fresh dict.
    """
    _require_choice("variant", variant, _FLUX_SCHEDULER_VARIANTS)
    return dict(_FLUX_SCHEDULER_CONFIGS[variant])


def _flux_transformer_config(*, guidance_embeds: bool) -> dict[str, Any]:
    """Config of the tiny FLUX transformer: 2 double + 4 single blocks, inner width 32."""
    return {
        "patch_size": 1,
        "in_channels": _VAE_LATENT_CHANNELS * 2 * 2,  # latents are packed into 2x2 patches
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": _T5_WIDTH,
        "pooled_projection_dim": _CLIP_TEXT_WIDTH,
        "guidance_embeds": guidance_embeds,
        "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim, like (16, 56, 56) sums to 128
    }


def tiny_flux_components(seed: int = 0, *, guidance_embeds: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``FluxPipeline(**components)``: a tiny FLUX.1.

    ``guidance_embeds=True`` gives a guidance-distilled transformer like FLUX.1-dev (with the dev
    scheduler config); ``False`` is FLUX.1-schnell (with the schnell scheduler config). The
    transformer has 2 double and 4 single blocks; ``image_encoder`` and ``feature_extractor`` are
    ``None``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    _seed(seed)
    transformer = _ready(
        FluxTransformer2DModel(**_flux_transformer_config(guidance_embeds=guidance_embeds))
    )
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    variant = "dev" if guidance_embeds else "schnell"
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(variant)),
        "vae": tiny_vae(seed, family="flux"),
        "text_encoder": _tiny_clip_text_model(seed, tokenizer, _CLIP_TEXT_WIDTH),
        "tokenizer": tokenizer,
        "text_encoder_2": _tiny_t5_encoder(seed, tokenizer_2),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


_FLUX_CONTROLNET_SHARED_KEYS: tuple[str, ...] = (
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "axes_dims_rope",
)


def tiny_flux_controlnet(
    seed: int = 0,
    *,
    transformer_config: Mapping[str, Any] | None = None,
    num_layers: int = 1,
    num_single_layers: int = 2,
    guidance_embeds: bool | None = None,
    zero_residuals: bool = False,
) -> FluxControlNetModel:
    """A tiny ``FluxControlNetModel`` that fits a tiny FLUX transformer (InfuseNet's class).

    The widths, heads, rope axes and input channels come from ``transformer_config`` (a
    transformer's ``.config`` or a dict; default: the :func:`tiny_flux_components` transformer).
    ``guidance_embeds`` defaults to the transformer's. Like InfiniteYou's InfuseNet (4 double and
    10 single blocks against FLUX's 19 and 38), it has fewer blocks than the transformer: FLUX adds
    residual ``i // ceil(len(transformer_blocks) / len(residuals))`` after transformer block ``i``,
    so 1 double and 2 single blocks against the tiny 2 and 4 each feed two transformer blocks.

    diffusers zero-initialises the controlnet's output projections, so a fresh controlnet changes
    nothing. Unless ``zero_residuals`` is True, those projections (and the zero-initialised
    ``controlnet_x_embedder``) get ordinary random weights instead, so tests can see the control.
    """
    from diffusers import FluxControlNetModel

    if transformer_config is None:
        transformer_config = _flux_transformer_config(
            guidance_embeds=True if guidance_embeds is None else guidance_embeds
        )
    config = {key: transformer_config[key] for key in _FLUX_CONTROLNET_SHARED_KEYS}
    config["guidance_embeds"] = (
        transformer_config["guidance_embeds"] if guidance_embeds is None else guidance_embeds
    )
    _seed(seed)
    controlnet = FluxControlNetModel(
        **config, num_layers=num_layers, num_single_layers=num_single_layers
    )
    if not zero_residuals:
        for projection in (
            *controlnet.controlnet_blocks,
            *controlnet.controlnet_single_blocks,
            controlnet.controlnet_x_embedder,
        ):
            projection.reset_parameters()
    return _ready(controlnet)


# --------------------------------------------------------------------------------------------------
# Stable Diffusion XL and 1.5
# --------------------------------------------------------------------------------------------------

# Scheduler configs of the real checkpoints (scheduler/scheduler_config.json), limited to the
# arguments each scheduler class takes.
_SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
_SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``StableDiffusionXLPipeline(**components)``: a tiny SDXL-base.

    The UNet keeps SDXL-base's layout: down blocks (plain, cross-attention, cross-attention), up
    blocks (cross-attention, cross-attention, plain), 2 layers per block, so ``up_blocks[0]`` has 3
    attentions (InstantStyle's ``up_blocks.0.attentions.1``) and ``down_blocks.2`` has 2. Its
    cross-attention width is the two text encoders' widths concatenated (32 + 64), and its
    "text_time" embedding takes the pooled 64-wide text embedding plus six 8-wide time ids.
    Includes ``force_zeros_for_empty_prompt=True`` (SDXL-base's value) and ``add_watermarker=False``
    (the invisible watermark is meaningless at 64 px and would make outputs depend on whether
    ``invisible-watermark`` is installed); ``image_encoder`` and ``feature_extractor`` are ``None``.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    _seed(seed)
    unet = UNet2DConditionModel(
        sample_size=_TINY_SIDE // 8,  # in latent pixels: the pipeline's default size is 64 px
        in_channels=_VAE_LATENT_CHANNELS,
        out_channels=_VAE_LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),  # real SDXL: (1, 2, 10)
        attention_head_dim=(2, 4, 4),  # diffusers' legacy name for the number of heads
        use_linear_projection=True,
        cross_attention_dim=_CLIP_TEXT_WIDTH + _CLIP_TEXT_2_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=_CLIP_TEXT_2_WIDTH + 6 * _SDXL_TIME_EMBED_DIM,
        norm_num_groups=8,
    )
    return {
        "vae": tiny_vae(seed, family="sdxl"),
        "text_encoder": _tiny_clip_text_model(seed, tokenizer, _CLIP_TEXT_WIDTH),
        "text_encoder_2": _tiny_clip_text_model_with_projection(
            seed, tokenizer_2, _CLIP_TEXT_2_WIDTH
        ),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": _ready(unet),
        "scheduler": EulerDiscreteScheduler(**_SDXL_SCHEDULER_CONFIG),
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def tiny_sd15_components(seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``StableDiffusionPipeline(**components)``: a tiny SD 1.5.

    The UNet keeps SD 1.5's layout: three cross-attention down blocks then a plain one, a plain up
    block then three cross-attention ones (so, as in the real model, ``up_blocks[0]`` has no
    attention), 2 layers per block, cross-attention width 32 (the CLIP text width). The scheduler
    is SD 1.5's ``PNDMScheduler``. ``safety_checker``, ``feature_extractor`` and ``image_encoder``
    are ``None`` and ``requires_safety_checker=False`` is included, so the pipeline builds without
    the safety-checker warning.
    """
    from diffusers import PNDMScheduler, UNet2DConditionModel

    tokenizer = tiny_clip_tokenizer()
    _seed(seed)
    unet = UNet2DConditionModel(
        sample_size=_TINY_SIDE // 8,  # in latent pixels: the pipeline's default size is 64 px
        in_channels=_VAE_LATENT_CHANNELS,
        out_channels=_VAE_LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        attention_head_dim=2,  # diffusers' legacy name for the number of heads; real SD 1.5: 8
        cross_attention_dim=_CLIP_TEXT_WIDTH,
        norm_num_groups=8,
    )
    return {
        "vae": tiny_vae(seed, family="sd15"),
        "text_encoder": _tiny_clip_text_model(seed, tokenizer, _CLIP_TEXT_WIDTH),
        "tokenizer": tokenizer,
        "unet": _ready(unet),
        "scheduler": PNDMScheduler(**_SD15_SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


# --------------------------------------------------------------------------------------------------
# Whole pipelines
# --------------------------------------------------------------------------------------------------


def tiny_pipeline_class(family: str) -> type[DiffusionPipeline]:
    """The diffusers pipeline class that runs ``family``.

    ``FluxPipeline`` for both FLUX families, ``StableDiffusionXLPipeline`` for ``sdxl``,
    ``StableDiffusionPipeline`` for ``sd15``.
    """
    _require_choice("family", family, TINY_FAMILIES)
    import diffusers

    if family.startswith("flux"):
        return diffusers.FluxPipeline
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline
    return diffusers.StableDiffusionPipeline


def tiny_components(family: str, seed: int = 0) -> dict[str, Any]:
    """The tiny components of a family, as keyword arguments for its pipeline class."""
    _require_choice("family", family, TINY_FAMILIES)
    if family == "flux-dev":
        return tiny_flux_components(seed, guidance_embeds=True)
    if family == "flux-schnell":
        return tiny_flux_components(seed, guidance_embeds=False)
    if family == "sdxl":
        return tiny_sdxl_components(seed)
    return tiny_sd15_components(seed)


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A ready-to-run tiny pipeline of ``family`` (one of :data:`TINY_FAMILIES`), on CPU."""
    return tiny_pipeline_class(family)(**tiny_components(family, seed))


def save_tiny_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny pipeline of ``family`` to ``path`` in diffusers' on-disk layout.

    ``family`` is one of ``flux-dev``, ``flux-schnell``, ``sd15``, ``sdxl``. The directory gets
    ``model_index.json`` and one sub-folder per component (safetensors weights, configs, tokenizer
    files), so ``<PipelineClass>.from_pretrained(path, local_files_only=True)`` loads it like a
    real checkpoint. Returns ``path`` as a ``Path``.

    Constructor arguments that are not saved in ``model_index.json`` do not come back on loading:
    pass ``add_watermarker=False`` when reloading ``sdxl`` on a machine with
    ``invisible-watermark`` installed.
    """
    from adapterswap.quiet import silenced

    pipeline = build_tiny_pipeline(family, seed)
    path = Path(path)
    with silenced():  # transformers' "Writing model shards" bar for each tiny text encoder
        pipeline.save_pretrained(path, safe_serialization=True)
    return path
