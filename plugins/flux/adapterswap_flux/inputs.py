"""What an adapter hands a FLUX backbone at one step: :class:`FluxDenoiserInputs`.

An adapter's :meth:`~adapterswap.adapter.Adapter.denoiser_inputs` returns one of these (or
``None`` when it acts on no row of the batch at this step) and
:meth:`FluxBackbone.predict <adapterswap_flux.backbones.FluxBackbone.predict>` passes its
fields to the transformer under diffusers' own argument names. A plain mapping with those
names is accepted too (it is checked and converted), so an adapter written against diffusers'
keyword arguments works unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from adapterswap.errors import UsageError


@dataclass(frozen=True)
class FluxDenoiserInputs:
    """Extra inputs of one ``FluxTransformer2DModel`` forward for the whole batch.

    :ivar controlnet_block_samples: ControlNet residuals ``(B, L, D)`` added to the image
        tokens after the double-stream blocks (block ``i`` gets residual
        ``i // ceil(len(blocks) / len(residuals))``), already multiplied by the adapter's
        scale per row: a row where the adapter is inactive gets zeros (or the adapter returns
        ``None`` for the whole step when no row is active).
    :ivar controlnet_single_block_samples: the same for the single-stream blocks.
    :ivar controlnet_blocks_repeat: diffusers' flag for ControlNets with an input hint block
        (residuals repeated over blocks instead of spread).
    :ivar joint_attention_kwargs: passed to the attention processors (e.g. an IP-Adapter's
        image embeddings for processors that take them).
    """

    controlnet_block_samples: Sequence[Any] | None = None
    controlnet_single_block_samples: Sequence[Any] | None = None
    controlnet_blocks_repeat: bool = False
    joint_attention_kwargs: Mapping[str, Any] | None = None

    @classmethod
    def coerce(cls, value: Any, *, backbone: str) -> FluxDenoiserInputs | None:
        """``value`` as a :class:`FluxDenoiserInputs`: ``None`` or an empty mapping is
        ``None`` (no adapter input); a mapping must use the field names (an unknown one is
        refused, naming it and the backbone)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            if not value:
                return None
            known = [f.name for f in fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise UsageError(f"backbone {backbone!r} does not understand adapter inputs "
                                 f"{unknown}; it takes {known}")
            return cls(**value)
        raise UsageError(f"backbone {backbone!r} takes adapter inputs as FluxDenoiserInputs "
                         f"(or a mapping of its fields), not {type(value).__name__}")

    def transformer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``FluxTransformer2DModel.forward`` these fields are."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
