"""The typed conditioning an IP-Adapter hands a UNet backbone at every step.

:meth:`adapterswap.kit.ip_adapter.DiffusersIPAdapter.denoiser_inputs` returns an
:class:`IPAdapterInputs`; :meth:`adapterswap.kit.unet_backbone.UNetBackbone.predict` takes it as
``adapter_inputs``, checks it against its UNet and batch (:func:`split_ip_inputs`) and runs one
UNet forward per group of rows sharing IP scales (:mod:`adapterswap.kit.rows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.kit.ip_adapter_install import has_ip_adapter
from adapterswap.kit.rows import group_rows

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class IPAdapterInputs:
    """One step's IP-Adapter conditioning for a batch of ``B`` rows.

    :ivar image_embeds: one ``(B, ...)`` tensor per IP-Adapter: the reference's image
        embeddings (the projected embedding, or penultimate hidden states for IP-Adapter Plus),
        as diffusers' ``ip_adapter_image_embeds`` takes them without the CFG rows.
    :ivar negative_image_embeds: the unconditional embeddings, shaped alike; classifier-free
        guidance needs them (they go before ``image_embeds``, as the pipeline batches
        ``[uncond; cond]``). ``None`` without guidance.
    :ivar scales: one entry per row: ``{IP processor name: scale}`` for a row inside the
        adapter's window, ``None`` (or all scales 0) outside it, where the row gets exactly the
        no-adapter output.
    """

    image_embeds: Sequence[torch.Tensor]
    negative_image_embeds: Sequence[torch.Tensor] | None
    scales: Sequence[Mapping[str, float] | None]


def split_ip_inputs(adapter_inputs: IPAdapterInputs | None, unet: Any, batch: int,
                    backbone: str) -> tuple[Any, Any, list[list[int]], list[Any]]:
    """Validate ``predict``'s IP-Adapter inputs and group the rows by their scales.

    Returns ``(embeds, negative_embeds, groups, group_scales)``: rows that share scales form
    one group and one UNet forward (:func:`adapterswap.kit.rows.group_rows`). Without inputs
    there is one group and no embeddings. Inputs of another type, rows that do not match
    ``batch``, inputs without an installed IP-Adapter or an installed IP-Adapter without inputs
    raise an error naming ``backbone``.
    """
    if not adapter_inputs:
        if has_ip_adapter(unet):
            raise UsageError(
                f"backbone {backbone!r} has an IP-Adapter attached but predict got no adapter "
                "inputs: pass the adapter's denoiser_inputs, or detach the adapter")
        return None, None, [list(range(batch))], [None]
    if not isinstance(adapter_inputs, IPAdapterInputs):
        shown = sorted(adapter_inputs) if isinstance(adapter_inputs, Mapping) \
            else type(adapter_inputs).__name__
        raise InvalidArgumentError(
            "adapter_inputs", shown,
            f"backbone {backbone!r} takes IPAdapterInputs (an IP-Adapter's denoiser_inputs)")
    if not has_ip_adapter(unet):
        raise UsageError(f"backbone {backbone!r} got IP-Adapter inputs but no IP-Adapter is "
                         "attached: call adapter.attach(backbone) first")
    for name in ("image_embeds", "scales"):
        if getattr(adapter_inputs, name) is None:
            raise InvalidArgumentError("adapter_inputs", adapter_inputs,
                                       f"backbone {backbone!r} needs {name!r}")
    embeds = list(adapter_inputs.image_embeds)
    negative = adapter_inputs.negative_image_embeds
    scales = list(adapter_inputs.scales)
    if len(scales) != batch or any(e.shape[0] != batch for e in embeds):
        rows = {"image_embeds": [int(e.shape[0]) for e in embeds], "scales": len(scales)}
        raise InvalidArgumentError("adapter_inputs", rows,
                                   f"need one row per sample ({batch})")
    groups, group_scales = group_rows(scales)
    return embeds, negative, groups, group_scales
