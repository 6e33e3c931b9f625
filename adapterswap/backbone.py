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
A backbone only describes its pipeline: the GPU fast path (compilation, attention kernels,
float8, block cache) is an :class:`adapterswap.fastpath.Accelerator` the engine keeps beside
it, which changes the modules :meth:`Backbone.fast_modules` and its neighbours name.

Import torch and diffusers inside methods: ``adapterswap list`` imports every plugin module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.backbone_checks import (
    GUIDANCE_MODES,
    BackboneWeights,
    check_generation,
    check_guidance,
    checked_options,
    declaration_problems,
)
from adapterswap.devices import default_device, default_dtype, parse_dtype
from adapterswap.errors import UsageError, WeightsNotFoundError
from adapterswap.hub import resolve_source
from adapterswap.probes import Probed

if TYPE_CHECKING:
    import torch

    from adapterswap.denoise import Schedule, StepContext, TensorBundle

#: ``GUIDANCE_MODES`` (:mod:`adapterswap.backbone_checks`) and ``default_device``,
#: ``default_dtype``, ``parse_dtype`` (:mod:`adapterswap.devices`) are importable from here.
__all__ = ["GUIDANCE_MODES", "Backbone", "default_device", "default_dtype", "parse_dtype"]


class Backbone(BackboneWeights, Probed, ABC):
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
    :cvar max_steps: most denoising steps one run may take; a sweep's validation and
        :meth:`check_inputs` refuse more. Default 1000: schedulers trained on 1000 timesteps
        (every UNet) cannot take more, and no backbone gains from more; a plugin lowers it
        where its scheduler allows fewer (LCM: its 50 original steps).
    :cvar max_pixels: most pixels (height x width) one image may have. Default 4096 x 4096
        (16.8 MP, 16 times SDXL's training size: beyond it the VAE decode alone needs tens of
        GB and no backbone composes a coherent image); FLUX lowers it to 2048 x 2048.
    :cvar size_multiple: height and width must be multiples of this: the VAE's downsampling
        factor times the denoiser's patch packing (default 8; FLUX, which packs 2 x 2 latent
        patches, declares 16).
    :cvar tiny_size: ``(height, width)`` the tiny preset (:meth:`tiny`) runs at, multiples of
        ``size_multiple``; ``None`` when the backbone has no tiny preset.
    :cvar block_cache_layout: the names of the denoiser's double-stream and single-stream
        block lists when it is a joint-attention transformer the block cache can serve
        (:mod:`adapterswap.fastpath.blockcache`), e.g. ``("transformer_blocks",
        "single_transformer_blocks")``; ``None`` (default): ``--cache`` is refused.

    Loading hooks: :meth:`load_pipeline` (real weights), :meth:`tiny` and :meth:`random`
    (presets); each docstring says what the hook gets. How the fast path compiles the denoiser,
    and when that repays itself, is data measured per card, not a class attribute: a plugin
    ships ``fastpath_profile.json`` beside its backbone classes
    (:mod:`adapterswap.fastpath.profile`).
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
    max_steps: ClassVar[int] = 1000
    max_pixels: ClassVar[int] = 4096 * 4096
    size_multiple: ClassVar[int] = 8
    tiny_size: ClassVar[tuple[int, int] | None] = None
    block_cache_layout: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def class_problems(cls, klass: type) -> list[str]:
        """What is wrong with a subclass's declaration (used when a plugin registers it):
        missing or bad class attributes, abstract methods left unimplemented."""
        return declaration_problems(klass)

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
        return checked_options(cls, options)

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
        ``self.dtype``. Called once by :meth:`load`, which has resolved ``self.device`` and
        ``self.dtype`` (defaults filled in) and ``self.options`` (checked), and passes:

        :param source: a local diffusers directory that has every :attr:`required_files`, or
            a Hub repo id (present in the HF cache when offline).
        :param local_files_only: True when nothing may be downloaded (a local directory, or
            ``HF_HUB_OFFLINE``): pass it on to diffusers' ``from_pretrained``.

        Use safetensors weights and never ``trust_remote_code``; an ``OSError`` (not cached,
        gated) becomes a :class:`~adapterswap.errors.WeightsNotFoundError` naming the source.
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
        caches made for the old device are dropped (:meth:`clear_caches`). Move before the
        fast path compiles or casts modules (``Accelerator.to`` refuses it after)."""
        self.require_loaded()
        self.pipe.to(device)
        self.device = str(device)
        self.clear_caches()
        return self

    def clear_caches(self) -> None:
        """Forget per-device caches (position ids, schedulers, ...); subclasses extend it."""

    def unload(self) -> None:
        """Drop the pipeline so its memory can be freed."""
        self.pipe = None

    def null_prompt(self, prompt: TensorBundle) -> TensorBundle:
        """The encoding of no text, one row per row of ``prompt``: the unconditional input of
        the backbone's classifier-free guidance. Default: the empty prompt encoded (as
        diffusers for SD 1.5); a pipeline that uses something else overrides it."""
        encoded = self.encode_prompt([""])
        return encoded.repeat(prompt.batch_size) if prompt.batch_size > 1 else encoded

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
        check_guidance(self, guidance_scale)
        if self.guidance_mode == "none":
            return None
        if guidance_scale is None:
            return self.default_guidance_scale
        return float(guidance_scale)

    def check_inputs(self, *, num_inference_steps: int, height: int, width: int,
                     guidance_scale: float | None = None) -> None:
        """Validate generation settings early, naming the argument and value on error.
        ``guidance_scale`` is the resolved one (:meth:`resolve_guidance_scale`)."""
        check_generation(self, num_inference_steps=num_inference_steps, height=height,
                         width=width, guidance_scale=guidance_scale)

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
                adapter_inputs: Any = None) -> torch.Tensor:
        """One denoiser evaluation for the whole batch.

        :param latents: current latents ``(B, ...)``.
        :param ctx: per-sample timesteps, step indices and step counts; timesteps may differ
            between samples (step-parallel batching).
        :param prompt: the batch's prompt encoding (``B`` rows).
        :param guidance_scale: resolved guidance (embedded guidance value, or the CFG scale;
            CFG backbones run the unconditional branch inside this call).
        :param adapter_inputs: what :meth:`Adapter.denoiser_inputs` returned for this step, in
            the typed structure the backbone's family documents and checks (a dataclass such
            as :class:`adapterswap.kit.ip_adapter_inputs.IPAdapterInputs` for UNet backbones
            or ``FluxDenoiserInputs`` of the FLUX plugin: ControlNet residuals, IP-Adapter
            image embeddings with per-row scales), or ``None`` when no adapter acts.
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
        (for tests and ``--preset tiny``, which runs it at :attr:`tiny_size`), from ``seed``,
        with ``options`` as the constructor takes them; ``cache_dir`` keeps the saved tiny
        weights (:func:`adapterswap.presets.tiny_dir`). Plugins that support the preset
        override this and set :attr:`tiny_size`."""
        raise UsageError(f"backbone {cls.name!r} has no tiny preset")
