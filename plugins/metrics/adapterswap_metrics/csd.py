"""CSD style descriptors (Somepalli et al. 2024, "Measuring Style Similarity in Diffusion
Models", https://github.com/learn2phoenix/CSD): reading the published checkpoint safely and
running it as a transformers ``CLIPVisionModelWithProjection``.

The published file (``tomg-group-umd/CSD-ViT-L`` ``pytorch_model.bin``, or the authors' Google
Drive ``checkpoint.pth``) is the training checkpoint of ``CSD_CLIP``::

    {"model_state_dict": {...}, "opt_bb": ..., "opt_proj": ..., "iter": ..., "args": Namespace,
     "fp16_scaler": ...}

``model_state_dict`` was saved through a ``DataParallel`` wrapper (keys start with ``module.``)
and holds ``backbone.*``, the OpenAI CLIP ``VisionTransformer`` of ViT-L/14 with its projection
removed (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.<i>.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}``, ``ln_post``), and two
``(width, 768)`` heads, ``last_layer_style`` and ``last_layer_content``. The style embedding is
``normalize(ln_post(cls_token) @ last_layer_style)``: exactly a CLIP image tower whose visual
projection is the style head, which is how it is loaded here. The content head is not used.

The architecture is read off the tensors (width, patch size, image size, depth, MLP width,
projection width); the number of heads follows OpenAI CLIP's rule ``width // 64``.
A bare state dict (with or without ``module.``) and a ``.safetensors`` file of it load too.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.errors import MetricUnavailableError, UnsafeWeightsError
from adapterswap.hub import cached_snapshot, is_offline, looks_like_repo_id
from adapterswap_metrics.common import missing_package

if TYPE_CHECKING:
    import torch

CSD_REPO = "tomg-group-umd/CSD-ViT-L"
CSD_FILES = ("model.safetensors", "pytorch_model.bin", "checkpoint.pth")
CSD_HOW_TO_GET = (f"Get it with `hf download {CSD_REPO} pytorch_model.bin` (CSD weights: "
                  "CC-BY-4.0; code: MIT) and pass csd_weights=<that file>.")
#: CLIP's image normalisation, used by CSD's evaluation transform.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: OpenAI CLIP: heads = width // 64 for every ViT image tower.
HEAD_WIDTH = 64

_STYLE = "last_layer_style"
_CONTENT = "last_layer_content"
_BACKBONE = "backbone."
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
# OpenAI CLIP residual-block parameter -> transformers CLIPEncoderLayer parameter.
_BLOCK_NAMES = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}  # fmt: skip
_TOP_NAMES = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
}  # fmt: skip


def csd_file(source: str) -> Path | None:
    """The checkpoint file ``source`` names: the file itself, the first of :data:`CSD_FILES` in
    a directory, or in the Hugging Face cache snapshot of a repo id. None if absent."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        root: Path | None = path
    elif looks_like_repo_id(source):
        root = cached_snapshot(source, ("|".join(CSD_FILES),))
    else:
        root = None
    if root is None:
        return None
    return next((root / name for name in CSD_FILES if (root / name).is_file()), None)


