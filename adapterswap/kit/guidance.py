"""Classifier-free guidance as diffusers' Stable Diffusion pipelines run it.

A backbone with ``guidance_mode = "cfg"`` batches ``[unconditional; conditional]`` rows through
its denoiser and combines them with :func:`guided`; :func:`uses_cfg` says when that happens
(above 1, as in diffusers) and :func:`check_prompt` refuses a prompt encoding made without the
negative rows CFG needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterswap.errors import UsageError

if TYPE_CHECKING:
    import torch


def uses_cfg(guidance_scale: float | None) -> bool:
    """Classifier-free guidance runs only above 1, as in diffusers (``guidance_scale > 1``)."""
    return guidance_scale is not None and guidance_scale > 1.0


def check_prompt(prompt: Any, cfg: bool, backbone: str) -> None:
    """A prompt encoding without negative rows cannot drive CFG: say so, naming ``backbone``."""
    if cfg and prompt.get("negative_prompt_embeds") is None:
        raise UsageError(
            f"backbone {backbone!r}: the prompt was encoded without guidance, but predict was "
            "called with guidance_scale > 1; encode it with the same guidance_scale")


def guided(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over ``[uncond; cond]`` rows, as diffusers combines them."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
