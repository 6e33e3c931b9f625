"""The kernels the fast path picks: attention backends, float8 linear layers, fused QKV.

What each switch gains and costs is in :mod:`adapterswap.fastpath`; these are the mechanics,
applied to modules by :class:`~adapterswap.fastpath.accelerator.Accelerator`. torch is imported
inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: The float8 format's largest finite value (e4m3).
_FP8_MAX = 448.0


def sdpa_backends(choice: str, device: Any) -> list[Any] | None:
    """The SDPA backends, in priority order, for ``choice`` on ``device`` (``None``: leave
    PyTorch's default alone)."""
    import torch
    from torch.nn.attention import SDPBackend

    if choice == "default" or not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    if choice in ("fa3", "fa3-fp8"):  # calls FlashAttention-3 leaves to SDPA: the auto order
        choice = "auto"
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if choice == "auto":
        index = torch.device(device).index
        major, _ = torch.cuda.get_device_capability(index if index is not None else 0)
        if major < 9:  # cuDNN attention is tuned for Hopper; elsewhere FlashAttention leads
            order = order[1:] + order[:1]
        return order
    preferred = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[choice]
    return [preferred] + [b for b in order if b != preferred]


@contextlib.contextmanager
def attention_context(choice: str, device: Any) -> Iterator[None]:
    """Run the block with the SDPA kernels of :func:`sdpa_backends` (priority order), and for
    ``"fa3"``/``"fa3-fp8"`` with FlashAttention-3 in SDPA's place where it applies
    (:func:`adapterswap.fastpath.flash.sdpa_override`; checked by ``Accelerator.enable``)."""
    backends = sdpa_backends(choice, device)
    with contextlib.ExitStack() as stack:
        if backends is not None:
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel(backends, set_priority=True))
        if choice in ("fa3", "fa3-fp8") and str(device).startswith("cuda"):
            from adapterswap.fastpath.flash import sdpa_override

            stack.enter_context(sdpa_override(fp8=choice == "fa3-fp8"))
        yield


def fp8_supported(device: Any) -> bool:
    """float8 matrix products need a CUDA device of compute capability 8.9 or newer."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return False
    index = torch.device(device).index
    return torch.cuda.get_device_capability(index if index is not None else 0) >= (8, 9)


_FLOAT8_CLASS: list[type] = []


def float8_linear_class() -> type:
    """The :class:`Float8Linear` module class (built on first use: importing this module must
    not import torch, so that ``adapterswap list`` stays fast)."""
    if _FLOAT8_CLASS:
        return _FLOAT8_CLASS[0]
    import torch

    class Float8Linear(torch.nn.Module):
        """A linear layer with float8 (e4m3) weights and dynamically quantised activations.

        Weights are scaled per output channel once; activations per row (token) at every call, so
        outliers in one token do not crush the others. The product runs on the tensor cores'
        float8 path (``torch._scaled_mm``) and comes back in the layer's original dtype.
        ``fast_accum`` selects Hopper's faster, less precise float8 accumulation.
        """

        def __init__(self, linear: torch.nn.Linear, fast_accum: bool = True) -> None:
            super().__init__()
            self.fast_accum = fast_accum
            weight = linear.weight.detach()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.out_dtype = weight.dtype
            scale = weight.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / _FP8_MAX
            quantised = (weight.float() / scale).to(torch.float8_e4m3fn)
            # _scaled_mm wants the second operand column-major: keep (out, in) and pass .t()
            self.register_buffer("weight_fp8", quantised)
            self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            rows = x.reshape(-1, self.in_features)
            scale = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / _FP8_MAX
            quantised = (rows.float() / scale).to(torch.float8_e4m3fn)
            out = torch._scaled_mm(quantised, self.weight_fp8.t(), scale_a=scale,
                                   scale_b=self.weight_scale, out_dtype=self.out_dtype,
                                   use_fast_accum=self.fast_accum)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"float8_e4m3, fast_accum={self.fast_accum}")

    _FLOAT8_CLASS.append(Float8Linear)
    return Float8Linear


def float8_eligible(module: Any, min_features: int = 1024) -> bool:
    """Whether :func:`to_float8` casts ``module``: an ``nn.Linear`` whose sides are both at
    least ``min_features`` and multiples of 16."""
    import torch

    return (type(module) is torch.nn.Linear and module.in_features >= min_features
            and module.out_features >= min_features and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def to_float8(module: torch.nn.Module, *, min_features: int = 1024,
              fast_accum: bool = True) -> int:
    """Replace, in place, every ``nn.Linear`` under ``module`` whose sides are both at least
    ``min_features`` and multiples of 16 by a :class:`Float8Linear`. Returns how many.

    ``fast_accum`` (default on, as in torchao's float8 inference) lets Hopper's tensor cores
    accumulate float8 products in their faster, reduced-precision mode; pass ``False`` for the
    full-precision accumulation (``benchmarks/gpu/bench_fastpath.py`` measures both)."""

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if float8_eligible(child, min_features):
                setattr(parent, name, float8_linear_class()(child, fast_accum))
                replaced += 1
    return replaced


#: Attention processors that read extra keys and values (an adapter's image tokens, added K/V
#: projections): fusing the q/k/v projections would drop those inputs.
_NOT_FUSABLE = ("IPAdapter", "AddedKV", "Custom")


def _plain_processor(processor: Any) -> bool:
    """One of diffusers' own scaled-dot-product processors (``AttnProcessor2_0``, a model's
    ``...AttnProcessor`` or its fused variant), with no adapter or added K/V inputs."""
    kind = type(processor)
    return (kind.__module__.startswith("diffusers.")
            and kind.__name__.endswith(("AttnProcessor", "AttnProcessor2_0"))
            and not any(word in kind.__name__ for word in _NOT_FUSABLE))


def fuse_qkv(module: torch.nn.Module) -> bool:
    """diffusers' ``fuse_qkv_projections`` on ``module`` if it has it and its attention
    processors allow it (no added-KV or adapter processors). Returns whether it fused."""
    fuse = getattr(module, "fuse_qkv_projections", None)
    processors = getattr(module, "attn_processors", None)
    if fuse is None or processors is None:
        return False
    if not all(_plain_processor(p) for p in processors.values()):
        return False
    fuse()
    return True
