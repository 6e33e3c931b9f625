"""Reading and checking h94 IP-Adapter weight files before diffusers sees them.

An h94 file holds two parts: ``image_proj`` (the projection from CLIP image features to image
tokens: a linear layer + norm for the plain IP-Adapter, a Perceiver resampler for IP-Adapter
Plus) and ``ip_adapter`` (a ``to_k_ip`` / ``to_v_ip`` pair per cross-attention layer, numbered
``1, 3, 5, ...``). diffusers fails late and obscurely on a truncated, incomplete or mismatched
file; these checks fail early with one error naming the file and the missing or misfit keys.

* :func:`read_ip_adapter_file`: ``.safetensors`` or the legacy pickled ``.bin`` as
  ``{"image_proj": {...}, "ip_adapter": {...}}``, checked for completeness;
* :func:`missing_image_proj_keys` / :func:`missing_ip_layer_keys`: what a part lacks;
* :func:`check_ip_layers`: the layers fit a given UNet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adapterswap.errors import InvalidArgumentError, WeightsNotFoundError
from adapterswap.kit.ip_adapter_install import ip_layer_shapes

_PARTS = ("image_proj", "ip_adapter")


def read_ip_adapter_file(path: str | Path, *,
                         what: str = "IP-Adapter") -> dict[str, dict[str, Any]]:
    """An h94 IP-Adapter file as ``{"image_proj": {...}, "ip_adapter": {...}}``.

    ``.safetensors`` files hold flat keys prefixed ``image_proj.`` / ``ip_adapter.``; the legacy
    ``.bin`` files a pickled dict of the two, read with ``weights_only=True`` (a pickle that
    needs more raises :class:`~adapterswap.errors.UnsafeWeightsError`). A truncated file, a file
    missing one of the two parts or with an incomplete set of ``ip_adapter`` layers raises
    :class:`~adapterswap.errors.WeightsNotFoundError` naming the file and the missing keys.
    """
    from adapterswap.weights import read_pickle

    path = Path(path)
    state = _read_safetensors(path, what) if path.suffix == ".safetensors" \
        else read_pickle(path, what=what)
    if not isinstance(state, Mapping) or not any(
            isinstance(state.get(part), Mapping) and state[part] for part in _PARTS):
        found = (sorted(map(str, state)) or "no weights") if isinstance(state, Mapping) \
            else type(state).__name__
        raise InvalidArgumentError(
            "weight_name", str(path),
            f"not an IP-Adapter file: expected 'image_proj' and 'ip_adapter' weights, found "
            f"{found}")
    for part in _PARTS:
        if not isinstance(state.get(part), Mapping) or not state[part]:
            raise WeightsNotFoundError(
                f"{what}: {str(path)!r} is incomplete: it has no {part!r} weights (no "
                f"{part}.* keys)")
    missing = missing_ip_layer_keys(state["ip_adapter"])
    if missing:
        raise WeightsNotFoundError(
            f"{what}: {str(path)!r} is incomplete: the ip_adapter layers lack "
            f"{listed([f'ip_adapter.{k}' for k in missing])}")
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}


def _read_safetensors(path: Path, what: str) -> dict[str, Any]:
    """The flat keys of an h94 ``.safetensors`` file grouped by part (other prefixes kept as
    ``None`` so the error can name them)."""
    from safetensors import safe_open

    from adapterswap.weights import check_safetensors

    check_safetensors(path, what=what)
    state: dict[str, Any] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                part, _, rest = key.partition(".")
                if part in _PARTS:
                    state.setdefault(part, {})[rest] = f.get_tensor(key)
                else:
                    state.setdefault(part, None)
    except Exception as exc:  # SafetensorError: corrupt past the header
        raise WeightsNotFoundError(
            f"{what}: {str(path)!r} is a truncated or corrupt safetensors file ({exc}); "
            "download it again") from None
    return state


def listed(items: Sequence[str], limit: int = 4) -> str:
    """``items`` joined with commas, the first ``limit`` of them and a count of the rest."""
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more"
                                       if len(items) > limit else "")


_IP_LAYER = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


def missing_ip_layer_keys(layers: Mapping[str, Any]) -> list[str]:
    """Keys an h94 ``ip_adapter`` state dict lacks to be complete in itself: every layer
    ``1, 3, 5, ...`` up to the highest one present has ``to_k_ip`` and ``to_v_ip``."""
    indices = {int(m.group(1)) for key in layers if (m := _IP_LAYER.match(key))}
    if not indices:
        return [] if any(".to_k_ip." in k for k in layers) else ["1.to_k_ip.weight",
                                                                  "1.to_v_ip.weight"]
    return [f"{i}.{kind}.weight" for i in range(1, max(indices) + 1, 2)
            for kind in ("to_k_ip", "to_v_ip") if f"{i}.{kind}.weight" not in layers]


def check_ip_layers(layers: Mapping[str, Any], unet: Any, *, what: str, where: str) -> None:
    """The ``ip_adapter`` weights fit ``unet``: one ``to_k_ip``/``to_v_ip`` pair per
    cross-attention layer, shaped ``(hidden size, cross_attention_dim)``; else
    :class:`~adapterswap.errors.WeightsNotFoundError` naming ``where`` and the keys."""
    cross = unet.config.cross_attention_dim
    missing, wrong = [], []
    shapes = ip_layer_shapes(unet)
    for index, (_, hidden) in enumerate(shapes):
        for kind in ("to_k_ip", "to_v_ip"):
            key = f"{2 * index + 1}.{kind}.weight"
            if key not in layers:
                missing.append(f"ip_adapter.{key}")
            elif tuple(layers[key].shape) != (hidden, cross):
                wrong.append(f"ip_adapter.{key} is {tuple(layers[key].shape)} but the UNet "
                             f"needs {(hidden, cross)}")
    extra = sorted(k for k in layers if (m := _IP_LAYER.match(k))
                   and int(m.group(1)) > 2 * len(shapes) - 1)
    if missing:
        raise WeightsNotFoundError(
            f"{what}: {where!r} lacks {listed(missing)}, which this UNet's {len(shapes)} "
            "cross-attention layers need: the file is incomplete or for another model")
    if wrong or extra:
        detail = listed(wrong) if wrong else (
            f"it has IP layers up to {extra[-1]}, the UNet {len(shapes)} cross-attention layers")
        raise WeightsNotFoundError(
            f"{what}: {where!r} was made for another UNet: {detail}")


_PLAIN_PROJ = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
_PLUS_PROJ = ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias",
              "norm_out.weight", "norm_out.bias")
_PLUS_LAYER = ("0.norm1.weight", "0.norm1.bias", "0.norm2.weight", "0.norm2.bias",
               "0.to_q.weight", "0.to_kv.weight", "0.to_out.weight", "1.0.weight", "1.0.bias",
               "1.1.weight", "1.3.weight")


def missing_image_proj_keys(image_proj: Mapping[str, Any], *, plus: bool) -> list[str]:
    """Keys an h94 ``image_proj`` state dict lacks for its layout: the plain IP-Adapter's linear
    projection + norm, or IP-Adapter Plus's resampler (``layers.<i>`` from 0 to the highest).
    A file of another layout (sharing no key with this one) is left to diffusers."""
    if not plus:
        expected = list(_PLAIN_PROJ)
    else:
        depth = {int(m.group(1)) for k in image_proj if (m := re.match(r"^layers\.(\d+)\.", k))}
        expected = list(_PLUS_PROJ) + [f"layers.{i}.{key}"
                                       for i in range(max(depth, default=0) + 1)
                                       for key in _PLUS_LAYER]
    if not any(key in image_proj for key in expected):
        return []
    return [key for key in expected if key not in image_proj]
