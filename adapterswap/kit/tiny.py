"""The tiny-preset recipe every diffusers plugin shares: small random models of the real classes.

A plugin's ``tiny`` preset (and its tests) builds the *real* diffusers / transformers classes
(``AutoencoderKL``, ``CLIPTextModel``, ``T5EncoderModel``, its own UNet or transformer ...) from
small configs, saves them in the real on-disk layout and loads them back through the real
loaders, so the code under test follows the same paths as with real checkpoints, with at most a
few million parameters. A whole pipeline runs two steps on a laptop CPU in well under a second.

- **Seeded.** Each builder takes ``seed`` and calls ``torch.manual_seed(seed)`` (:func:`reseed`)
  right before it constructs each model, so the same seed always gives the same weights.
  Models come back in eval mode and float32 (:func:`ready`).
- **Distinct widths.** The shared text widths are tiny and differ from one another
  (:data:`CLIP_TEXT_WIDTH` 32, :data:`T5_WIDTH` 48; a plugin picks others for further encoders)
  so that a wire crossed between them fails loudly. The VAE keeps the real 8x down-sampling.
- **Offline.** Nothing here touches the network: the tokenizers are built locally from a small
  byte-level BPE (CLIP) and a small Unigram vocabulary (T5); both tokenize any English prompt and
  survive ``save_pretrained`` / ``from_pretrained``.

A plugin's own ``tiny`` module builds its denoiser and scheduler, puts them together with these
parts and registers its pipelines in a :class:`TinyPipelines`, which writes them in diffusers'
layout (:func:`save_pipeline`, loaded back with :func:`reload_pipeline`). The IP-Adapter helpers
at the end (:func:`save_ip_adapter_files`, :func:`save_tiny_image_encoder`,
:func:`random_ip_layers`) write tiny adapters in h94's layout. torch is imported lazily.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.kit.tiny_tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
        T5EncoderModel,
        T5TokenizerFast,
    )

__all__ = [
    "CLIP_TEXT_WIDTH", "T5_WIDTH", "TINY_SIDE", "VAE_LATENT_CHANNELS", "TinyPipelines",
    "build_once", "fp16_rounded", "random_ip_layers", "ready", "reload_pipeline",
    "require_choice", "reseed", "save_ip_adapter_files", "save_pipeline",
    "save_tiny_image_encoder", "tiny_clip_text_encoder", "tiny_clip_tokenizer",
    "tiny_clip_vision_encoder", "tiny_t5_encoder", "tiny_t5_tokenizer", "tiny_vae",
]

#: Side of a tiny image in pixels: 64 px gives an 8x8 latent with the 8x VAE.
TINY_SIDE = 64
#: Width of the tiny CLIP text encoder (hidden size and projection).
CLIP_TEXT_WIDTH = 32
#: Width of the tiny T5 encoder (``d_model``).
T5_WIDTH = 48
#: Latent channels of the tiny VAE.
VAE_LATENT_CHANNELS = 4
#: Four VAE blocks: 8x down-sampling, as in the real VAEs.
_VAE_BLOCK_OUT_CHANNELS = (16, 16, 32, 32)


def require_choice(argument: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the argument, the bad value, a close match and the choices."""
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown {argument} {value!r}.{hint} Allowed: {', '.join(allowed)}")


def reseed(seed: int) -> None:
    """``torch.manual_seed(seed)``: call it right before constructing each tiny model."""
    import torch

    torch.manual_seed(seed)


def ready(model: Any) -> Any:
    """Put a freshly built model in eval mode, float32."""
    import torch

    # Models are built in float32 unless the default dtype was changed. Cast only then: diffusers
    # warns on every ``.to(dtype)`` ("modules that should be kept in float32"), even a no-op one.
    if any(parameter.dtype != torch.float32 for parameter in model.parameters()):
        model = model.to(torch.float32)
    return model.eval()


# ------------------------------------------------------------------------------ text and images
def tiny_clip_text_encoder(seed: int, tokenizer: CLIPTokenizer, width: int = CLIP_TEXT_WIDTH,
                           *, with_projection: bool = False) -> CLIPTextModel:
    """A two-layer CLIP text encoder of ``width`` fitting ``tokenizer`` (``CLIPTextModel``, or
    ``CLIPTextModelWithProjection`` with a ``width``-wide projection). Two layers, so a pipeline
    that reads the penultimate hidden state works."""
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = transformers.CLIPTextModelWithProjection if with_projection \
        else transformers.CLIPTextModel
    reseed(seed)
    return ready(model_class(config))


