"""The GPU fast path: how the engine runs a denoiser close to the hardware limit.

Two kinds of switch, kept apart because they differ in what they promise:

**Exact within bf16 tolerance** (on by default on CUDA, see :data:`DEFAULT`):

- ``attention``: which scaled-dot-product-attention kernels the denoiser and the adapter may
  use, in priority order. ``"auto"`` prefers cuDNN's fused attention on Hopper (H100/H200),
  where it is faster than FlashAttention-2 for the long sequences of FLUX (0.227 against
  0.247 s per FLUX + InfuseNet step on an H100), then FlashAttention, memory-efficient
  attention and the math kernel; on older GPUs FlashAttention comes first; on the CPU
  PyTorch's own choice is left alone.
- ``fuse_qkv`` (off by default): one matrix product for the query, key and value projections
  (diffusers' ``fuse_qkv_projections``) where the attention processors allow it (not with
  IP-Adapter processors). Measured on an H100 for FLUX + InfuseNet it gained nothing (0.229 s
  per step against 0.224 s) and keeps a second copy of the projections (+4.4 GiB).
- ``compile_encoders`` (off by default): also ``torch.compile`` the text encoders (block by
  block) and the VAE encoder on CUDA, for serving many images with new prompts, where text
  encoding and the control-image encoding are part of every image's latency (on an H100,
  FLUX's text encoding, CLIP-L + T5-XXL at 256 tokens: 57 ms eager, 26 ms compiled).
  A sweep encodes each prompt and reference once, so there it never repays its compile time.
- ``compile``: ``torch.compile`` of the denoiser and the adapter's modules, in the mode and
  scope the backbone prefers (``Backbone.compile_mode`` / ``compile_scope``: SD1.5's UNet
  whole with CUDA graphs, SDXL's per block, compute-bound FLUX block by block), and on CUDA of
  the VAE decoder (default mode: its batch varies). The first call at each new shape
  compiles; sweeps turn it on where the planned forwards repay it
  (:data:`AUTO_COMPILE_FORWARDS`). Compiled kernels round differently from eager ones: on
  random FLUX weights (H100) one regionally compiled step is 1.3% (relative L2) from the eager
  bf16 step, a whole-model compiled one 4.8%.

**Approximations** (opt-in, reported separately with their fidelity cost):

- ``fp8``: the large linear layers of the denoiser and adapter in float8 (e4m3) with dynamic
  per-row activation scales and per-channel weight scales (``torch._scaled_mm``), accumulated
  with the tensor cores' fast float8 accumulation (as torchao's inference path does; see
  :func:`to_float8`); Hopper or newer only. On an H100 one compiled FLUX + InfuseNet step
  takes 0.127 s (0.136 s with full-precision accumulation; bf16 compiled 0.168 s), 2.0%
  relative L2 from the eager bf16 step (random weights).

- ``cache``: caching of slowly changing blocks (``"threshold:T"`` first-block cache or
  ``"interval:N"``), FLUX transformers only; see :mod:`adapterswap.blockcache`.

Probe-guided adapter exit (``sweep --probe-exit``) is the third approximation; it lives in
:mod:`adapterswap.sweep.exit`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

#: Accepted values of :attr:`FastPath.attention`.
ATTENTION_CHOICES = ("auto", "cudnn", "flash", "efficient", "math", "default")

#: ``torch.compile`` modes :attr:`FastPath.compile_mode` accepts.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: The float8 format's largest finite value (e4m3).
_FP8_MAX = 448.0


@dataclass(frozen=True)
class FastPath:
    """Switches of the fast path (see the module docstring).

    :ivar attention: one of :data:`ATTENTION_CHOICES`: ``"auto"`` (best known order for the
        device), a kernel to prefer (``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``;
        the others stay allowed as fallbacks), or ``"default"`` (PyTorch's own choice).
    :ivar fuse_qkv: fuse query/key/value projections where the processors allow it.
    :ivar compile: ``torch.compile`` the denoiser and the adapter's modules.
    :ivar compile_encoders: with ``compile``, also the text encoders and the VAE encoder (CUDA).
    :ivar compile_mode: a ``torch.compile`` mode, or ``None`` for the backbone's preferred one.
    :ivar compile_scope: ``"regions"``, ``"blocks"`` or ``"model"`` (see :func:`compile_module`),
        or ``None`` for the backbone's preferred one.
    :ivar fp8: float8 linear layers (approximation; opt-in).
    :ivar cache: block-cache policy (approximation; opt-in): ``"threshold:T"`` or
        ``"interval:N"`` (:class:`adapterswap.blockcache.CachePolicy`), or ``None``.
    """

    attention: str = "auto"
    fuse_qkv: bool = False
    compile: bool = False
    compile_encoders: bool = False
    compile_mode: str | None = None
    compile_scope: str | None = None
    fp8: bool = False
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise InvalidArgumentError("attention", self.attention,
                                       f"choose one of {', '.join(ATTENTION_CHOICES)}")
        for name in ("fuse_qkv", "compile", "compile_encoders", "fp8"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(name, getattr(self, name), "must be true or false")
        if self.compile_mode not in (None, *COMPILE_MODES):
            raise InvalidArgumentError("compile_mode", self.compile_mode,
                                       "choose one of " + ", ".join(COMPILE_MODES))
        if self.compile_scope not in (None, "regions", "blocks", "model"):
            raise InvalidArgumentError("compile_scope", self.compile_scope,
                                       "choose regions, blocks or model")
        if self.cache is not None:
            from adapterswap.blockcache import CachePolicy

            object.__setattr__(self, "cache", str(CachePolicy.parse(self.cache)))

    def same_modules(self, other: FastPath) -> bool:
        """Whether ``other`` changes the modules the same way (what cannot be undone).
        ``compile_encoders`` does not count: compiled encoders stay exact, and
        :meth:`Backbone.enable_fast_path` can add them later."""
        return (self.compile, self.fp8, self.fuse_qkv) == (other.compile, other.fp8,
                                                          other.fuse_qkv)

    @property
    def approximate(self) -> bool:
        """Whether any switch changes outputs beyond bf16 rounding."""
        return bool(self.approximations())

    def approximations(self) -> list[str]:
        """The approximations switched on, as they appear in cell keys (``fp8``,
        ``cache=threshold:0.1``)."""
        return (["fp8"] if self.fp8 else []) + \
            ([f"cache={self.cache}"] if self.cache else [])

    def with_(self, **changes: Any) -> FastPath:
        """A copy with some switches changed."""
        return replace(self, **changes)


#: A sweep left to decide (``compile=None``) compiles on CUDA when a backbone's cells plan at
#: least ``Backbone.compile_pays_after`` denoiser forwards (measured per backbone: compile
#: time on a cold inductor cache over the time saved per forward), or this many for a backbone
#: that has not measured it.
AUTO_COMPILE_FORWARDS = 2000

#: :meth:`Backbone.enable_fast_path` without switches: the exact ones, no compilation (sweeps
#: decide compilation from their planned forwards; one ``generate`` would not repay it).
DEFAULT = FastPath()


_DEVICE_TENSORS: dict[tuple[Any, ...], Any] = {}
_DEVICE_TENSORS_MAX = 512


def device_tensor(values: Any, device: Any, dtype: Any = None) -> torch.Tensor:
    """A small constant tensor (row indices, per-row scales) on ``device``, made once and then
    reused: building it from Python data is a host-to-device copy, which synchronises the
    stream and stalls the queue of kernels, so the denoising loop must not do it every step.
    The returned tensor is shared; never modify it in place."""
    import torch

    values = tuple(values)
    key = (values, str(device), dtype)
    tensor = _DEVICE_TENSORS.get(key)
    if tensor is None:
        if len(_DEVICE_TENSORS) >= _DEVICE_TENSORS_MAX:
            _DEVICE_TENSORS.clear()
        if dtype is None:
            dtype = torch.long if all(isinstance(v, int) for v in values) else torch.float32
        tensor = _DEVICE_TENSORS[key] = torch.tensor(values, dtype=dtype, device=device)
    return tensor


def host_to_device(tensor: torch.Tensor, device: Any) -> torch.Tensor:
    """``tensor.to(device)`` without stalling the host: a copy from ordinary (pageable) host
    memory to a GPU waits for every kernel queued before it, so each new batch of noise or
    timesteps would drain the queue between groups of a sweep. From pinned memory the copy is
    queued like a kernel (PyTorch keeps the pinned block until the copy has run)."""
    import torch

    target = torch.device(device)
    if target.type == "cuda" and tensor.device.type == "cpu" and torch.cuda.is_available():
        return tensor.pin_memory().to(target, non_blocking=True)
    return tensor.to(target)


def sdpa_backends(choice: str, device: Any) -> list[Any] | None:
    """The SDPA backends, in priority order, for ``choice`` on ``device`` (``None``: leave
    PyTorch's default alone)."""
    import torch
    from torch.nn.attention import SDPBackend

    if choice == "default" or not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
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
    """Run the block with the SDPA kernels of :func:`sdpa_backends` (priority order)."""
    backends = sdpa_backends(choice, device)
    if backends is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends, set_priority=True):
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


def to_float8(module: torch.nn.Module, *, min_features: int = 1024,
              fast_accum: bool = True) -> int:
    """Replace, in place, every ``nn.Linear`` under ``module`` whose sides are both at least
    ``min_features`` and multiples of 16 by a :class:`Float8Linear`. Returns how many.

    ``fast_accum`` (default on, as in torchao's float8 inference) lets Hopper's tensor cores
    accumulate float8 products in their faster, reduced-precision mode; pass ``False`` for the
    full-precision accumulation (``benchmarks/gpu/bench_fastpath.py`` measures both)."""
    import torch

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is torch.nn.Linear and child.in_features >= min_features
                    and child.out_features >= min_features and child.in_features % 16 == 0
                    and child.out_features % 16 == 0):
                setattr(parent, name, float8_linear_class()(child, fast_accum))
                replaced += 1
    return replaced


