"""The :class:`Backbone` interface: a diffusion model variant whose steps the engine drives.

A backbone plugin subclasses :class:`Backbone`, sets the class attributes that describe it, and
implements the abstract methods. The engine (not the plugin) owns the denoising loop; a backbone
exposes its pipeline as steps so that encodings are computed once and reused, runs with
different step counts can share a forward, and probes and adapter windows act inside the loop::

    backbone = FluxSchnell().load()
    prompt = backbone.encode_prompt(["a photo"], guidance_scale=None)
    latents = backbone.prepare_latents([torch.Generator().manual_seed(0)], height=1024, width=1024)
    schedule = backbone.schedule(4, height=1024, width=1024)
    for i in range(4):
        ctx = StepContext(...)            # per-sample timesteps, step indices, step counts
        out = backbone.predict(latents, ctx, prompt, guidance_scale=None,
                               adapter_inputs=adapter.denoiser_inputs(...))
        latents = backbone.step(out, latents, schedule, i)
    images = backbone.decode(latents, height=1024, width=1024)

:func:`adapterswap.denoise.denoise` is that loop; for the same weights, seed and settings it
must give the image the plain diffusers pipeline gives (the plugin's parity test checks this).

Import torch and diffusers inside methods: ``adapterswap list`` imports every plugin module.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.errors import InvalidArgumentError, UsageError, WeightsNotFoundError
from adapterswap.hub import WeightsStatus, resolve_source, weights_status
from adapterswap.probes import Probed

if TYPE_CHECKING:
    import torch

    from adapterswap.denoise import Schedule, StepContext, TensorBundle
    from adapterswap.fastpath import FastPath

#: Families the built-in plugins use. Third-party backbones may name a new family.
KNOWN_FAMILIES = ("flux", "sdxl", "sd15")
#: ``embedded``: guidance is an input of the model (FLUX dev); ``cfg``: classifier-free guidance
#: with a negative prompt (SDXL, SD1.5); ``none``: no guidance (distilled models, FLUX schnell).
GUIDANCE_MODES = ("embedded", "cfg", "none")
_FAMILY = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def default_device() -> str:
    """``cuda`` when a GPU is usable, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> Any:
    """bf16 on CUDA, fp32 elsewhere (CPU half precision is slow and lossy)."""
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def parse_dtype(value: Any) -> Any:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"float16"``/``"fp32"``/``"float32"`` or a
    torch dtype -> torch dtype; ``None`` stays ``None``."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
             "float32": torch.float32, "float": torch.float32}
    try:
        return table[str(value).lower()]
    except KeyError:
        raise InvalidArgumentError("dtype", value, f"choose one of {', '.join(table)}") from None