def tiny_t5_encoder(seed: int, tokenizer: T5TokenizerFast,
                    width: int = T5_WIDTH) -> T5EncoderModel:
    """A two-layer T5 v1.1 (gated-GELU) encoder of ``width`` fitting ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    reseed(seed)
    return ready(T5EncoderModel(config))


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
    reseed(seed)
    encoder = ready(CLIPVisionModelWithProjection(config))
    processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        do_convert_rgb=True,
    )
    return encoder, processor


def tiny_vae(seed: int = 0, *, scaling_factor: float, shift_factor: float | None = None,
             quant_convs: bool = True, sample_size: int = TINY_SIDE) -> AutoencoderKL:
    """A tiny ``AutoencoderKL`` with 4 latent channels and the real 8x down-sampling.

    The latent normalisation is the real VAE's, given explicitly: ``scaling_factor``,
    ``shift_factor`` (``None``: latents are not shifted) and whether the VAE has the 1x1
    ``quant_conv`` / ``post_quant_conv`` layers (newer VAEs drop them).
    """
    from diffusers import AutoencoderKL

    if not (isinstance(scaling_factor, (int, float)) and scaling_factor > 0):
        raise ValueError(f"scaling_factor must be a number > 0, got {scaling_factor!r}")
    normalisation: dict[str, Any] = {"scaling_factor": scaling_factor}
    if shift_factor is not None:
        normalisation["shift_factor"] = shift_factor
    if not quant_convs:
        normalisation.update(use_quant_conv=False, use_post_quant_conv=False)
    blocks = len(_VAE_BLOCK_OUT_CHANNELS)
    reseed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=_VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=VAE_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=sample_size,
        **normalisation,
    )
    return ready(vae)


# ------------------------------------------------------------------------------ whole pipelines
class TinyPipelines:
    """The tiny pipelines a plugin builds, by family name.

    ``recipes`` maps each family to ``(diffusers pipeline class name, components builder)``,
    the builder taking ``seed`` and returning the pipeline's keyword arguments. A plugin's
    ``tiny`` module makes one and exposes its methods (``save_tiny_pipeline = TINY.save``).
    An unknown family raises ``ValueError`` naming it, a close match and the families.
    """

    def __init__(self, recipes: Mapping[str, tuple[str, Callable[[int], dict[str, Any]]]]):
        self.recipes = dict(recipes)

    @property
    def families(self) -> tuple[str, ...]:
        """The family names, in registration order."""
        return tuple(self.recipes)

    def pipeline_class(self, family: str) -> type[DiffusionPipeline]:
        """The diffusers pipeline class that runs ``family``."""
        require_choice("family", family, self.families)
        import diffusers

        return getattr(diffusers, self.recipes[family][0])

    def components(self, family: str, seed: int = 0) -> dict[str, Any]:
        """The tiny components of ``family``, as keyword arguments for its pipeline class."""
        require_choice("family", family, self.families)
        return self.recipes[family][1](seed)

    def build(self, family: str, seed: int = 0) -> DiffusionPipeline:
        """A ready-to-run tiny pipeline of ``family``, on CPU."""
        return self.pipeline_class(family)(**self.components(family, seed))

    def save(self, family: str, path: str | Path, seed: int = 0) -> Path:
        """Write a tiny pipeline of ``family`` to ``path`` in diffusers' on-disk layout
        (:func:`save_pipeline`); nothing is written for an unknown family."""
        return save_pipeline(self.build(family, seed), path)


def save_pipeline(pipeline: DiffusionPipeline, path: str | Path) -> Path:
    """Write ``pipeline`` to ``path`` in diffusers' on-disk layout and return ``path``.

    The directory gets ``model_index.json`` and one sub-folder per component (safetensors
    weights, configs, tokenizer files), so :func:`reload_pipeline` (``from_pretrained(path,
    local_files_only=True)``) loads it like a real checkpoint. Constructor arguments that are
    not saved in ``model_index.json`` do not come back on loading: pass them again there.
    """
    from adapterswap.quiet import silenced

    path = Path(path)
    with silenced():  # transformers' "Writing model shards" bar for each tiny text encoder
        pipeline.save_pretrained(path, safe_serialization=True)
    return path


def reload_pipeline(pipeline_class: type[DiffusionPipeline], path: str | Path,
                    **kwargs: Any) -> DiffusionPipeline:
    """``pipeline_class.from_pretrained(path, local_files_only=True, **kwargs)``: a saved tiny
    pipeline loaded through the real loader, never the network."""
    return pipeline_class.from_pretrained(path, local_files_only=True, **kwargs)


@contextlib.contextmanager
def every_rank_saves() -> Iterator[None]:
    """Within the block, transformers' ``save_pretrained`` writes on every torch.distributed
    rank. It writes on rank 0 only once a process group exists (checkpoints of one model
    shared by all ranks); a tiny preset is built per process, so a rank other than 0 would
    get a folder without its text encoders."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        yield
        return
    original = PreTrainedModel.__dict__.get("should_save_on_this_rank")
    if original is None and not hasattr(PreTrainedModel, "should_save_on_this_rank"):
        yield  # an older transformers: it saves where it is asked to
        return
    PreTrainedModel.should_save_on_this_rank = lambda self, is_main_process: is_main_process
    try:
        yield
    finally:
        if original is None:
            del PreTrainedModel.should_save_on_this_rank
        else:
            PreTrainedModel.should_save_on_this_rank = original


