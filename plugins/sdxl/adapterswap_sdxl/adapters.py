"""``style-ip-adapter``: h94's SDXL IP-Adapter with InstantStyle block targeting.

The adapter is h94's ``sdxl_models/ip-adapter_sdxl.safetensors`` (4 image tokens from the
projected ViT-bigG embedding, ``sdxl_models/image_encoder``), run through diffusers' native
IP-Adapter support. InstantStyle (Wang et al., arXiv 2404.02733) found that SDXL's
``up_blocks.0.attentions.1`` carries style and ``down_blocks.2.attentions.1`` layout, and injects
the image features only there; the ``target`` option picks:

* ``"style"`` (default): ``{"up": {"block_0": [0.0, 1.0, 0.0]}}``;
* ``"style+layout"``: ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}``;
* ``"global"``: every cross-attention layer (the plain IP-Adapter);
* or any dict in that format (the one diffusers' ``set_ip_adapter_scale`` takes).

Each layer's scale is the target's value times the adapter scale.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError
from adapterswap.kit.instantstyle import block_scales
from adapterswap.kit.ip_adapter import DiffusersIPAdapter
from adapterswap.kit.tiny import (
    build_once,
    random_image_projection,
    random_ip_layers,
    save_ip_adapter_files,
    save_tiny_image_encoder,
)

if TYPE_CHECKING:
    from adapterswap.backbone import Backbone

#: InstantStyle's targets for SDXL's block layout.
TARGETS: dict[str, Any] = {
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "style+layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
    "global": 1.0,
}


class StyleIPAdapter(DiffusersIPAdapter):
    """h94 IP-Adapter for SDXL with InstantStyle targeting (``target`` option, see module)."""

    name = "style-ip-adapter"
    kind = "style"
    families = frozenset({"sdxl"})
    default_scale = 1.0
    default_weight_name = "sdxl_models/ip-adapter_sdxl.safetensors"
    default_image_encoder_folder = "sdxl_models/image_encoder"
    required_files = (default_weight_name, f"{default_image_encoder_folder}/config.json")
    option_names = ("target", "weight_name", "image_encoder_folder")
    how_to_get = ("`hf download h94/IP-Adapter --include 'sdxl_models/ip-adapter_sdxl.*' "
                  "'sdxl_models/image_encoder/*'` (Apache-2.0), or pass a local copy with the "
                  "same layout as source.")
    description = "IP-Adapter SDXL (h94) with InstantStyle style/layout block targeting"

    def __init__(self, source: str | None = None, *, scale: float | None = None,
                 start: float = 0.0, end: float = 1.0, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        super().__init__(source, scale=scale, start=start, end=end, device=device,
                         dtype=dtype, **options)
        target = options.get("target", "style")
        if isinstance(target, str) and target not in TARGETS:
            raise InvalidArgumentError(
                "target", target, f"choose {', '.join(TARGETS)} or an InstantStyle dict such "
                                  "as {\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}")
        if not isinstance(target, (str, Mapping)):
            raise InvalidArgumentError("target", target,
                                       "expected a target name or an InstantStyle dict")
        self.target = copy.deepcopy(target)

    def layer_scales(self, unet: Any) -> dict[str, float]:
        """The target's scale per IP processor of this UNet (checked against its blocks)."""
        spec = TARGETS[self.target] if isinstance(self.target, str) else self.target
        return block_scales(unet, spec, argument="target", shown=self.target)

    @staticmethod
    def random_weights(unet: Any, device: Any, dtype: Any, seed: int) -> tuple[Any, ...]:
        """Published-size random weights for the ``random`` preset."""
        from adapterswap_sdxl.published import random_style_weights

        return random_style_weights(unet, device, dtype, seed)

    @classmethod
    def tiny(cls, backbone: Backbone, seed: int = 0, *, cache_dir: str | None = None,
             **kwargs: Any) -> StyleIPAdapter:
        """Random weights shaped for ``backbone``'s UNet, saved in h94's layout
        (``sdxl_models/ip-adapter_sdxl.safetensors``, the legacy ``.bin``, and a tiny 224 px
        CLIP encoder in ``sdxl_models/image_encoder``), loaded through ``load``."""
        from adapterswap.presets import tiny_dir

        unet = backbone.pipe.unet

        def build(tmp: Path) -> None:
            import torch

            generator = torch.Generator().manual_seed(seed)
            projection_dim = 40
            image_proj = random_image_projection(  # 4 tokens from the projected embedding
                generator, cross_attention_dim=unet.config.cross_attention_dim,
                projection_dim=projection_dim)
            state = {"image_proj": image_proj, "ip_adapter": random_ip_layers(unet, generator)}
            save_ip_adapter_files(tmp / "sdxl_models", "ip-adapter_sdxl", state)
            save_tiny_image_encoder(tmp / "sdxl_models" / "image_encoder", seed,
                                    hidden_size=48, projection_dim=projection_dim)

        path = build_once(tiny_dir(f"{cls.name}-{_unet_tag(unet)}", seed, cache_dir), build)
        kwargs.setdefault("device", backbone.device)
        kwargs.setdefault("dtype", backbone.dtype)
        return cls(str(path), **kwargs).load()


def _unet_tag(unet: Any) -> str:
    """A short tag of the UNet shape the tiny weights were made for (cache key)."""
    channels = "-".join(map(str, unet.config.block_out_channels))
    return f"c{unet.config.cross_attention_dim}-{channels}"
