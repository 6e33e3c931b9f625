"""The switches of the fast path (:class:`FastPath`) and the values they accept."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from adapterswap.errors import InvalidArgumentError
from adapterswap.fastpath.blockcache import CachePolicy

#: Accepted values of :attr:`FastPath.attention`.
ATTENTION_CHOICES = ("auto", "cudnn", "flash", "efficient", "math", "default", "fa3", "fa3-fp8")

#: Attention choices that change outputs beyond bf16 rounding (approximations, keyed apart).
APPROXIMATE_ATTENTION = ("fa3-fp8",)

#: ``torch.compile`` modes :attr:`FastPath.compile_mode` accepts.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: ``torch.compile`` modes that capture CUDA graphs (the loop marks each step's start for them).
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

#: What :attr:`FastPath.compile_scope` may name (see
#: :func:`adapterswap.fastpath.compiling.compile_module`).
COMPILE_SCOPES = ("regions", "blocks", "model")

#: A sweep left to decide (``compile=None``) compiles on CUDA when a backbone's cells plan at
#: least as many denoiser forwards as its compile profile's break-even
#: (:class:`~adapterswap.fastpath.profile.CompileProfile`: compile time on a cold inductor
#: cache over the time saved per forward, measured per backbone and device), or this many for
#: a backbone that has no profile.
AUTO_COMPILE_FORWARDS = 2000


@dataclass(frozen=True)
class FastPath:
    """Switches of the fast path (see :mod:`adapterswap.fastpath`).

    :ivar attention: one of :data:`ATTENTION_CHOICES`: ``"auto"`` (best known order for the
        device), a kernel to prefer (``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``;
        the others stay allowed as fallbacks), ``"default"`` (PyTorch's own choice),
        ``"fa3"`` (FlashAttention-3 where it applies, exact; Hopper, the ``fa3-fwd`` wheel) or
        ``"fa3-fp8"`` (its float8 kernel: an approximation), see
        :mod:`adapterswap.fastpath.flash`.
    :ivar fuse_qkv: fuse query/key/value projections where the processors allow it.
    :ivar compile: ``torch.compile`` the denoiser and the adapter's modules.
    :ivar compile_encoders: with ``compile``, also the text encoders and the VAE encoder (CUDA).
    :ivar compile_mode: a ``torch.compile`` mode, or ``None`` for the one the backbone's compile
        profile prefers.
    :ivar compile_scope: one of :data:`COMPILE_SCOPES`, or ``None`` for the profile's.
    :ivar fp8: float8 linear layers (approximation; opt-in).
    :ivar cache: block-cache policy (approximation; opt-in): ``"threshold:T"`` or
        ``"interval:N"`` (:class:`~adapterswap.fastpath.blockcache.CachePolicy`), or ``None``.
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
        if self.compile_scope not in (None, *COMPILE_SCOPES):
            raise InvalidArgumentError("compile_scope", self.compile_scope,
                                       "choose regions, blocks or model")
        if self.cache is not None:
            object.__setattr__(self, "cache", str(CachePolicy.parse(self.cache)))

    def same_modules(self, other: FastPath) -> bool:
        """Whether ``other`` changes the modules the same way (what cannot be undone).
        ``compile_encoders`` does not count: compiled encoders stay exact, and
        :meth:`Accelerator.enable <adapterswap.fastpath.accelerator.Accelerator.enable>` can
        add them later."""
        return (self.compile, self.fp8, self.fuse_qkv) == (other.compile, other.fp8,
                                                          other.fuse_qkv)

    @property
    def changes_modules(self) -> bool:
        """Whether these switches changed modules in place (compiled, float8 or fused): such
        a fast path cannot be switched off without reloading the backbone."""
        return self.compile or self.fp8 or self.fuse_qkv

    @property
    def approximate(self) -> bool:
        """Whether any switch changes outputs beyond bf16 rounding."""
        return bool(self.approximations())

    def approximations(self) -> list[str]:
        """The approximations switched on, as they appear in cell keys (``fp8``,
        ``attn=fa3-fp8``, ``cache=threshold:0.1``)."""
        return (["fp8"] if self.fp8 else []) + \
            ([f"attn={self.attention}"] if self.attention in APPROXIMATE_ATTENTION else []) + \
            ([f"cache={self.cache}"] if self.cache else [])

    def with_(self, **changes: Any) -> FastPath:
        """A copy with some switches changed."""
        return replace(self, **changes)


#: :meth:`Accelerator.enable <adapterswap.fastpath.accelerator.Accelerator.enable>` without
#: switches: the exact ones, no compilation (sweeps decide compilation from their planned
#: forwards; one ``generate`` would not repay it).
DEFAULT = FastPath()
