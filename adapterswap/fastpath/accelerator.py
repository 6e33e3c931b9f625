"""The :class:`Accelerator`: the fast path of one loaded backbone, owned by whoever runs its loop.

A :class:`~adapterswap.backbone.Backbone` only describes its pipeline (:meth:`fast_modules`,
:meth:`decoder_module`, :meth:`encoder_modules`, :meth:`denoiser`); the accelerator holds the
fast-path state (the :class:`~adapterswap.fastpath.switches.FastPath` in force, the block
cache), applies the switches to those modules and to adapters' ``fast_modules()``, and gives
the denoising loop its hooks (:meth:`begin_run`, :meth:`keep_rows`, :meth:`begin_step`,
:meth:`step_context`). How it compiles comes from the backbone's compile profile
(:mod:`adapterswap.fastpath.profile`).

Compilation, float8 and fused projections change modules in place and cannot be undone, so a
backbone has ONE accelerator: take it from the model factory
(:meth:`adapterswap.sweep.models.ModelFactory.accelerator`), which the sweep engine and
``generate`` share, and hand that one to :func:`adapterswap.denoise.denoise`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterswap.devices import device_name
from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.fastpath.blockcache import BlockCache
from adapterswap.fastpath.compiling import compile_encoder, compile_module, mark_step
from adapterswap.fastpath.flash import check_attention
from adapterswap.fastpath.kernels import attention_context, fp8_supported, fuse_qkv, to_float8
from adapterswap.fastpath.profile import CompileProfile, find_profile
from adapterswap.fastpath.switches import COMPILE_MODES, CUDAGRAPH_MODES, DEFAULT, FastPath

if TYPE_CHECKING:
    from adapterswap.backbone import Backbone


class Accelerator:
    """The fast path of ``backbone`` (see the module docstring).

    :param backbone: the backbone whose modules this accelerator changes (loaded before
        :meth:`enable` or :meth:`compile`).
    :param profile: the compile profile to use; default: the one
        :func:`~adapterswap.fastpath.profile.find_profile` gives for the backbone's class on
        the card it runs on, looked up on first use.

    :ivar fast_path: the switches in force, ``None`` before :meth:`enable` (plain eager).
    :ivar block_cache: the block cache installed (:mod:`adapterswap.fastpath.blockcache`), or
        ``None``.
    """

    def __init__(self, backbone: Backbone, profile: CompileProfile | None = None) -> None:
        self.backbone = backbone
        self.fast_path: FastPath | None = None
        self.block_cache: BlockCache | None = None
        self._profile = profile
        self._given_profile = profile is not None
        self._pipe: Any = None  # the pipeline whose modules the fast path changed
        self._graphs = False  # a CUDA-graph mode is compiled: mark each step's start

    def __repr__(self) -> str:
        return f"<Accelerator of {self.backbone.name!r}: {self.fast_path or 'eager'}>"

    # ------------------------------------------------------------------ policy
    @property
    def profile(self) -> CompileProfile:
        """The backbone's compile profile on the card it runs on (mode, scope, break-even)."""
        if self._profile is None:
            self._profile = find_profile(type(self.backbone),
                                         device_name(self.backbone.execution_device))
        return self._profile

    def compile_repays(self, forwards: int, batch: int) -> bool:
        """Whether compiling repays itself over ``forwards`` planned denoiser forwards of
        ``batch`` images each (:meth:`CompileProfile.repays`)."""
        return self.profile.repays(forwards, batch)

    # ------------------------------------------------------------------ switching on
    def enable(self, fast: FastPath | None = None, *,
               adapters: Sequence[Any] = ()) -> dict[str, Any]:
        """Apply ``fast`` (default: the exact switches, no compilation) to the backbone and to
        the modules of ``adapters`` (``Adapter.fast_modules``, attached first). Returns what
        was done, for logs and benchmark records. On the CPU only the attention choice applies
        (and does nothing there).

        Enabling again with the same module changes (compile, fp8, fuse_qkv) only updates
        the attention, the block cache and adds compiled encoders (the report says
        ``already``); other changes to compiled, float8 or fused modules are refused: reload
        the backbone."""
        fast = DEFAULT if fast is None else fast
        backbone = self.backbone
        backbone.require_loaded()
        if self._pipe is not None and self._pipe is not backbone.pipe:
            self.fast_path, self.block_cache, self._graphs = None, None, False  # reloaded
        previous = self.fast_path
        check = getattr(backbone, "check_fast_path", None)  # switches its placement refuses
        if previous is not None and previous.same_modules(fast):
            check_attention(fast.attention, backbone.execution_device)
            if check is not None:
                check(fast, None)
            encoders = previous.compile_encoders or (fast.compile and fast.compile_encoders)
            self.fast_path = previous.with_(attention=fast.attention, cache=fast.cache,
                                            compile_encoders=encoders)
            report: dict[str, Any] = {"attention": fast.attention, "already": True}
            if (previous.cache or None) != (fast.cache or None):
                report["cache"] = self._set_block_cache(fast.cache)
            if encoders and not previous.compile_encoders:
                report["compiled"] = self._compile_encoders()
            return report
        if previous is not None and previous.changes_modules:
            raise UsageError(f"backbone {backbone.name!r} already runs a fast path that "
                             f"changed its modules ({previous}); reload it to change the "
                             "switches")
        device = backbone.execution_device
        on_cuda = str(device).startswith("cuda")
        check_attention(fast.attention, device)
        mode = fast.compile_mode or (self.profile.compile_mode if fast.compile else None)
        if check is not None:  # refuses what its placement cannot run; may give the mode
            mode = check(fast, mode if fast.compile else None,
                         chosen=fast.compile_mode is not None) or mode
        modules = dict(backbone.fast_modules())
        for adapter in adapters:
            modules.update({f"{adapter.name}.{k}": m for k, m in adapter.fast_modules().items()})
        report = {"attention": fast.attention, "fused_qkv": [], "fp8_layers": 0,
                  "compiled": [], "cache": self._set_block_cache(fast.cache)}
        if fast.fp8:
            if not fp8_supported(device):
                raise InvalidArgumentError("fp8", True, "float8 needs a CUDA GPU of compute "
                                           f"capability 8.9+ (device: {device})")
            for module in modules.values():
                report["fp8_layers"] += to_float8(module)
        if fast.fuse_qkv and on_cuda and not fast.fp8:
            report["fused_qkv"] = [n for n, m in modules.items() if fuse_qkv(m)]
        if fast.compile:
            for name, module in modules.items():
                scope = (fast.compile_scope or self.profile.compile_scope) \
                    if name == "denoiser" else "regions"
                parts = compile_module(module, mode, scope)
                report["compiled"].append(f"{name}: {', '.join(parts)} ({mode})")
            decoder = backbone.decoder_module()
            if decoder is not None and on_cuda:
                decoder.compile(mode="default")  # no CUDA graphs: its batch varies
                report["compiled"].append("vae.decoder: forward (default)")
            if fast.compile_encoders:
                report["compiled"] += self._compile_encoders()
        self.fast_path = fast
        self._pipe = backbone.pipe
        self._graphs = fast.compile and mode in CUDAGRAPH_MODES
        return report

    def compile(self, **options: Any) -> None:
        """``torch.compile`` the denoiser (the pipeline's ``transformer`` or ``unet``) whole,
        in place, so adapters and probes that hold the module keep working. ``options`` go to
        ``torch.compile`` (default mode: the profile's). The first calls at each new shape are
        slow (compilation); outputs agree within bf16 tolerance. Recorded as the fast path's
        compilation, so CUDA-graph modes get their step marks and :meth:`enable` knows the
        module changed."""
        denoiser = self.backbone.denoiser()
        options.setdefault("mode", self.profile.compile_mode)
        denoiser.compile(**options)
        mode = options["mode"] if options["mode"] in COMPILE_MODES else None
        self.fast_path = (self.fast_path or DEFAULT).with_(
            compile=True, compile_mode=mode, compile_scope="model")
        self._pipe = self.backbone.pipe
        self._graphs = (mode or self.profile.compile_mode) in CUDAGRAPH_MODES

    def to(self, device: str) -> Accelerator:
        """Move the backbone to ``device`` (:meth:`Backbone.to`) and drop what was kept for
        the old one (block-cache residuals, the card's profile); refused once modules were
        compiled or cast to float8: move before enabling those."""
        fast = self.fast_path
        if fast is not None and (fast.compile or fast.fp8):
            raise UsageError(f"backbone {self.backbone.name!r} runs a compiled or float8 fast "
                             "path; move it before enabling that")
        self.backbone.to(device)
        self.begin_run()
        if not self._given_profile:
            self._profile = None
        return self

    def _compile_encoders(self) -> list[str]:
        """Compile the backbone's ``encoder_modules`` on CUDA (nothing elsewhere); returns
        what was compiled."""
        if not str(self.backbone.execution_device).startswith("cuda"):
            return []
        compiled = []
        for name, module in self.backbone.encoder_modules().items():
            if name.startswith("vae."):  # its blocks differ in shape: the whole forward
                module.compile(mode="default")
                parts = ["forward"]
            else:
                parts = compile_encoder(module)
            compiled.append(f"{name}: {', '.join(parts)} (default)")
        return compiled

    def _set_block_cache(self, policy: str | None) -> str | None:
        """Install (or remove, for ``None``) the block cache on the denoiser, before any
        compilation so the compiled blocks include it."""
        if self.block_cache is not None:
            self.block_cache.remove()
            self.block_cache = None
        if policy:
            self.block_cache = BlockCache(self.backbone.denoiser(), policy,
                                          type(self.backbone).block_cache_layout).install()
        return policy

    # ------------------------------------------------------------------ the loop's hooks
    def begin_run(self) -> None:
        """Called by the loop before the first step of new latents: the block cache (if any)
        forgets the previous run's residuals."""
        if self.block_cache is not None:
            self.block_cache.reset()

    def keep_rows(self, rows: list[int]) -> None:
        """Called by the loop when rows of the batch finished: ``rows`` are the positions (in
        the previous batch) of those that go on. State kept per row (the block cache's stored
        residuals) follows them."""
        if self.block_cache is not None:
            self.block_cache.keep_rows(rows)

    def begin_step(self) -> None:
        """Called by the loop before each step's denoiser calls: with a CUDA-graph compile
        mode, marks the step's start so the graphs may reuse the previous step's memory."""
        if self._graphs:
            mark_step()

    def step_context(self) -> Any:
        """Context manager the loop holds around its steps (adapter + denoiser): the fast
        path's attention kernels, or nothing before :meth:`enable`."""
        if self.fast_path is None:
            return contextlib.nullcontext()
        return attention_context(self.fast_path.attention, self.backbone.execution_device)
