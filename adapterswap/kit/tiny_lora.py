"""Tiny random UNet LoRA files in the key layouts LoRAs are published in.

Distilled backbones that ship as a LoRA (LCM-LoRA, Hyper-SD, TCD) are loaded through diffusers'
``load_lora_weights`` (:mod:`adapterswap.kit.lora`), which reads several key layouts. Their tiny
presets write a random LoRA for the tiny UNet in the layout of the published file, so the tiny
preset runs the conversion real files go through:

* ``"kohya"``: ``lora_unet_<module path, dots as underscores>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (the rank), the layout of ``latent-consistency/lcm-lora-*``,
  ``ByteDance/Hyper-SD``'s SD 1.5 and SDXL LoRAs and ``h1t/TCD-*-LoRA``: the files A1111,
  Forge and ComfyUI's LoRA loaders read, which do not read the diffusers layouts below;
* ``"diffusers"``: ``unet.<module path>.lora.down.weight`` / ``.lora.up.weight``, what
  ``save_lora_weights`` writes for ``convert_state_dict_to_diffusers`` output (training
  scripts' default);
* ``"peft"``: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight``, PEFT's own names.

The same ``seed`` gives the same low-rank factors in every layout, so a LoRA fused from any of
them gives the same UNet weights (the tests check it). torch and safetensors are imported
lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The key layouts :func:`save_tiny_unet_lora` writes.
LORA_LAYOUTS = ("kohya", "diffusers", "peft")

#: Layers the LCM-LoRA training script adapts (its default ``lora_target_modules``), which the
#: LCM, TCD and Hyper-SD LoRAs share: attention projections, feed-forward, ResNet convolutions,
#: down/upsamplers, time-embedding projections.
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                     "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                     "upsamplers.0.conv", "time_emb_proj")


def _key_names(layout: str, module_name: str) -> tuple[str, str, str | None]:
    """``(down key, up key, alpha key or None)`` of one adapted module in ``layout``."""
    if layout == "kohya":
        stem = "lora_unet_" + module_name.replace(".", "_")
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
    if layout == "diffusers":
        stem = f"unet.{module_name}"
        return f"{stem}.lora.down.weight", f"{stem}.lora.up.weight", None
    if layout == "peft":
        stem = f"unet.{module_name}"
        return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", None
    raise ValueError(f"invalid layout={layout!r}: choose one of {', '.join(LORA_LAYOUTS)}")


def tiny_unet_lora(unet: Any, seed: int, *, layout: str = "kohya", rank: int = 4,
                   targets: Sequence[str] = UNET_LORA_TARGETS) -> dict[str, Any]:
    """Random rank-``rank`` LoRA tensors (float16) for the Linear and Conv2d layers of ``unet``
    whose names end in one of ``targets``, keyed as ``layout`` keys them. The factors are
    scaled so the LoRA changes the UNet's output clearly but stays in range."""
    import torch

    _key_names(layout, "")  # an unknown layout fails before anything is drawn
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not any(name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            down_shape = (rank, module.in_features)
            up_shape = (module.out_features, rank)
        elif isinstance(module, torch.nn.Conv2d):
            down_shape = (rank, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, rank, 1, 1)
        else:
            continue
        down_key, up_key, alpha_key = _key_names(layout, name)
        fan_in = down_shape[1] * (down_shape[2] * down_shape[3] if len(down_shape) == 4 else 1)
        state[down_key] = torch.randn(down_shape, generator=generator) / fan_in ** 0.5
        state[up_key] = 0.5 * torch.randn(up_shape, generator=generator) / rank ** 0.5
        if alpha_key is not None:  # alpha = rank: scale 1, as without alpha
            state[alpha_key] = torch.tensor(float(rank))
    return {k: v.to(torch.float16).contiguous() for k, v in state.items()}


def save_tiny_unet_lora(unet: Any, path: Path, seed: int, *, layout: str = "kohya",
                        rank: int = 4, targets: Sequence[str] = UNET_LORA_TARGETS) -> Path:
    """:func:`tiny_unet_lora` saved as the safetensors file ``path``; returns ``path``."""
    from safetensors.torch import save_file

    state = tiny_unet_lora(unet, seed, layout=layout, rank=rank, targets=targets)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
