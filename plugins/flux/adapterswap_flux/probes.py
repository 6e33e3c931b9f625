"""Stream-norm probes inside the FLUX transformer (see :mod:`adapterswap.probes`).

Two measurements, both taken with forward hooks that only read tensors, so outputs never change:

- **InfuseNet** (``residual/hidden``): after each double and single block, the norm of the
  ControlNet residual the transformer is about to add, over the norm of the block's image-token
  hidden state it is added to. The residuals are read from the transformer call's own keyword
  arguments (a forward pre-hook), with the transformer's block-to-residual mapping, so a call
  without InfuseNet records nothing.
- **FLUX joint attention** (``text/image``): after each block, the RMS of the text-token stream
  over the RMS of the image-token stream (RMS, not the plain norm, because the two streams have
  different lengths: 512 text tokens against 4096 image tokens at 1024 px).

Each record holds one value per sample of the batch, for :class:`adapterswap.probes.ProbeRecorder`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

#: Quantity names recorded by the two probes.
RESIDUAL_QUANTITY = "residual/hidden"
STREAM_QUANTITY = "text/image"


def _image_stream(output: Any, tokens: int | None = None) -> torch.Tensor:
    """The image-token hidden state of a block's output: ``(encoder, hidden)`` tuples in current
    diffusers; older single blocks return one concatenated tensor (text first)."""
    if isinstance(output, tuple):
        return output[-1]
    return output if tokens is None else output[:, -tokens:]


def rms_ratio(numerator: torch.Tensor, denominator: torch.Tensor,
              eps: float = 1e-12) -> torch.Tensor:
    """Per-sample ``rms(a) / rms(b)`` in float32."""
    a = numerator.detach().float().flatten(1)
    b = denominator.detach().float().flatten(1)
    return (a.norm(dim=1) / math.sqrt(a.shape[1])) / \
        (b.norm(dim=1) / math.sqrt(b.shape[1])).clamp_min(eps)


class TransformerHooks:
    """Forward hooks on every double and single block of a FLUX transformer.

    ``on_block(kind, index, output, call_kwargs)`` runs after each block, where ``kind`` is
    ``"double"`` or ``"single"`` and ``call_kwargs`` are the keyword arguments of the current
    transformer call. :meth:`remove` takes every hook off again.
    """

    def __init__(self, transformer: Any,
                 on_block: Callable[[str, int, Any, dict[str, Any]], None]) -> None:
        self.transformer = transformer
        self.call_kwargs: dict[str, Any] = {}
        self.handles = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True)]
        for kind, blocks in (("double", transformer.transformer_blocks),
                             ("single", transformer.single_transformer_blocks)):
            for index, block in enumerate(blocks):
                self.handles.append(block.register_forward_hook(
                    lambda module, args, output, kind=kind, index=index:
                        on_block(kind, index, output, self.call_kwargs)))

    def _pre(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.call_kwargs = dict(kwargs)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.call_kwargs = {}


def residual_for(kind: str, index: int, num_blocks: int, call_kwargs: dict[str, Any]) -> Any:
    """The ControlNet residual the transformer adds after block ``index`` (or ``None``), with
    diffusers' mapping: block ``i`` takes residual ``i // ceil(blocks / residuals)`` (or
    ``i % residuals`` for repeating controlnets, double blocks only)."""
    key = "controlnet_block_samples" if kind == "double" else "controlnet_single_block_samples"
    samples = call_kwargs.get(key)
    if not samples:
        return None
    if kind == "double" and call_kwargs.get("controlnet_blocks_repeat"):
        return samples[index % len(samples)]
    return samples[index // int(math.ceil(num_blocks / len(samples)))]


def residual_probe(transformer: Any, record: Callable[[str, str, Any], None]) -> TransformerHooks:
    """Hooks recording ``||residual|| / ||hidden||`` per block into ``record``."""
    counts = {"double": len(transformer.transformer_blocks),
              "single": len(transformer.single_transformer_blocks)}

    def on_block(kind: str, index: int, output: Any, call_kwargs: dict[str, Any]) -> None:
        from adapterswap.probes import relative_norm

        residual = residual_for(kind, index, counts[kind], call_kwargs)
        if residual is None:
            return
        hidden = _image_stream(output, residual.shape[1])
        record(f"{kind}.{index}", RESIDUAL_QUANTITY, relative_norm(residual, hidden))

    return TransformerHooks(transformer, on_block)


def stream_probe(transformer: Any, record: Callable[[str, str, Any], None]) -> TransformerHooks:
    """Hooks recording the text/image stream RMS ratio after each block into ``record``."""

    def on_block(kind: str, index: int, output: Any, call_kwargs: dict[str, Any]) -> None:
        if not isinstance(output, tuple) or len(output) != 2:
            return  # older single blocks mix the streams: nothing to separate
        text, image = output
        record(f"{kind}.{index}", STREAM_QUANTITY, rms_ratio(text, image))

    return TransformerHooks(transformer, on_block)