def build_once(path: Path, build: Callable[[Path], Any]) -> Path:
    """Create ``path`` with ``build(tmp_path)`` unless it exists; atomic, so two processes
    racing for the same tiny preset never see a half-written directory."""
    import os
    import shutil
    import tempfile

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        with every_rank_saves():
            build(tmp)
        os.replace(tmp, path)
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------ IP-Adapter files
def fp16_rounded(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors stored in float16, as h94's published files are."""
    import torch

    return {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}


def save_tiny_image_encoder(path: Path, seed: int, *, hidden_size: int,
                            projection_dim: int) -> None:
    """A tiny CLIP image encoder in the layout of h94's ``image_encoder`` folders
    (``config.json`` + float16 ``model.safetensors``, no preprocessor config), taking 224 px
    inputs like the real ViT-H / ViT-bigG so the default ``CLIPImageProcessor`` fits."""
    import torch

    encoder, _ = tiny_clip_vision_encoder(seed, projection_dim=projection_dim,
                                          hidden_size=hidden_size, image_size=224)
    encoder.to(torch.float16).save_pretrained(str(path), safe_serialization=True)


def save_ip_adapter_files(folder: Path, stem: str, state: dict[str, dict[str, Any]]) -> None:
    """Write ``<stem>.safetensors`` (flat ``image_proj.`` / ``ip_adapter.`` keys) and the legacy
    ``<stem>.bin`` (a dict of the two), float16, as h94 publishes them."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {part: fp16_rounded(tensors) for part, tensors in state.items()}
    flat = {f"{part}.{key}": value for part, tensors in state.items()
            for key, value in tensors.items()}
    save_file(flat, str(folder / f"{stem}.safetensors"))
    torch.save(state, str(folder / f"{stem}.bin"))


def random_ip_layers(unet: Any, generator: torch.Generator) -> dict[str, Any]:
    """Random ``to_k_ip`` / ``to_v_ip`` weights for every cross-attention of ``unet``, keyed as
    in h94's files (``1.to_k_ip.weight``, ``3.to_k_ip.weight``, ...)."""
    import torch

    from adapterswap.kit.ip_adapter_install import ip_layer_shapes

    cross = unet.config.cross_attention_dim
    layers = {}
    for index, (_, hidden) in enumerate(ip_layer_shapes(unet)):
        for kind in ("to_k_ip", "to_v_ip"):
            layers[f"{2 * index + 1}.{kind}.weight"] = \
                torch.randn(hidden, cross, generator=generator) / cross ** 0.5
    return layers


def random_image_projection(generator: torch.Generator, *, cross_attention_dim: int,
                            projection_dim: int, tokens: int = 4) -> dict[str, Any]:
    """Random weights of a plain IP-Adapter's image projection (diffusers'
    ``ImageProjection``: ``tokens`` image tokens of ``cross_attention_dim`` from a
    ``projection_dim``-wide CLIP image embedding), keyed as in h94's files (``proj.weight``,
    ``proj.bias``, ``norm.weight``, ``norm.bias``)."""
    import torch

    cross = cross_attention_dim
    return {
        "proj.weight": torch.randn(tokens * cross, projection_dim, generator=generator)
        / projection_dim ** 0.5,
        "proj.bias": 0.1 * torch.randn(tokens * cross, generator=generator),
        "norm.weight": 1 + 0.1 * torch.randn(cross, generator=generator),
        "norm.bias": 0.1 * torch.randn(cross, generator=generator),
    }
