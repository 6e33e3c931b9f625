"""FLUX.1 under a memory budget (the ``memory_budget`` backbone option).

What the core planner (:mod:`adapterswap.fastpath.memory`) is told about a FLUX pipeline:

- ``transformer`` (the denoiser): its blocks stream in this order when they must: the single
  blocks from the last one back, then the double blocks from the last one back (single blocks
  are the smaller, 141M against 340M parameters at the published size, so the two blocks in
  flight take less room);
- ``adapter``: room for an adapter that attaches later, sized as InfiniteYou's InfuseNet (a
  ``FluxControlNetModel`` of 4 double and 10 single blocks at the transformer's width), float8
  when the transformer is, and its resampler (kept in 16 bits: it makes the ID tokens once per
  reference); :meth:`~adapterswap_flux.backbones.FluxBackbone.place_adapter_modules` places it
  there;
- ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (T5-XXL): encoders, evicted with their layer
  lists streaming while they encode;
- ``vae``: resident as it is (the decoder, and InfuseNet's control-image encoder).

Activations are estimated at the backbone's default size (1024 x 1024) with batch 1 and its
T5 length (:func:`activations`); a larger image or batch may need more, and the process cap
turns that into an out-of-memory error, not an overrun.

Sizes come from the modules, or before any weight is read from their configs on the meta
device (:func:`meta_components`), so an impossible budget is refused first.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from adapterswap.fastpath.memory import Activations, MemoryPlan, Part, measure, plan_memory

#: The transformer's block lists, in the order they run.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
#: Components that are text encoders.
ENCODERS = ("text_encoder", "text_encoder_2")
#: The double and single blocks of the adapter the plan keeps room for (InfiniteYou's
#: InfuseNet, :data:`adapterswap_flux.published.INFUSENET`).
ADAPTER_BLOCKS = (4, 10)


def stream_order(transformer: Any) -> list[str]:
    """Names of the transformer's blocks in the order they stream (module docstring)."""
    names = []
    for attribute in reversed(BLOCK_LISTS):
        blocks = getattr(transformer, attribute)
        names += [f"{attribute}.{i}" for i in reversed(range(len(blocks)))]
    return names