class Backbone(Probed, ABC):
    """A diffusion model variant (``flux-dev``, ``flux-schnell``, ``sdxl``, ``sd15`` ...).

    Class attributes (set them in your subclass):

    :cvar name: registry name, lowercase (``"flux-schnell"``).
    :cvar family: model family adapters are matched on (``"flux"``, ``"sdxl"``, ``"sd15"``).
    :cvar default_source: Hub repo id (or path) loaded when no source is given.
    :cvar default_steps: the step count the model is normally run with.
    :cvar guidance_mode: one of :data:`GUIDANCE_MODES`.
    :cvar default_guidance_scale: guidance used when none is given (``None`` for ``none``).
    :cvar default_height: default image height in pixels; :cvar default_width: likewise.
    :cvar step_grid: step counts a sweep tries by default (up to ``default_steps``).
    :cvar required_files: relative paths that a complete model directory has (``a|b`` means
        either); checked before loading and by ``adapterswap doctor``.
    :cvar default_adapter: the adapter used when a sweep names none (the family's built-in).
    :cvar how_to_get: one sentence on obtaining the weights (licence, download command).
    :cvar description: one line for ``adapterswap list``.
    :cvar supports_probes: set True if :meth:`set_probe` measures backbone-level streams
        (e.g. FLUX joint attention text vs image tokens); see :mod:`adapterswap.probes`.
    :cvar option_docs: the options the constructor takes (``--option KEY=VALUE``), each with a
        one-line doc for ``--help`` and the README; :meth:`check_option` validates the values.
    :cvar unsupported_options: options other backbones take that this one refuses, with the
        reason (shown in the error), e.g. ``timestep_spacing`` on a flow-matching backbone.
    :cvar max_steps: most denoising steps one run may take (default 1000).
    :cvar max_pixels: most pixels (height x width) one image may have (default 4096 x 4096).
    """

    name: ClassVar[str]
    family: ClassVar[str]
    default_source: ClassVar[str]
    default_steps: ClassVar[int]
    guidance_mode: ClassVar[str]
    default_guidance_scale: ClassVar[float | None] = None
    default_height: ClassVar[int] = 1024
    default_width: ClassVar[int] = 1024
    step_grid: ClassVar[tuple[int, ...]] = ()
    required_files: ClassVar[tuple[str, ...]] = ("model_index.json",)
    default_adapter: ClassVar[str | None] = None
    how_to_get: ClassVar[str] = ""
    description: ClassVar[str] = ""
    option_docs: ClassVar[dict[str, str]] = {}
    unsupported_options: ClassVar[dict[str, str]] = {}
    #: Most denoising steps one run may take; a sweep's validation and :meth:`check_inputs`
    #: refuse more, naming the value. Schedulers trained on ``num_train_timesteps = 1000``
    #: (every UNet backbone) cannot take more steps than they have timesteps (diffusers raises),
    #: and no backbone gains anything from more; flow-matching schedulers have no hard limit,
    #: so 1000 is the sane cap for them too. A plugin lowers it where its scheduler allows
    #: fewer (LCM: its 50 original steps).
    max_steps: ClassVar[int] = 1000
    #: Most pixels (``height * width``) one image may have, checked the same way. The default,
    #: 4096 x 4096 (16.8 MP), is 64 times SD1.5's and 16 times SDXL's training size: beyond it
    #: the VAE decode alone needs tens of GB and no backbone composes a coherent image. A
    #: plugin lowers it for its family (FLUX: 2048 x 2048).
    max_pixels: ClassVar[int] = 4096 * 4096
    #: ``torch.compile`` mode the fast path uses for this backbone's denoiser: compute-bound
    #: transformers gain from autotuned kernels; launch-bound UNets from CUDA graphs.
    compile_mode: ClassVar[str] = "default"
    #: What the fast path compiles: ``"regions"`` (each repeated block: transformers, fast to
    #: compile) or ``"model"`` (the whole forward, for CUDA graphs).
    compile_scope: ClassVar[str] = "regions"
    #: Planned denoiser forwards from which compilation repays itself in a sweep (compile time
    #: on a cold inductor cache over the time it saves per forward: launch-bound denoisers
    #: save about the same per forward at any batch); ``None``: the general
    #: :data:`adapterswap.fastpath.AUTO_COMPILE_FORWARDS`.
    compile_pays_after: ClassVar[int | None] = None
    #: The same in image-steps (forwards x images per forward), for compute-bound denoisers,
    #: which save per image; when set it is used instead of :attr:`compile_pays_after`.
    compile_pays_after_images: ClassVar[int | None] = None
    #: The fast path in force (:meth:`enable_fast_path`), ``None`` for plain eager diffusers.
    fast_path: FastPath | None = None
    #: The block cache the fast path installed (:mod:`adapterswap.blockcache`), or ``None``.
    block_cache: Any = None

    @classmethod
    def class_problems(cls, klass: type) -> list[str]:
        """What is wrong with a subclass's declaration (used when a plugin registers it)."""
        problems = []
        for attr in ("family", "default_source", "default_steps", "guidance_mode"):
            if not hasattr(klass, attr):
                problems.append(f"class attribute {attr!r} is not set")
        family = getattr(klass, "family", None)
        if family is not None and not (isinstance(family, str) and _FAMILY.match(family)):
            problems.append(f"family={family!r} must be a lowercase identifier")
        mode = getattr(klass, "guidance_mode", None)
        if mode is not None and mode not in GUIDANCE_MODES:
            problems.append(f"guidance_mode={mode!r} must be one of {', '.join(GUIDANCE_MODES)}")
        steps = getattr(klass, "default_steps", None)
        if steps is not None and not (isinstance(steps, int) and steps >= 1):
            problems.append(f"default_steps={steps!r} must be an integer >= 1")
        abstract = sorted(getattr(klass, "__abstractmethods__", ()))
        if abstract:
            problems.append(f"abstract methods not implemented: {', '.join(abstract)}")
        return problems

    # ------------------------------------------------------------------ options
    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate backbone options before any model loads and return them normalised (a
        sweep checks its spec with this; the constructor calls it too). Options left out keep
        the backbone's defaults and are not filled in.

        An unknown name raises :class:`~adapterswap.errors.InvalidArgumentError` for
        ``backbone_options`` naming the option, its value and the known options; a bad value
        one naming the option and the value (:meth:`check_option`).
        """
        if not isinstance(options, Mapping):
            raise InvalidArgumentError("backbone_options", options,
                                       "must be a mapping of option names to values")
        checked = {}
        for name, value in options.items():
            if name not in cls.option_docs:
                known = ", ".join(cls.option_docs) or "none"
                why = cls.unsupported_options.get(name)
                raise InvalidArgumentError(
                    "backbone_options", {name: value},
                    f"unknown option {name!r} of backbone {cls.name!r}"
                    f"{f' ({why})' if why else ''}; known options: {known}")
            checked[name] = cls.check_option(name, value)
        return checked

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        """The normalised value of option ``name`` (one of :attr:`option_docs`), or
        :class:`~adapterswap.errors.InvalidArgumentError` naming it and the value. A subclass
        validates its own options and passes the others to ``super()``."""
        return value

    def __init__(self, source: str | None = None, *, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        """Describe what to load; nothing is loaded until :meth:`load`.

        :param source: Hub repo id or local diffusers directory; default ``default_source``.
        :param device: ``"cuda"``, ``"cpu"``, ... (default: CUDA if available).
        :param dtype: torch dtype or ``"bf16"``/``"fp16"``/``"fp32"`` (default: bf16 on CUDA,
            fp32 on CPU).
        :param options: backbone-specific options (e.g. ``cpu_offload=True``,
            ``timestep_spacing="trailing"``), declared in :attr:`option_docs` and validated by
            :meth:`check_options`.
        """
        from adapterswap.config import configured_source

        if source is None:
            source = configured_source(self.name) or self.default_source
        self.source = str(source)
        self.device = device
        self.dtype = parse_dtype(dtype)
        self.options = self.check_options(options)
        self.pipe: Any = None

    def __repr__(self) -> str:
        state = "loaded" if self.pipe is not None else "not loaded"
        return f"<{type(self).__name__} {self.name!r} source={self.source!r} {state}>"

    # ------------------------------------------------------------------ loading
    def load(self) -> Backbone:
        """Load the weights (from a local directory, the HF cache, or the Hub) and return self.

        Honours ``HF_HUB_OFFLINE``; an incomplete local directory or an offline cache miss
        raises :class:`~adapterswap.errors.WeightsNotFoundError` naming what is missing.
        """
        if self.pipe is not None:
            return self
        self.device = self.device or default_device()
        self.dtype = self.dtype or default_dtype(self.device)
        what = f"backbone {self.name!r}"
        resolved = resolve_source(self.source, what=what, required=self.required_files,
                                  how_to_get=self.how_to_get)
        try:
            self.pipe = self.load_pipeline(resolved.source,
                                           local_files_only=resolved.local_files_only)
        except OSError as exc:  # not in the cache and not downloadable (no network, gated)
            if resolved.local:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = f" {self.how_to_get}" if self.how_to_get else ""
            raise WeightsNotFoundError(
                f"{what}: {self.source!r} could not be loaded from the local Hugging Face cache "
                f"or downloaded ({first}).{hint}") from None
        return self

    @abstractmethod
    def load_pipeline(self, source: str, *, local_files_only: bool) -> Any:
        """Build and return the diffusers pipeline from ``source`` on ``self.device`` in
        ``self.dtype`` (called by :meth:`load` after the source was checked).

        Use safetensors weights and never ``trust_remote_code``.
        """

    @classmethod
    def from_pipeline(cls, pipe: Any, *, source: str = "<in-memory>", device: str | None = None,
                      **options: Any) -> Backbone:
        """Wrap an already built diffusers pipeline (tests, notebooks, the tiny preset)."""
        import torch

        backbone = cls(source, device=device, **options)
        first = next((m for m in pipe.components.values() if isinstance(m, torch.nn.Module)), None)
        if first is not None:
            param = next(first.parameters(), None)
            if param is not None:
                backbone.device = backbone.device or str(param.device)
                backbone.dtype = backbone.dtype or param.dtype
        backbone.device = backbone.device or "cpu"
        backbone.dtype = backbone.dtype or default_dtype(backbone.device)
        pipe.to(backbone.device)
        backbone.pipe = pipe
        return backbone

    @property
    def is_loaded(self) -> bool:
        return self.pipe is not None

    def require_loaded(self) -> None:
        """Raise a clear error if :meth:`load` has not been called."""
        if self.pipe is None:
            raise UsageError(f"backbone {self.name!r} is not loaded: call .load() first")

    def to(self, device: str) -> Backbone:
        """Move the loaded pipeline to ``device`` (e.g. a tiny preset onto a GPU for tests);
        caches made for the old device are dropped (:meth:`clear_caches`)."""
        self.require_loaded()
        if self.fast_path is not None and (self.fast_path.compile or self.fast_path.fp8):
            raise UsageError(f"backbone {self.name!r} runs a compiled or float8 fast path; "
                             "move it before enabling that")
        self.pipe.to(device)
        self.device = str(device)
        self.clear_caches()
        self.begin_run()  # stored block-cache residuals live on the old device
        return self

    def clear_caches(self) -> None:
        """Forget per-device caches (position ids, schedulers, ...); subclasses extend it."""

    def unload(self) -> None:
        """Drop the pipeline so its memory can be freed."""
        self.pipe = None
        self.fast_path = None
        self.block_cache = None

    @classmethod
    def weights_status(cls, source: str | None = None) -> WeightsStatus:
        """Whether the weights are present locally (path or HF cache), without network."""
        from adapterswap.config import configured_source

        source = source or configured_source(cls.name) or cls.default_source
        return weights_status(source, cls.required_files)

    @property
    def execution_device(self) -> Any:
        """Where tensors go: the device the models run on (the GPU with model CPU offload)."""
        self.require_loaded()
        return getattr(self.pipe, "_execution_device", None) or self.device

    def denoiser(self) -> Any:
        """The pipeline's denoiser module (``transformer`` or ``unet``)."""
        denoiser = self.fast_modules().get("denoiser")
        if denoiser is None:
            raise UsageError(f"backbone {self.name!r} has no transformer or unet")
        return denoiser

    def fast_modules(self) -> dict[str, Any]:
        """Modules the fast path compiles or casts: ``{"denoiser": transformer or unet}``; a
        backbone whose pipeline has neither returns ``{}`` (only the attention choice applies)
        or overrides this."""
        self.require_loaded()
        denoiser = getattr(self.pipe, "transformer", None) or getattr(self.pipe, "unet", None)
        return {} if denoiser is None else {"denoiser": denoiser}

    def decoder_module(self) -> Any:
        """The VAE decoder the fast path compiles beside the denoiser on CUDA (every finished
        image goes through it), or ``None``."""
        self.require_loaded()
        return getattr(getattr(self.pipe, "vae", None), "decoder", None)

    def encoder_modules(self) -> dict[str, Any]:
        """The encoders :attr:`FastPath.compile_encoders` compiles on CUDA: the pipeline's text
        encoders and its VAE encoder (which adapters such as InfuseNet use for control images),
        where present."""
        self.require_loaded()
        modules = {name: getattr(self.pipe, name, None)
                   for name in ("text_encoder", "text_encoder_2", "text_encoder_3")}
        modules["vae.encoder"] = getattr(getattr(self.pipe, "vae", None), "encoder", None)
        return {name: module for name, module in modules.items() if module is not None}

    def compile(self, **options: Any) -> None:
        """``torch.compile`` the denoiser (the pipeline's ``transformer`` or ``unet``) in place,
        so adapters and probes that hold the module keep working. ``options`` go to
        ``torch.compile`` (default mode: :attr:`compile_mode`). The first calls at each new
        shape are slow (compilation); outputs agree within bf16 tolerance."""
        from adapterswap import fastpath

        options.setdefault("mode", self.compile_mode)
        self.denoiser().compile(**options)
        # recorded like the fast path's compilation, so CUDA-graph modes get their step marks
        # (begin_step) and enable_fast_path knows the module changed
        mode = options["mode"] if options["mode"] in fastpath.COMPILE_MODES else None
        self.fast_path = (self.fast_path or fastpath.DEFAULT).with_(
            compile=True, compile_mode=mode, compile_scope="model")

    def enable_fast_path(self, fast: FastPath | None = None, *,
                         adapters: Sequence[Any] = ()) -> dict[str, Any]:
        """Apply the fast path (:mod:`adapterswap.fastpath`) to this backbone and the modules
        of ``adapters`` (:meth:`Adapter.fast_modules`); once per loaded pipeline. Returns what
        was done, for logs and benchmark records. On CPU only the attention choice applies
        (and does nothing there)."""
        from adapterswap import fastpath

        fast = fastpath.DEFAULT if fast is None else fast
        self.require_loaded()
        previous = self.fast_path
        if previous is not None and previous.same_modules(fast):
            encoders = previous.compile_encoders or (fast.compile and fast.compile_encoders)
            self.fast_path = previous.with_(attention=fast.attention, cache=fast.cache,
                                            compile_encoders=encoders)
            report = {"attention": fast.attention, "already": True}
            if (previous.cache or None) != (fast.cache or None):
                report["cache"] = self._set_block_cache(fast.cache)
            if encoders and not previous.compile_encoders:
                report["compiled"] = self._compile_encoders()
            return report
        if previous is not None and (previous.compile or previous.fp8 or previous.fuse_qkv):
            raise UsageError(f"backbone {self.name!r} already runs a fast path that changed "
                             f"its modules ({previous}); reload it to change the switches")
        on_cuda = str(self.execution_device).startswith("cuda")
        modules = dict(self.fast_modules())
        for adapter in adapters:
            modules.update({f"{adapter.name}.{k}": m for k, m in adapter.fast_modules().items()})
        report: dict[str, Any] = {"attention": fast.attention, "fused_qkv": [], "fp8_layers": 0,
                                  "compiled": [], "cache": self._set_block_cache(fast.cache)}
        if fast.fp8:
            if not fastpath.fp8_supported(self.execution_device):
                raise InvalidArgumentError("fp8", True, "float8 needs a CUDA GPU of compute "
                                           f"capability 8.9+ (device: {self.execution_device})")
            for module in modules.values():
                report["fp8_layers"] += fastpath.to_float8(module)
        if fast.fuse_qkv and on_cuda and not fast.fp8:
            report["fused_qkv"] = [n for n, m in modules.items() if fastpath.fuse_qkv(m)]
        if fast.compile:
            mode = fast.compile_mode or self.compile_mode
            for name, module in modules.items():
                scope = (fast.compile_scope or self.compile_scope) if name == "denoiser" \
                    else "regions"
                parts = fastpath.compile_module(module, mode, scope)
                report["compiled"].append(f"{name}: {', '.join(parts)} ({mode})")
            decoder = self.decoder_module()
            if decoder is not None and on_cuda:
                decoder.compile(mode="default")  # no CUDA graphs: its batch varies
                report["compiled"].append("vae.decoder: forward (default)")
            if fast.compile_encoders:
                report["compiled"] += self._compile_encoders()
        self.fast_path = fast
        return report

    def _compile_encoders(self) -> list[str]:
        """Compile :meth:`encoder_modules` on CUDA (nothing elsewhere); what was compiled."""
        from adapterswap import fastpath

        if not str(self.execution_device).startswith("cuda"):
            return []
        compiled = []
        for name, module in self.encoder_modules().items():
            if name.startswith("vae."):  # its blocks differ in shape: the whole forward
                module.compile(mode="default")
                parts = ["forward"]
            else:
                parts = fastpath.compile_encoder(module)
            compiled.append(f"{name}: {', '.join(parts)} (default)")
        return compiled

    @classmethod
    def compile_repays(cls, forwards: int, batch: int) -> bool:
        """Whether compiling repays itself over ``forwards`` planned forwards of ``batch``
        images each (:attr:`compile_pays_after`, :attr:`compile_pays_after_images`)."""
        from adapterswap.fastpath import AUTO_COMPILE_FORWARDS

        if cls.compile_pays_after_images is not None:
            return forwards * max(1, batch) >= cls.compile_pays_after_images
        return forwards >= (cls.compile_pays_after or AUTO_COMPILE_FORWARDS)

    def _set_block_cache(self, policy: str | None) -> str | None:
        """Install (or remove, for ``None``) the block cache on the denoiser, before any
        compilation so the compiled blocks include it."""
        from adapterswap.blockcache import BlockCache

        if self.block_cache is not None:
            self.block_cache.remove()
            self.block_cache = None
        if policy:
            self.block_cache = BlockCache(self.denoiser(), policy).install()
        return policy

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
        from adapterswap import fastpath

        fast = self.fast_path
        if fast is not None and fast.compile and \
                (fast.compile_mode or self.compile_mode) in fastpath.CUDAGRAPH_MODES:
            fastpath.mark_step()

    def step_context(self) -> Any:
        """Context manager the engine holds around each denoiser step (adapter + denoiser):
        the fast path's attention kernels, or nothing."""
        import contextlib

        from adapterswap import fastpath

        if self.fast_path is None:
            return contextlib.nullcontext()
        return fastpath.attention_context(self.fast_path.attention, self.execution_device)

    @property
    def generator_device(self) -> str:
        """Device for ``torch.Generator`` objects (diffusers draws noise on CPU when offloading
        or for cross-device reproducibility; a plugin overrides this when it does so)."""
        return "cpu"

    def synchronize(self) -> None:
        """Wait for queued device work (so timings are real)."""
        import torch

        if self.device and str(self.device).startswith("cuda") and torch.cuda.is_available():
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ validation
    def resolve_guidance_scale(self, guidance_scale: float | None) -> float | None:
        """The guidance scale to use: the default if ``None``; an error if the backbone has no
        guidance and a positive scale other than 0/1 was asked for."""
        if self.guidance_mode == "none":
            if guidance_scale not in (None, 0.0, 1.0):
                raise InvalidArgumentError(
                    "guidance_scale", guidance_scale,
                    f"backbone {self.name!r} runs without guidance (guidance_mode='none')",
                )
            return None
        if guidance_scale is None:
            return self.default_guidance_scale
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)
                and guidance_scale >= 0):
            raise InvalidArgumentError("guidance_scale", guidance_scale,
                                       "must be a finite number >= 0")
        return float(guidance_scale)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor x packing)."""
        return 16 if self.family == "flux" else 8

    def check_inputs(self, *, num_inference_steps: int, height: int, width: int,
                     guidance_scale: float | None = None) -> None:
        """Validate generation settings early, naming the argument and value on error."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise InvalidArgumentError("num_inference_steps", num_inference_steps,
                                       "must be an integer >= 1")
        if num_inference_steps > self.max_steps:
            raise InvalidArgumentError("num_inference_steps", num_inference_steps,
                                       f"backbone {self.name!r} takes at most "
                                       f"{self.max_steps} steps (max_steps)")
        m = self.size_multiple
        for arg, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < m or value % m:
                raise InvalidArgumentError(arg, value, f"must be a positive multiple of {m}")
        if height * width > self.max_pixels:
            raise InvalidArgumentError(
                "height", height, f"{height} x {width} is {height * width / 1e6:.1f} MP; "
                f"backbone {self.name!r} makes images of at most "
                f"{self.max_pixels / 1e6:.1f} MP (max_pixels)")

    @classmethod
    def default_step_grid(cls) -> list[int]:
        """Step counts a sweep tries by default: ``step_grid`` or powers of two up to
        ``default_steps``, always ending in ``default_steps``."""
        if cls.step_grid:
            return sorted(set(cls.step_grid))
        grid = [1]
        while grid[-1] * 2 < cls.default_steps:
            grid.append(grid[-1] * 2)
        return sorted(set(grid + [cls.default_steps]))

    # ------------------------------------------------------------------ pipeline steps
    @abstractmethod
    def encode_prompt(self, prompts: Sequence[str], *,
                      guidance_scale: float | None = None,
                      negative_prompts: Sequence[str] | None = None) -> TensorBundle:
        """Encode text prompts once; the result is cached and reused for every seed and step
        count.

        :param prompts: one prompt per batch row.
        :param guidance_scale: the resolved scale (``cfg`` backbones encode the negative
            prompt only when guidance is on).
        :param negative_prompts: for ``cfg`` backbones; default empty prompts.
        :returns: a :class:`TensorBundle` with batch-first tensors (``prompt_embeds``,
            ``pooled_prompt_embeds``, negative ones for ``cfg``) and shared ones
            (e.g. FLUX ``text_ids``).
        """

    @abstractmethod
    def prepare_latents(self, generators: Sequence[torch.Generator], *, height: int,
                        width: int) -> torch.Tensor:
        """Initial noise, one sample per generator, in the layout the denoiser takes.

        Sample ``i`` must equal what the diffusers pipeline draws for a batch of one with
        ``generators[i]`` (including ``init_noise_sigma`` scaling), so that results match it.
        """

    @abstractmethod
    def schedule(self, num_inference_steps: int, *, height: int, width: int) -> Schedule:
        """The timesteps (and sigmas) for one run of ``num_inference_steps`` steps, with a
        scheduler state of its own so that runs of different lengths can advance together."""

    @abstractmethod
    def predict(self, latents: torch.Tensor, ctx: StepContext, prompt: TensorBundle, *,
                guidance_scale: float | None,
                adapter_inputs: dict[str, Any] | None = None) -> torch.Tensor:
        """One denoiser evaluation for the whole batch.

        :param latents: current latents ``(B, ...)``.
        :param ctx: per-sample timesteps, step indices and step counts; timesteps may differ
            between samples (step-parallel batching).
        :param prompt: the batch's prompt encoding (``B`` rows).
        :param guidance_scale: resolved guidance (embedded guidance value, or the CFG scale;
            CFG backbones run the unconditional branch inside this call).
        :param adapter_inputs: extra denoiser inputs from :meth:`Adapter.denoiser_inputs`
            (e.g. ControlNet residuals, IP-Adapter image embeddings), or ``None``.
        :returns: the model output (velocity, epsilon, ...) after guidance, shaped like
            ``latents``.
        """

    @abstractmethod
    def step(self, model_output: torch.Tensor, latents: torch.Tensor, schedule: Schedule,
             step_index: int) -> torch.Tensor:
        """The scheduler update from step ``step_index`` to the next, for samples that share
        ``schedule``."""

    @abstractmethod
    def predict_x0(self, model_output: torch.Tensor, latents: torch.Tensor,
                   schedule: Schedule, step_index: int) -> torch.Tensor:
        """The predicted clean latent at this step (flow matching: ``x_t - sigma_t * v``;
        epsilon models: ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``), for trajectories."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, *, height: int, width: int,
               output_type: str = "pil") -> Any:
        """Latents to images: ``"pil"`` (list of PIL images), ``"np"`` (float array in
        [0, 1], ``(B, H, W, 3)``) or ``"pt"`` (tensor ``(B, 3, H, W)`` in [0, 1])."""

    # ------------------------------------------------------------------ presets
    @classmethod
    def random(cls, *, device: str | None = None, dtype: Any = None, seed: int = 0,
               **options: Any) -> Backbone:
        """A loaded instance with random weights at the published size (the ``random``
        preset: real latency and memory, nothing downloaded, meaningless images), with
        ``options`` as the constructor takes them. Plugins that support the preset override
        this."""
        raise UsageError(f"backbone {cls.name!r} has no random (published-size) preset")

    @classmethod
    def tiny(cls, seed: int = 0, *, cache_dir: str | None = None, **options: Any) -> Backbone:
        """A loaded instance built from tiny random-initialised components of the same classes
        (for tests and ``--preset tiny``), with ``options`` as the constructor takes them.
        Plugins that support the preset override this."""
        raise UsageError(f"backbone {cls.name!r} has no tiny preset")
