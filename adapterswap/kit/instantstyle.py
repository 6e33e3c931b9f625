"""Per-layer IP-Adapter scales: InstantStyle block targeting (Wang et al., arXiv 2404.02733).

InstantStyle injects the reference's image features only into the attention layers that carry
style (and optionally layout) instead of every cross-attention layer. :func:`block_scales`
turns a target in the format of diffusers' ``set_ip_adapter_scale`` into one scale per IP
processor of a given UNet, refusing blocks the UNet lacks where diffusers would silently ignore
them; :func:`set_ip_scales` puts such scales on the installed processors before a forward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from adapterswap.errors import InvalidArgumentError
from adapterswap.kit.ip_adapter_install import cross_attention_names, ip_processors

_BLOCK = re.compile(r"^block_(\d+)$")
_PROCESSOR = re.compile(r"^(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0


def block_scales(unet: Any, target: float | Mapping[str, Any], *,
                 argument: str = "target", shown: Any = None) -> dict[str, float]:
    """Per-processor IP-Adapter scales for ``target`` on this UNet.

    ``target`` is a number (every cross-attention layer) or an InstantStyle dict as diffusers'
    ``set_ip_adapter_scale`` takes it: ``{"down": ..., "mid": ..., "up": ...}`` where ``down``
    and ``up`` are a number or ``{"block_<i>": number or [one per attention of the block]}``;
    layers it does not name get 0. A block the UNet lacks, a block without attention or a list
    of the wrong length raises :class:`InvalidArgumentError` naming ``argument`` and ``shown``
    (default: ``target``), where diffusers would silently ignore or fail later.
    """
    names = cross_attention_names(unet)
    shown = target if shown is None else shown
    if _number(target):
        return {name: float(target) for name in names}
    if not isinstance(target, Mapping):
        raise InvalidArgumentError(argument, shown, "expected a number or an InstantStyle dict")

    def bad(reason: str) -> InvalidArgumentError:
        return InvalidArgumentError(argument, shown, reason)

    unknown = sorted(set(target) - {"down", "mid", "up"})
    if unknown:
        raise bad(f"unknown key(s) {', '.join(map(repr, unknown))}; use 'down', 'mid', 'up'")
    blocks = {"down": unet.down_blocks, "up": unet.up_blocks}
    per_attention: dict[tuple[str, int, int], float] = {}
    for side in ("down", "up"):
        with_attention = {i: len(b.attentions) for i, b in enumerate(blocks[side])
                          if getattr(b, "attentions", None)}
        available = ", ".join(f"block_{i} ({n} attentions)" for i, n in with_attention.items())
        spec = target.get(side, 0.0)
        if _number(spec):
            spec = {f"block_{i}": spec for i in with_attention}
        if not isinstance(spec, Mapping):
            raise bad(f"{side!r} must be a number or a dict of block_<i> entries")
        for key, value in spec.items():
            match = _BLOCK.match(str(key))
            if match is None:
                raise bad(f"{side}.{key}: block keys are named block_<i>")
            index = int(match.group(1))
            if index not in with_attention:
                raise bad(f"this UNet has no {side}_blocks.{index} with attention layers "
                          f"({side} blocks with attention: {available or 'none'})")
            count = with_attention[index]
            values = [value] * count if _number(value) else value
            if not (isinstance(values, (list, tuple)) and len(values) == count
                    and all(_number(v) for v in values)):
                raise bad(f"{side}.{key} needs a number or a list of {count} numbers >= 0 "
                          f"(one per attention of {side}_blocks.{index}), got {value!r}")
            for j, v in enumerate(values):
                per_attention[(side, index, j)] = float(v)
    mid = target.get("mid", 0.0)
    if isinstance(mid, (list, tuple)) and len(mid) == 1:
        mid = mid[0]
    if not _number(mid):
        raise bad(f"'mid' must be a number >= 0, got {mid!r}")
    scales = {}
    for name in names:
        match = _PROCESSOR.match(name)
        if match:
            side, i, j = match.group(1), int(match.group(2)), int(match.group(3))
            scales[name] = per_attention.get((side, i, j), 0.0)
        else:  # mid_block
            scales[name] = float(mid)
    return scales


def set_ip_scales(unet: Any, scales: Mapping[str, float] | None) -> None:
    """Set every IP processor's scale (``None``: all 0, which diffusers' processors skip, so the
    output is exactly the no-adapter one)."""
    for name, proc in ip_processors(unet).items():
        value = float(scales.get(name, 0.0)) if scales else 0.0
        if proc.scale != [value] * len(proc.scale):
            proc.scale = [value] * len(proc.scale)