def adapter_reserve(transformer_config: Mapping[str, Any], *, dtype_bytes: int) -> Part:
    """The room the plan keeps for an adapter: a ``FluxControlNetModel`` of InfuseNet's blocks
    at the transformer's widths (float8 with the transformer) and InfuseNet's resampler (in 16
    bits; 1280 wide, or the transformer's width where that is narrower), measured on the meta
    device."""
    import torch
    from diffusers import FluxControlNetModel

    from adapterswap_flux.resampler import Resampler, ResamplerConfig

    keys = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "pooled_projection_dim", "axes_dims_rope")
    config = {key: transformer_config[key] for key in keys}
    with torch.device("meta"):
        controlnet = FluxControlNetModel(**config, num_layers=ADAPTER_BLOCKS[0],
                                         num_single_layers=ADAPTER_BLOCKS[1],
                                         guidance_embeds=True)
        # InfiniteYou's (1280 wide), or as wide as a narrower transformer (the tiny preset)
        width = min(1280, int(config["num_attention_heads"]) * int(config["attention_head_dim"]))
        resampler = Resampler(ResamplerConfig(dim=width, heads=max(1, width // 64),
                                              output_dim=int(config["joint_attention_dim"])))
    net = measure("adapter", "adapter", controlnet, dtype_bytes=dtype_bytes)
    projection = measure("resampler", "other", resampler, dtype_bytes=dtype_bytes)
    return Part("adapter", "adapter", net.nbytes + projection.nbytes,
                net.float8_nbytes + projection.nbytes)


def activations(transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                t5_config: Mapping[str, Any], *, height: int, width: int, text_tokens: int,
                dtype_bytes: int) -> Activations:
    """Estimated memory beyond the weights, per phase, for one image of ``height`` x ``width``:

    - denoise: the adapter's residuals (one image-token tensor per adapter block, held while
      the transformer runs) plus, per token, the widest product of a single block (attention
      and MLP concatenated, 5 x the width, with float8's activation quantisation: a copy in
      the dtype, its absolute value, two float32 copies and the float8 one), a dozen tensors of
      the model width and RoPE's float32 query and key;
    - decode: the VAE decoder at full resolution (8 tensors of its first width) and the
      attention of its middle block over the latent pixels (the score matrix twice);
    - encode: one prompt through T5 at ``text_tokens``: its feed-forward and a dozen model-width
      tensors per token, and three float32 copies of the attention scores of every head.
    """
    inner = int(transformer_config["num_attention_heads"]) * \
        int(transformer_config["attention_head_dim"])
    image_tokens = (height // 16) * (width // 16)
    tokens = image_tokens + text_tokens
    residuals = sum(ADAPTER_BLOCKS) * image_tokens * inner * dtype_bytes
    per_token = inner * (5 * (2 * dtype_bytes + 9) + 12 * dtype_bytes + 2 * 4)
    channels = int(vae_config["block_out_channels"][0])
    latent_pixels = (height // 8) * (width // 8)
    decode = height * width * channels * dtype_bytes * 8 + latent_pixels ** 2 * dtype_bytes * 2
    encode = text_tokens * (4 * int(t5_config["d_ff"]) + 12 * int(t5_config["d_model"])) \
        * dtype_bytes + 3 * int(t5_config["num_heads"]) * text_tokens ** 2 * 4
    return Activations(encode=encode, denoise=residuals + tokens * per_token, decode=decode)


def pipeline_parts(components: Mapping[str, Any], *, dtype_bytes: int) -> list[Part]:
    """The planner's parts of a FLUX pipeline's components (real or on the meta device)."""
    from adapterswap.fastpath.streaming import outer_blocks

    transformer = components["transformer"]
    parts = [measure("transformer", "denoiser", transformer, blocks=stream_order(transformer),
                     dtype_bytes=dtype_bytes),
             adapter_reserve(transformer.config, dtype_bytes=dtype_bytes)]
    for name in ENCODERS:
        encoder = components.get(name)
        if encoder is not None:
            parts.append(measure(name, "encoder", encoder, blocks=outer_blocks(encoder),
                                 dtype_bytes=dtype_bytes))
    parts.append(measure("vae", "other", components["vae"], dtype_bytes=dtype_bytes))
    return parts


def parts_and_activations(components: Mapping[str, Any], *, dtype: Any, height: int,
                          width: int, text_tokens: int) -> tuple[list[Part], Activations]:
    """What the planner needs of these components at ``dtype``, for ``height`` x ``width``
    images with ``text_tokens`` T5 tokens."""
    import torch

    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    parts = pipeline_parts(components, dtype_bytes=dtype_bytes)
    act = activations(components["transformer"].config, components["vae"].config,
                      components["text_encoder_2"].config.to_dict(), height=height,
                      width=width, text_tokens=text_tokens, dtype_bytes=dtype_bytes)
    return parts, act


def plan_for(components: Mapping[str, Any], budget_gib: float, *, dtype: Any, height: int,
             width: int, text_tokens: int, float8_available: bool = True,
             what: str = "this pipeline") -> MemoryPlan:
    """The plan of ``budget_gib`` for these components (:func:`parts_and_activations`)."""
    parts, act = parts_and_activations(components, dtype=dtype, height=height, width=width,
                                       text_tokens=text_tokens)
    return plan_memory(budget_gib, parts, act, float8_available=float8_available, what=what)


def meta_components(root: str | None = None) -> dict[str, Any]:
    """Transformer, text encoders and VAE on the meta device, from the configs of a diffusers
    FLUX directory ``root``, or (``None``) at the published size
    (:mod:`adapterswap_flux.published`, schnell's: dev adds only a guidance embedder)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from adapterswap_flux import published

    with torch.device("meta"):
        if root is None:
            return {"transformer": FluxTransformer2DModel(**published.TRANSFORMER),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**published.CLIP_L)),
                    "text_encoder_2": T5EncoderModel(T5Config(**published.T5_XXL)),
                    "vae": AutoencoderKL(**published.VAE)}
        return {
            "transformer": FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(root, subfolder="transformer")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(
                root, subfolder="text_encoder")),
            "text_encoder_2": T5EncoderModel(T5Config.from_pretrained(
                root, subfolder="text_encoder_2")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae")),
        }


@functools.cache
def published_plan(budget_gib: float, text_tokens: int) -> MemoryPlan:
    """The plan of ``budget_gib`` for FLUX.1 + InfuseNet at their published sizes in bf16
    (1024 x 1024, ``text_tokens`` T5 tokens, a GPU with float8), from the configs on the meta
    device: what a budget does to the real checkpoints, known before any is read."""
    import torch

    return plan_for(meta_components(), budget_gib, dtype=torch.bfloat16, height=1024,
                    width=1024, text_tokens=text_tokens)


def place(pipe: Any, plan: MemoryPlan, device: Any, *, copy: Any = None,
          cap: bool | None = None) -> Any:
    """Place a FLUX pipeline (on the CPU) under ``plan`` on ``device``: returns the
    :class:`~adapterswap.fastpath.memory.Placement`. The process is capped first (CUDA), then
    the VAE, the transformer (cast and streamed chunk by chunk) and the text encoders go where
    the plan says."""
    from adapterswap.fastpath.memory import Placement
    from adapterswap.fastpath.streaming import outer_blocks

    placement = Placement(plan, device, copy=copy, cap=cap)
    placement.place("vae", pipe.vae)
    placement.place("transformer", pipe.transformer)
    for name in ENCODERS:
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            blocks = [encoder.get_submodule(block) for block in outer_blocks(encoder)]
            placement.place(name, encoder, blocks=blocks)
    return placement
