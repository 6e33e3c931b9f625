"""FlashAttention-3 as the fast path's attention kernel (``attention="fa3"``) and its float8
variant (``fp8_attention``, an approximation).

PyTorch's scaled-dot-product attention has no FlashAttention-3 backend; on Hopper its best
kernel is cuDNN's. FlashAttention-3 (the ``fa3-fwd`` wheel: the forward kernels of
FlashAttention-3, Apache-2.0, Hopper only, bf16 and float8) is faster for FLUX's long
sequences. Every attention call of the denoiser and the adapters goes through
``torch.nn.functional.scaled_dot_product_attention`` (diffusers' processors, the kit's
processors), so :func:`sdpa_override` swaps that one function for the duration of the engine's
steps: calls FlashAttention-3 can run exactly (CUDA, bf16, no mask, no dropout, equal head
sizes it was built for) go to it, every other call to the function that was there before,
unchanged. ``torch.compile`` traces through the override (the kernel is a registered custom
op), so compiled regions call FlashAttention-3 too.

**Exact** (``attention="fa3"``): the same attention in bf16, rounded differently, as cuDNN's
and FlashAttention-2's kernels are.

**Approximate** (``fp8_attention``): queries, keys and values quantised to float8 (e4m3) with
one scale per batch row and head (the amax over the sequence and the head dimension), the
products accumulated in fp32 by FlashAttention-3's float8 kernel, the output back in bf16. Its
fidelity cost is reported beside its speed (``benchmarks/gpu/bench_flux.py``, ``compare``).

torch and the kernel are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

#: Head sizes the wheel's kernels were built for.
HEAD_DIMS = (64, 96, 128, 192, 256)

#: The float8 format's largest finite value (e4m3).
_FP8_MAX = 448.0

_MISSING = "needs FlashAttention-3 on a Hopper GPU (pip install fa3-fwd)"


def fa3_interface() -> Any:
    """The ``fa3_fwd_interface`` module, or ``None`` when the wheel is not installed."""
    try:
        import fa3_fwd_interface
    except (ImportError, OSError):  # OSError: the extension does not load (CUDA, torch ABI)
        return None
    return fa3_fwd_interface


def fa3_unavailable(device: Any) -> str | None:
    """Why FlashAttention-3 cannot run on ``device`` (one line), or ``None`` when it can."""
    if not str(device).startswith("cuda"):
        return f"{_MISSING}; the device is {device}"
    import torch

    if not torch.cuda.is_available():
        return f"{_MISSING}; CUDA is not available"
    index = torch.device(device).index
    major, minor = torch.cuda.get_device_capability(index if index is not None else 0)
    if major != 9:
        return f"{_MISSING}; this GPU has compute capability {major}.{minor}, not 9.x"
    if fa3_interface() is None:
        return _MISSING
    return None


def _supported(query: Any, key: Any, value: Any, attn_mask: Any, dropout_p: float,
               is_causal: bool, enable_gqa: bool, device_type: str) -> bool:
    """Whether FlashAttention-3 computes this call exactly as SDPA would (its causal mask is
    aligned to the bottom right, SDPA's to the top left: the same only for square ones)."""
    import torch

    return (attn_mask is None and dropout_p == 0.0 and not enable_gqa
            and (not is_causal or query.shape[-2] == key.shape[-2])
            and query.dim() == 4 and query.device.type == device_type
            and query.dtype == key.dtype == value.dtype == torch.bfloat16
            and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.shape[-1] in HEAD_DIMS
            and query.shape[1] == key.shape[1] == value.shape[1]
            and query.shape[0] == key.shape[0] == value.shape[0])


def _quantise(x: Any) -> tuple[Any, Any]:
    """``x`` (batch, seq, heads, dim) in float8 e4m3 with one scale per (batch, head), and the
    descale FlashAttention-3 multiplies back (float32, (batch, heads))."""
    import torch

    amax = x.abs().amax(dim=(1, 3)).float().clamp_min(1e-12)  # (batch, heads)
    scale = _FP8_MAX / amax
    quantised = (x.float() * scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return quantised, (1.0 / scale).contiguous()


def flash_attention(fallback: Callable[..., Any], *, fp8: bool = False,
                    kernel: Callable[..., Any] | None = None,
                    device_type: str = "cuda") -> Callable[..., Any]:
    """A function with SDPA's signature that runs FlashAttention-3 (float8 with ``fp8``) where
    :func:`_supported`, else ``fallback`` (the SDPA function it replaces). ``kernel`` and
    ``device_type`` replace the wheel's ``flash_attn_func`` and CUDA (tests on the CPU)."""
    if kernel is None:
        interface = fa3_interface()
        if interface is None:
            raise RuntimeError(f"FlashAttention-3 attention {_MISSING}")
        kernel = interface.flash_attn_func

    def attention(query: Any, key: Any, value: Any, attn_mask: Any = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False) -> Any:
        if not _supported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa,
                          device_type):
            return fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        # SDPA's layout is (batch, heads, seq, dim); the kernel's (batch, seq, heads, dim):
        # transposed views, no copies (the last dimension stays contiguous).
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        softmax_scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        if fp8:
            (q, q_descale), (k, k_descale), (v, v_descale) = (_quantise(t) for t in (q, k, v))
            out = kernel(q, k, v, softmax_scale=softmax_scale, causal=is_causal,
                         q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
        else:
            out = kernel(q, k, v, softmax_scale=softmax_scale, causal=is_causal)
        if isinstance(out, tuple):  # some versions return (out, softmax_lse)
            out = out[0]
        return out.to(query.dtype).transpose(1, 2)

    attention.fa3_fp8 = fp8  # type: ignore[attr-defined]
    return attention


@contextlib.contextmanager
def sdpa_override(fp8: bool = False, **kernel: Any) -> Iterator[None]:
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` runs
    FlashAttention-3 where it can (see :func:`flash_attention`). Process-wide while it is held,
    as the engine's steps are; restored on exit, also on errors. Nested use keeps the outer
    override's fallback (the original SDPA). ``kernel``: :func:`flash_attention`'s test
    arguments."""
    import torch.nn.functional as F  # noqa: N812

    original = F.scaled_dot_product_attention
    fallback = getattr(original, "sdpa_original", original)
    replacement = flash_attention(fallback, fp8=fp8, **kernel)
    replacement.sdpa_original = fallback  # type: ignore[attr-defined]
    F.scaled_dot_product_attention = replacement
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def check_attention(choice: str, device: Any) -> None:
    """Refuse, in one line naming the switch, an attention choice that cannot run on
    ``device`` (``"fa3"`` and ``"fa3-fp8"`` need FlashAttention-3 on a Hopper GPU)."""
    if choice not in ("fa3", "fa3-fp8"):
        return
    reason = fa3_unavailable(device)
    if reason is not None:
        from adapterswap.errors import InvalidArgumentError

        raise InvalidArgumentError("attention", choice, reason)