#: ``torch.compile`` modes that capture CUDA graphs (the loop marks each step's start for them).
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


#: Block classes ``scope="blocks"`` compiles: the repeated units of diffusers' UNets.
UNET_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def compile_module(module: torch.nn.Module, mode: str, scope: str,
                   blocks: tuple[str, ...] = UNET_BLOCKS) -> list[str]:
    """``torch.compile`` ``module`` in place and return what was compiled.

    ``scope="regions"`` compiles each block of the module's block lists (``nn.ModuleList``
    children, e.g. FLUX's 19 double and 38 single blocks) instead of the whole forward: blocks of
    one class share the compiled code, so compilation takes seconds instead of minutes for
    almost the same speed (what diffusers calls regional compilation). ``scope="blocks"``
    compiles every submodule whose class is named in ``blocks``, wherever it sits (UNets nest
    their repeated transformer and ResNet blocks inside distinct down/up blocks).
    ``scope="model"`` compiles the whole forward, which CUDA graphs need to remove every
    launch."""
    import torch

    if scope not in ("regions", "blocks", "model"):
        raise InvalidArgumentError("scope", scope, "choose regions, blocks or model")
    if scope == "blocks":
        counts: dict[str, int] = {}
        for sub in module.modules():
            if type(sub).__name__ in blocks:
                sub.compile(mode=mode)
                counts[type(sub).__name__] = counts.get(type(sub).__name__, 0) + 1
        if counts:
            return [f"{name}[{n}]" for name, n in sorted(counts.items())]
    if scope == "regions":
        compiled = []
        for name, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) > 1:
                for block in child:
                    block.compile(mode=mode)
                compiled.append(f"{name}[{len(child)}]")
        if compiled:
            return compiled
    module.compile(mode=mode)
    return ["forward"]