def csd_weights_problem(source: str, *, what: str) -> str | None:
    """Why the CSD weights ``source`` cannot be used here (checked without network), else None."""
    if csd_file(source) is not None:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return (f"{what}: the directory {str(path)!r} holds none of {', '.join(CSD_FILES)}. "
                f"{CSD_HOW_TO_GET}")
    if not looks_like_repo_id(source):
        return f"{what}: {source!r} does not exist. {CSD_HOW_TO_GET}"
    if is_offline():
        return (f"{what}: {source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                f"set, so it cannot be downloaded. {CSD_HOW_TO_GET}")
    return None


def _allowed_pickle_globals() -> list[Any]:
    """The only non-tensor types a CSD training checkpoint holds besides containers: the saved
    ``argparse.Namespace`` and the numpy scalars/dtypes of the optimiser and scaler state."""
    import argparse

    import numpy as np

    allowed: list[Any] = [argparse.Namespace, np.dtype]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
        except ImportError:
            continue
        scalar = module.scalar
        allowed += [scalar, (scalar, "numpy.core.multiarray.scalar"),
                    (scalar, "numpy._core.multiarray.scalar")]
        break
    dtypes = getattr(np, "dtypes", None)
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        dtype_class = getattr(dtypes, name, None)
        if dtype_class is not None:
            allowed.append(dtype_class)
    return allowed


def read_csd_state(path: Path) -> dict[str, Any]:
    """The model state dict of a CSD checkpoint, read without executing pickled code."""
    import pickle

    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from adapterswap.weights import safetensors_problem

        problem = safetensors_problem(path)
        if problem is not None:
            raise MetricUnavailableError(
                f"CSD weights {str(path)!r} are a truncated or corrupt safetensors file "
                f"({problem})")
        return dict(load_file(str(path)))

    def read(**extra: Any) -> Any:
        with torch.serialization.safe_globals(_allowed_pickle_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, **extra)

    try:
        try:
            checkpoint = read(mmap=True)  # the optimiser state stays on disk
        except RuntimeError:
            checkpoint = read()  # a legacy (non-zip) file cannot be memory-mapped
    except pickle.UnpicklingError as exc:
        from adapterswap.weights import unpickling_reason

        raise UnsafeWeightsError(
            f"CSD weights {str(path)!r} hold objects other than tensors and the known "
            f"training metadata, so they are not loaded (torch.load weights_only=True: "
            f"{unpickling_reason(exc)})"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise MetricUnavailableError(f"CSD weights {str(path)!r} cannot be read: {exc}") from exc
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_state_dict"), dict):
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise MetricUnavailableError(
            f"CSD weights {str(path)!r} are neither a CSD training checkpoint (with "
            "model_state_dict) nor a state dict of tensors")
    return checkpoint


def split_csd_state(state: dict[str, Any], *, where: str) -> tuple[dict[str, Any], Any]:
    """(OpenAI-named backbone tensors, style head) of a CSD state dict; strict about keys."""
    backbone: dict[str, Any] = {}
    style = None
    for raw_key, value in state.items():
        key = raw_key.removeprefix("module.")
        if key.startswith(_BACKBONE):
            backbone[key[len(_BACKBONE):]] = value
        elif key == _STYLE:
            style = value
        elif key != _CONTENT:
            raise MetricUnavailableError(f"{where} is not a CSD checkpoint: unexpected key "
                                         f"{raw_key!r}")
    if style is None or not backbone:
        raise MetricUnavailableError(
            f"{where} is not a CSD checkpoint: it lacks "
            f"{'the style head ' + _STYLE if style is None else 'the backbone.* weights'}")
    if "proj" in backbone:
        raise MetricUnavailableError(f"{where} is not a CSD checkpoint: its backbone keeps CLIP's "
                                     "own projection (backbone.proj)")
    return backbone, style


def csd_vision_config(backbone: dict[str, Any], style: Any, *, where: str) -> Any:
    """The ``CLIPVisionConfig`` of a CSD backbone, read off its tensor shapes."""
    from transformers import CLIPVisionConfig

    try:
        width, _, patch, _ = backbone["conv1.weight"].shape
        positions = backbone["positional_embedding"].shape[0]
        blocks = {int(m.group(1)) for k in backbone if (m := _BLOCK.match(k))}
        intermediate = backbone["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as exc:
        raise MetricUnavailableError(f"{where} is not a CSD checkpoint: no backbone.{exc.args[0]}"
                                     ) from None
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1 or blocks != set(range(len(blocks))):
        raise MetricUnavailableError(f"{where} is not a CSD checkpoint: {positions} positions and "
                                     f"blocks {sorted(blocks)} do not form a ViT")
    if tuple(style.shape[:1]) != (width,) or style.ndim != 2 or width % HEAD_WIDTH:
        raise MetricUnavailableError(
            f"{where} is not a CSD checkpoint: style head {tuple(style.shape)} does not fit the "
            f"backbone width {width}")
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=intermediate, projection_dim=style.shape[1],
        num_hidden_layers=len(blocks), num_attention_heads=width // HEAD_WIDTH,
        image_size=grid * patch, patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def csd_to_transformers(backbone: dict[str, Any], style: Any) -> dict[str, torch.Tensor]:
    """Rename OpenAI CLIP image-tower tensors to transformers' ``CLIPVisionModelWithProjection``
    names; the fused attention input projection is split into q, k, v; the style head becomes
    ``visual_projection`` (transposed: OpenAI multiplies ``x @ proj``, a Linear ``x @ W.T``)."""
    mapped: dict[str, Any] = {"visual_projection.weight": style.t().contiguous()}
    for key, value in backbone.items():
        if key in _TOP_NAMES:
            mapped[f"vision_model.{_TOP_NAMES[key]}"] = value
            continue
        match = _BLOCK.match(key)
        prefix = f"vision_model.encoder.layers.{match.group(1)}." if match else ""
        name = match.group(2) if match else key
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = name.rsplit("_", 1)[1]
            for part, tensor in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                mapped[f"{prefix}self_attn.{part}_proj.{kind}"] = tensor.contiguous()
        elif match and name in _BLOCK_NAMES:
            mapped[prefix + _BLOCK_NAMES[name]] = value
        else:
            mapped[f"unknown.{key}"] = value  # reported by the strict load
    return mapped


def csd_transform(image_size: int) -> Any:
    """CSD's evaluation transform: bicubic resize of the shorter side, centre crop, CLIP
    normalisation (``transforms_branch0`` of the CSD repository, at the model's input size)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def load_csd(source: str, *, what: str) -> tuple[Any, Any]:
    """Load CSD weights as (``CLIPVisionModelWithProjection`` in eval mode, image transform).

    ``image_embeds`` of that model is the (unnormalised) CSD style embedding.
    """
    reason = missing_package("transformers", "torchvision")
    if reason is not None:
        raise MetricUnavailableError(f"{what}: {reason}")
    path = csd_file(source)
    if path is None and looks_like_repo_id(source) and not is_offline():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, "pytorch_model.bin"))
    if path is None:
        raise MetricUnavailableError(csd_weights_problem(source, what=what) or
                                     f"{what}: {source!r} not found")
    import torch
    from transformers import CLIPVisionModelWithProjection

    where = f"{what}: {str(path)!r}"
    backbone, style = split_csd_state(read_csd_state(path), where=where)
    config = csd_vision_config(backbone, style, where=where)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    mapped = csd_to_transformers(backbone, style)
    expected = set(model.state_dict())
    if set(mapped) != expected:
        missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
        raise MetricUnavailableError(f"{where} does not map onto a CLIP image tower: missing "
                                     f"{missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True, assign=True)
    # Non-persistent buffers (position ids) are not in the state dict: rebuild them for real.
    embeddings = model.vision_model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions)[None],
                               persistent=False)
    return model.eval().requires_grad_(False), csd_transform(config.image_size)
