"""Probes inside IP-Adapter attention layers, measured without touching the outputs.

:class:`ProbeHooks` registers a forward hook on every attention layer whose processor carries
an IP-Adapter branch and reports, per layer and per row, how strong the image branch is
against the text branch (the ``ip/text`` quantity of :mod:`adapterswap.probes`). An IP-Adapter
installs the hooks while a probe recorder is set and removes them on detach.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterswap.kit.ip_adapter_install import ip_processor_types

if TYPE_CHECKING:
    import torch


class ProbeHooks:
    """Forward hooks that measure, in every IP-Adapter attention with a non-zero scale,
    ``||scale * IP-branch attention|| / ||text-branch attention||`` per row (before ``to_out``,
    as :mod:`adapterswap.probes` defines it). They recompute the two attentions from the
    layer's own modules and return nothing, so outputs are untouched.

    ``record(layer name, values)`` receives one value per row of the forward (with CFG the
    ``[uncond; cond]`` rows)."""

    def __init__(self, unet: Any, record: Any) -> None:
        self.handles = []
        types = ip_processor_types()
        for name, module in unet.named_modules():
            if isinstance(getattr(module, "processor", None), types):
                hook = self._hook(name, record)
                self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    @staticmethod
    def _hook(block: str, record: Any) -> Any:
        def measure(attn: Any, args: tuple, kwargs: dict, output: Any) -> None:
            import torch
            import torch.nn.functional as F

            from adapterswap.probes import relative_norm

            processor = attn.processor
            scale = processor.scale[0]
            states = kwargs.get("encoder_hidden_states")
            if not scale or not isinstance(states, tuple):
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            text, images = states
            if attn.norm_cross:
                text = attn.norm_encoder_hidden_states(text)
            batch, heads = hidden.shape[0], attn.heads

            def split(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

            with torch.no_grad():
                query = split(attn.to_q(hidden))
                text_out = F.scaled_dot_product_attention(
                    query, split(attn.to_k(text)), split(attn.to_v(text)))
                image = images[0]
                # the image branch as the processor computes it (an attention-manipulation
                # enhancer's processor reshapes its weights: kit.attention_manipulation)
                attend = getattr(processor, "image_attention", F.scaled_dot_product_attention)
                image_out = attend(
                    query, split(processor.to_k_ip[0](image)), split(processor.to_v_ip[0](image)))
                record(block, relative_norm(scale * image_out, text_out))

        return measure

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
