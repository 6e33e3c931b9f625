"""``object-ip-adapter``: h94's IP-Adapter Plus for SD 1.5.

``models/ip-adapter-plus_sd15.safetensors`` (Ye et al., arXiv 2308.06721): a Perceiver
resampler turns the penultimate hidden states of the ViT-H CLIP image encoder
(``models/image_encoder``) into 16 image tokens that every cross-attention layer of the UNet
attends to through its own key/value projections, scaled by the adapter scale. It keeps the
reference object's fine detail better than the plain IP-Adapter, which sees only the pooled
embedding. Runs through diffusers' native IP-Adapter support.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.kit.ip_adapter import DiffusersIPAdapter
from adapterswap.kit.tiny import (
    build_once,
    random_ip_layers,
    save_ip_adapter_files,
    save_tiny_image_encoder,
)

if TYPE_CHECKING:
    import torch

    from adapterswap.backbone import Backbone


class ObjectIPAdapter(DiffusersIPAdapter):
    """h94 IP-Adapter Plus for SD 1.5 on every cross-attention layer."""

    name = "object-ip-adapter"
    kind = "object"
    families = frozenset({"sd15"})
    default_scale = 1.0
    default_weight_name = "models/ip-adapter-plus_sd15.safetensors"
    default_image_encoder_folder = "models/image_encoder"
    uses_hidden_states = True
    required_files = (default_weight_name, f"{default_image_encoder_folder}/config.json")
    how_to_get = ("`hf download h94/IP-Adapter --include 'models/ip-adapter-plus_sd15.*' "
                  "'models/image_encoder/*'` (Apache-2.0), or pass a local copy with the same "
                  "layout as source.")
    description = "IP-Adapter Plus SD 1.5 (h94): resampled ViT-H patch features"

    @staticmethod
    def random_weights(unet: Any, device: Any, dtype: Any, seed: int) -> tuple[Any, ...]:
        """Published-size random weights for the ``random`` preset."""
        from adapterswap_sd15.published import random_plus_weights

        return random_plus_weights(unet, device, dtype, seed)

    @classmethod
    def tiny(cls, backbone: Backbone, seed: int = 0, *, cache_dir: str | None = None,
             **kwargs: Any) -> ObjectIPAdapter:
        """Random weights shaped for ``backbone``'s UNet, saved in h94's layout
        (``models/ip-adapter-plus_sd15.safetensors``, the legacy ``.bin``, and a tiny 224 px CLIP
        encoder in ``models/image_encoder``), loaded through ``load``."""
        import torch

        from adapterswap.presets import tiny_dir

        unet = backbone.pipe.unet

        def build(tmp: Path) -> None:
            generator = torch.Generator().manual_seed(seed)
            hidden_size = 48
            state = {"image_proj": random_resampler(
                generator, dim=unet.config.cross_attention_dim, embedding_dim=hidden_size,
                output_dim=unet.config.cross_attention_dim),
                "ip_adapter": random_ip_layers(unet, generator)}
            save_ip_adapter_files(tmp / "models", "ip-adapter-plus_sd15", state)
            save_tiny_image_encoder(tmp / "models" / "image_encoder", seed,
                                    hidden_size=hidden_size, projection_dim=40)

        channels = "-".join(map(str, unet.config.block_out_channels))
        tag = f"c{unet.config.cross_attention_dim}-{channels}"
        path = build_once(tiny_dir(f"{cls.name}-{tag}", seed, cache_dir), build)
        kwargs.setdefault("device", backbone.device)
        kwargs.setdefault("dtype", backbone.dtype)
        return cls(str(path), **kwargs).load()


def random_resampler(generator: torch.Generator, *, dim: int, embedding_dim: int,
                     output_dim: int, depth: int = 4, heads: int = 12, dim_head: int = 64,
                     num_queries: int = 16, ff_mult: int = 4) -> dict[str, torch.Tensor]:
    """Random IP-Adapter Plus resampler weights with the original implementation's key names
    (``latents``, ``proj_in``, ``layers.<i>.0`` attention, ``layers.<i>.1`` feed-forward,
    ``proj_out``, ``norm_out``). Defaults are h94's SD 1.5 Plus settings (12 heads of 64,
    depth 4, 16 queries)."""
    import torch

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(width, generator=generator),
                f"{prefix}.bias": 0.1 * torch.randn(width, generator=generator)}

    inner = heads * dim_head
    state = {
        "latents": torch.randn(1, num_queries, dim, generator=generator) / dim ** 0.5,
        "proj_in.weight": linear(dim, embedding_dim),
        "proj_in.bias": 0.1 * torch.randn(dim, generator=generator),
        "proj_out.weight": linear(output_dim, dim),
        "proj_out.bias": 0.1 * torch.randn(output_dim, generator=generator),
        **norm("norm_out", output_dim),
    }
    for i in range(depth):
        state.update(norm(f"layers.{i}.0.norm1", dim))
        state.update(norm(f"layers.{i}.0.norm2", dim))
        state[f"layers.{i}.0.to_q.weight"] = linear(inner, dim)
        state[f"layers.{i}.0.to_kv.weight"] = linear(2 * inner, dim)
        state[f"layers.{i}.0.to_out.weight"] = linear(dim, inner)
        state.update(norm(f"layers.{i}.1.0", dim))
        state[f"layers.{i}.1.1.weight"] = linear(ff_mult * dim, dim)
        state[f"layers.{i}.1.3.weight"] = linear(dim, ff_mult * dim)
    return state