def compile_encoder(module: torch.nn.Module, mode: str = "default") -> list[str]:
    """``torch.compile`` a text encoder in place, block by block: the items of the outermost
    lists of blocks of one class wherever they sit (T5's ``encoder.block``, CLIP's
    ``encoder.layers``: their blocks share one shape, so they share the compiled code), or,
    without any, the whole forward. Returns what was compiled."""
    import torch

    compiled: list[str] = []
    inside: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and \
                len({type(block) for block in child}) == 1:
            for block in child:
                block.compile(mode=mode)
            compiled.append(f"{name}[{len(child)}]")
            inside.append(name)
    if compiled:
        return compiled
    module.compile(mode=mode)
    return ["forward"]


def mark_step() -> None:
    """Tell CUDA-graph trees a new step begins (outputs of the previous one may be reused)."""
    import torch

    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()


def fuse_qkv(module: torch.nn.Module) -> bool:
    """diffusers' ``fuse_qkv_projections`` on ``module`` if it has it and its attention
    processors allow it (no added-KV or adapter processors). Returns whether it fused."""
    fuse = getattr(module, "fuse_qkv_projections", None)
    processors = getattr(module, "attn_processors", None)
    if fuse is None or processors is None:
        return False
    allowed = ("AttnProcessor2_0", "FluxAttnProcessor", "FluxAttnProcessor2_0",
               "FusedAttnProcessor2_0", "FusedFluxAttnProcessor2_0")
    if any(type(p).__name__ not in allowed for p in processors.values()):
        return False
    fuse()
    return True


class ForwardTimer:
    """Sums the time of the denoiser forwards of a run without synchronising inside the loop:
    on CUDA each forward is bracketed by a pair of events, read once at the end (:meth:`total`);
    elsewhere the wall clock is used (CPU work is synchronous)."""

    def __init__(self) -> None:
        self._events: list[tuple[Any, Any]] = []
        self._seconds = 0.0
        self.count = 0
        self._first: Any = None  # the first forward's start, the last one's end
        self._last: Any = None

    def start(self) -> Any:
        import time

        import torch

        self.count += 1
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        else:
            begin = time.perf_counter()
        if self._first is None:
            self._first = begin
        return begin

    def stop(self, begin: Any) -> None:
        import time

        import torch

        if isinstance(begin, float):
            self._last = time.perf_counter()
            self._seconds += self._last - begin
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((begin, end))
        self._last = end

    def total(self) -> float:
        """Seconds spent in forwards so far (synchronises once on CUDA)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(b.elapsed_time(e) for b, e in self._events) / 1000
            self._events = []
        return self._seconds

    def span(self) -> float:
        """Seconds from the first forward's start to the last one's end (0 before any): the
        sweep's wall time outside it went to work before the first forward and after the
        last; inside it, less the forwards, to work between them."""
        if self._first is None or self._last is None:
            return 0.0
        if isinstance(self._first, float):
            return self._last - self._first
        self._last.synchronize()
        return self._first.elapsed_time(self._last) / 1000
