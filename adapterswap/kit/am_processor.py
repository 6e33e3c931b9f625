"""The patched IP-Adapter attention processor of the ``attention-manipulation`` enhancer
(:mod:`adapterswap.kit.attention_manipulation`): the weight transform
``min(scale * w ** power, clamp)`` on the chosen image tokens, the attention computed with it,
and a subclass of diffusers' ``IPAdapterAttnProcessor2_0`` that applies it while its switch
is on (and is the original computation, bit for bit, while it is off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterswap.errors import UsageError

if TYPE_CHECKING:
    import torch

#: The UNet parts, by the prefix of their attention processors' names.
PARTS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


def unet_part(processor_name: str) -> str | None:
    """``down``, ``mid`` or ``up`` for an attention processor's name (``None`` elsewhere)."""
    return next((part for part, prefix in PARTS.items() if processor_name.startswith(prefix)),
                None)


def manipulate_weights(weights: torch.Tensor, *, power: float, scale: float, clamp: float,
                       tokens: Sequence[int] | None = None) -> torch.Tensor:
    """``min(scale * w ** power, clamp)`` on the last dimension's ``tokens`` (``None``: all)."""
    if tokens is None:
        return (weights.pow(power) * scale).clamp(max=clamp)
    out = weights.clone()
    out[..., list(tokens)] = (weights[..., list(tokens)].pow(power) * scale).clamp(max=clamp)
    return out


def manipulated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                          power: float, scale: float, clamp: float,
                          tokens: Sequence[int] | None = None) -> torch.Tensor:
    """``manipulate_weights(softmax(Q K^T / sqrt(d))) V`` over ``(batch, heads, tokens, d)``
    tensors, in float32, returned in the query's dtype."""
    import torch

    q, k, v = query.float(), key.float(), value.float()
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    weights = manipulate_weights(weights, power=power, scale=scale, clamp=clamp, tokens=tokens)
    return (weights @ v).to(query.dtype)


def _is_zero(scale: Any) -> bool:
    """diffusers' rule for skipping an IP-Adapter's branch (a scale, or a list per image)."""
    return all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0


class _Switch:
    """Whether the installed processors manipulate (set around one forward by ``predict``)."""

    on = False


_PROCESSOR_CLASS: type | None = None


def processor_class() -> type:
    """The AM processor class (built on first use, so that importing this module needs no
    torch): an ``IPAdapterAttnProcessor2_0`` that wraps one installed processor. It shares the
    wrapped one's ``to_k_ip`` / ``to_v_ip`` modules (the UNet's parameter names stay as they
    are) and reads and writes its ``scale`` (the per-row scales the backbone sets reach it),
    and it is an IP processor to every ``isinstance`` check (probes, scale setting). When its
    switch is off it calls the wrapped processor, so the output is exactly the plain one."""
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is not None:
        return _PROCESSOR_CLASS
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    class AttentionManipulationProcessor(IPAdapterAttnProcessor2_0):
        def __init__(self, original: Any, switch: _Switch, *, power: float, scale: float,
                     clamp: float, tokens: Sequence[int] | None) -> None:
            torch.nn.Module.__init__(self)
            object.__setattr__(self, "original", original)  # not a child: names stay the same
            self.switch = switch
            self.hidden_size = original.hidden_size
            self.cross_attention_dim = original.cross_attention_dim
            self.num_tokens = original.num_tokens
            self.to_k_ip = original.to_k_ip
            self.to_v_ip = original.to_v_ip
            self.am_power, self.am_scale, self.am_clamp = power, scale, clamp
            self.am_tokens = None if tokens is None else list(tokens)

        @property
        def scale(self) -> Any:
            return self.original.scale

        @scale.setter
        def scale(self, value: Any) -> None:
            self.original.scale = value

        def image_attention(self, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor) -> torch.Tensor:
            """The image branch's attention as this processor computes it now (for a
            probe that recomputes the branch: manipulated while the switch is on)."""
            if not self.switch.on:
                return F.scaled_dot_product_attention(query, key, value)
            return manipulated_attention(query, key, value, power=self.am_power,
                                         scale=self.am_scale, clamp=self.am_clamp,
                                         tokens=self.am_tokens)

        def __call__(self, attn: Any, hidden_states: torch.Tensor,
                     encoder_hidden_states: Any = None, attention_mask: Any = None,
                     temb: Any = None, scale: float = 1.0,
                     ip_adapter_masks: Any = None) -> torch.Tensor:
            original = self.original
            if not self.switch.on or not isinstance(encoder_hidden_states, tuple) \
                    or all(_is_zero(s) for s in original.scale):
                return original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, temb=temb, scale=scale,
                                ip_adapter_masks=ip_adapter_masks)
            if ip_adapter_masks is not None:
                raise UsageError("enhancer 'attention-manipulation' does not support "
                                 "ip_adapter_masks")
            # diffusers' IPAdapterAttnProcessor2_0, step for step, but for the image branch
            text, images = encoder_hidden_states
            residual = hidden_states
            if attn.spatial_norm is not None:
                hidden_states = attn.spatial_norm(hidden_states, temb)
            input_ndim = hidden_states.ndim
            if input_ndim == 4:
                batch, channel, height, width = hidden_states.shape
                hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
            batch, sequence_length, _ = text.shape
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length,
                                                             batch)
                attention_mask = attention_mask.view(batch, attn.heads, -1,
                                                     attention_mask.shape[-1])
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            query = attn.to_q(hidden_states)
            if attn.norm_cross:
                text = attn.norm_encoder_hidden_states(text)
            key, value = attn.to_k(text), attn.to_v(text)
            head_dim = key.shape[-1] // attn.heads

            def split(x: torch.Tensor) -> torch.Tensor:
                return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

            def merge(x: torch.Tensor) -> torch.Tensor:
                return x.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)

            query = split(query)
            out = F.scaled_dot_product_attention(query, split(key), split(value),
                                                 attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
            out = merge(out).to(query.dtype)
            for states, ip_scale, to_k, to_v in zip(images, original.scale, original.to_k_ip,
                                                    original.to_v_ip):
                if _is_zero(ip_scale):
                    continue
                ip_out = self.image_attention(query, split(to_k(states)), split(to_v(states)))
                out = out + ip_scale * merge(ip_out).to(query.dtype)
            out = attn.to_out[1](attn.to_out[0](out))
            if input_ndim == 4:
                out = out.transpose(-1, -2).reshape(batch, channel, height, width)
            if attn.residual_connection:
                out = out + residual
            return out / attn.rescale_output_factor

    _PROCESSOR_CLASS = AttentionManipulationProcessor
    return _PROCESSOR_CLASS
