"""InfiniteYou's image projection: a Perceiver resampler from one ArcFace vector to ID tokens.

InfiniteYou's ``image_proj_model.bin`` holds, under the key ``image_proj``, the state dict of a
Perceiver-style resampler (the IP-Adapter Plus / open_flamingo design): 8 learned queries of
width 1280 attend, through 4 layers of 20 heads of 64, to the projected 512-d ArcFace embedding;
the result is projected to FLUX's 4096-d text width and layer-normalised. Those 8 tokens are
InfuseNet's ``encoder_hidden_states``.

This module is written from that description with the checkpoint's parameter names::

    latents                       (1, num_queries, dim)
    proj_in.{weight,bias}         embedding_dim -> dim
    proj_out.{weight,bias}        dim -> output_dim
    norm_out.{weight,bias}        LayerNorm(output_dim)
    layers.N.0.norm1 / norm2      LayerNorm(dim) for the image features / the latents
    layers.N.0.to_q / to_kv / to_out   bias-free projections (heads * dim_head inner width)
    layers.N.1.0 / .1 / .3        feed-forward: LayerNorm, Linear(dim, mult*dim), GELU, Linear

:meth:`Resampler.from_state_dict` reads every size back from the tensors' shapes (the head width
is 64, as InfiniteYou constructs it), so the published checkpoint and the tiny test checkpoint go
through the same loader.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: InfiniteYou builds the resampler with ``dim_head=64``; the checkpoint does not record it.
DIM_HEAD = 64


@dataclass(frozen=True)
class ResamplerConfig:
    """Sizes of a :class:`Resampler`; :meth:`infiniteyou` gives the published one."""

    dim: int = 1280
    depth: int = 4
    dim_head: int = DIM_HEAD
    heads: int = 20
    num_queries: int = 8
    embedding_dim: int = 512
    output_dim: int = 4096
    ff_mult: int = 4

    @classmethod
    def infiniteyou(cls) -> ResamplerConfig:
        """InfiniteYou-FLUX v1.0: dim 1280, depth 4, 20 heads of 64, 8 queries, 512 -> 4096."""
        return cls()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, dim_head: int = DIM_HEAD
                        ) -> ResamplerConfig:
        """The sizes a state dict was saved with (``heads`` = inner width / ``dim_head``)."""
        try:
            _, num_queries, dim = state["latents"].shape
            embedding_dim = state["proj_in.weight"].shape[1]
            output_dim = state["proj_out.weight"].shape[0]
            depth = len({m.group(1) for key in state if (m := re.match(r"layers\.(\d+)\.", key))})
            inner = state["layers.0.0.to_q.weight"].shape[0]
            hidden = state["layers.0.1.1.weight"].shape[0]
        except (KeyError, ValueError) as exc:
            raise ValueError(f"not an InfiniteYou image_proj state dict: {exc}") from None
        if inner % dim_head:
            raise ValueError(f"attention width {inner} is not a multiple of dim_head={dim_head}")
        return cls(dim=int(dim), depth=depth, dim_head=dim_head, heads=int(inner) // dim_head,
                   num_queries=int(num_queries), embedding_dim=int(embedding_dim),
                   output_dim=int(output_dim), ff_mult=int(hidden) // int(dim))


class PerceiverAttention(nn.Module):
    """Latent queries attend to the image features and to themselves."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        batch, length, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((features, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        # Both operands are scaled by dim_head ** -0.25 before the product (fp16/bf16-friendly),
        # and the softmax runs in float32, as in the reference implementation.
        scale = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(batch, length, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """ArcFace embedding ``(B, n, embedding_dim)`` -> ID tokens ``(B, num_queries, output_dim)``."""

    def __init__(self, config: ResamplerConfig | None = None) -> None:
        super().__init__()
        config = config or ResamplerConfig.infiniteyou()
        self.config = config
        self.latents = nn.Parameter(
            torch.randn(1, config.num_queries, config.dim) / config.dim ** 0.5)
        self.proj_in = nn.Linear(config.embedding_dim, config.dim)
        self.proj_out = nn.Linear(config.dim, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(config.dim, config.dim_head, config.heads),
                _feed_forward(config.dim, config.ff_mult),
            ])
            for _ in range(config.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Resampler:
        """Build the resampler the state dict describes and load it strictly (eval mode)."""
        model = cls(ResamplerConfig.from_state_dict(state))
        model.load_state_dict(dict(state), strict=True)
        return model.eval()
