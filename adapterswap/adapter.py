"""The :class:`Adapter` interface: identity, style or object conditioning for a backbone.

An adapter is loaded once and can be attached to any loaded backbone of a family it supports,
detached again, and attached to another: that is the training-free swap. It turns a reference
image into a cacheable conditioning (:meth:`Adapter.encode_reference`) and, at every step,
contributes denoiser inputs (:meth:`Adapter.denoiser_inputs`) inside its active window.
"""

from __future__ import annotations

import contextlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.errors import IncompatibleAdapterError, InvalidArgumentError, UsageError
from adapterswap.hub import WeightsStatus, weights_status
from adapterswap.probes import Probed

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from adapterswap.backbone import Backbone
    from adapterswap.denoise import StepContext, TensorBundle

#: The adapter kinds the built-in plugins declare: ``identity`` (a face: InfiniteYou's
#: InfuseNet), ``style`` (an image's style: InstantStyle-targeted IP-Adapter), ``object`` (an
#: object or scene: IP-Adapter Plus). Kinds are open: a plugin may declare any lowercase name
#: (``"image-prompt"``, ``"pose"``) and a metric that measures fidelity for it declares the
#: same name in :attr:`Metric.kinds <adapterswap.metrics.Metric.kinds>`; the analysis then
#: recommends step counts on that metric, and on nothing else. ``none`` is reserved: it is
#: what a run without an adapter is judged on (prompt fidelity).
BUILTIN_ADAPTER_KINDS = ("identity", "style", "object")
_KIND = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def is_active(step_index: int, num_steps: int, start: float, end: float) -> bool:
    """Whether an adapter with window ``[start, end]`` acts at ``step_index`` of ``num_steps``.

    Same rule as diffusers' ``control_guidance_start``/``control_guidance_end`` (which
    InfiniteYou uses): the step is active unless ``i / N < start`` or ``(i + 1) / N > end``.
    """
    return not (step_index / num_steps < start or (step_index + 1) / num_steps > end)


def active_steps(num_steps: int, start: float, end: float) -> int:
    """How many of ``num_steps`` steps a window ``[start, end]`` acts at (:func:`is_active`).
    At low step counts a narrow window may contain none: window 0-0.25 opens first at N = 4."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise InvalidArgumentError("num_steps", num_steps, "must be an integer >= 1")
    return sum(is_active(i, num_steps, start, end) for i in range(num_steps))


#: The confound :func:`window_confounds` reports.
WINDOW_NEVER_OPENS = "window_never_opens"


def window_confounds(adapter_or_window: Adapter | tuple[float, float],
                     num_steps: int) -> list[str]:
    """``["window_never_opens"]`` when an adapter (or a ``(start, end)`` window) acts at none
    of ``num_steps`` steps: such a cell is an adapter-off cell under an adapter label."""
    if isinstance(adapter_or_window, Adapter):
        start, end = adapter_or_window.start, adapter_or_window.end
    else:
        start, end = adapter_or_window
    return [WINDOW_NEVER_OPENS] if active_steps(num_steps, start, end) == 0 else []


def load_image(image: Any, *, argument: str = "reference") -> Image.Image:
    """A PIL RGB image from a PIL image or a path; a clear error if it cannot be read.

    A file is decoded whole (a truncated one is refused here, not mid-run). PIL's
    decompression-bomb protection stays: a file of more than ``PIL.Image.MAX_IMAGE_PIXELS``
    pixels (89.5 MP unless changed) is refused with one :class:`InvalidArgumentError` naming
    its size, never decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if path.is_dir():
            raise InvalidArgumentError(argument, str(image), "is a directory, not an image file")
        if not path.exists():
            raise InvalidArgumentError(argument, str(image), "no such file")
        if not path.is_file():
            raise InvalidArgumentError(argument, str(image), "is not a regular file")
        limit = Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                # between 1x and 2x the limit PIL only warns: refused below, with the size
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as opened:
                    width, height = opened.size
                    if limit and width * height > limit:
                        raise InvalidArgumentError(
                            argument, str(image), _too_large(f"{width}x{height}",
                                                             width * height, limit))
                    return opened.convert("RGB")
        except Image.DecompressionBombError as exc:  # over 2x the limit: PIL refuses at open
            import re

            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = int(found.group(1)) if found else 0
            raise InvalidArgumentError(argument, str(image),
                                       _too_large("the image", pixels, limit)) from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidArgumentError(argument, str(image),
                                       f"cannot be read as an image ({exc})") from None
    raise InvalidArgumentError(argument, type(image).__name__, "expected a PIL image or a path")


def _too_large(what: str, pixels: int, limit: int | None) -> str:
    size = f" ({pixels / 1e6:.1f} MP)" if pixels else ""
    return (f"{what}{size} is larger than the {(limit or 0) / 1e6:.1f} MP an image may have "
            "(PIL's decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS); downscale it: "
            "adapters work on far smaller images")


def with_backbone_options(options: Mapping[str, Any], adapter_cls: type[Adapter],
                          adapter_options: Mapping[str, Any], *,
                          backbone: str) -> dict[str, Any]:
    """``options`` (a backbone's, as the user gave them) with those the adapter's options
    require (:meth:`Adapter.backbone_options`) added; a value the user gave that contradicts
    the adapter's raises :class:`~adapterswap.errors.InvalidArgumentError` naming both."""
    required = adapter_cls.backbone_options(dict(adapter_options or {}))
    merged = dict(options)
    for name, value in required.items():
        if name in merged and merged[name] != value:
            raise InvalidArgumentError(
                "backbone_options", {name: merged[name]},
                f"contradicts adapter {adapter_cls.name!r} with adapter options "
                f"{dict(adapter_options)!r}, which runs backbone {backbone!r} with "
                f"{name}={value!r}; drop the backbone option or the adapter option")
        merged[name] = value
    return merged


class Adapter(Probed, ABC):
    """A conditioning module trained on one backbone and usable on others of its family.

    Class attributes (set them in your subclass):

    :cvar name: registry name (``"infusenet"``).
    :cvar kind: what it conditions on, a lowercase name: one of
        :data:`BUILTIN_ADAPTER_KINDS` or a kind of your own (see there).
    :cvar families: backbone families it supports (``frozenset({"flux"})``).
    :cvar default_source: Hub repo id or path of its weights.
    :cvar default_scale: conditioning scale used when none is given.
    :cvar required_files: relative paths a complete weights directory has (``a|b``: either).
    :cvar how_to_get: one sentence on obtaining the weights (licence included).
    :cvar description: one line for ``adapterswap list``.
    :cvar supports_probes: set True if :meth:`set_probe` measures the adapter's stream against
        the base stream per block (see :mod:`adapterswap.probes`).
    :cvar probe_quantity: the quantity name its probes record for its own contribution
        (e.g. ``"residual/hidden"``); probe-guided exit reads it.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    families: ClassVar[frozenset[str]]
    default_source: ClassVar[str] = ""
    default_scale: ClassVar[float] = 1.0
    required_files: ClassVar[tuple[str, ...]] = ()
    how_to_get: ClassVar[str] = ""
    description: ClassVar[str] = ""
    probe_quantity: ClassVar[str] = ""
    #: The length of an embedding the adapter takes as a reference instead of an image
    #: (``--ref face.npy``, :mod:`adapterswap.references`); ``None``: images only.
    embedding_dim: ClassVar[int | None] = None

    @classmethod
    def class_problems(cls, klass: type) -> list[str]:
        """What is wrong with a subclass's declaration (used when a plugin registers it)."""
        problems = []
        kind = getattr(klass, "kind", None)
        if not (isinstance(kind, str) and _KIND.match(kind)) or kind == "none":
            problems.append(f"kind={kind!r} must be a lowercase name other than 'none' "
                            f"(built-in kinds: {', '.join(BUILTIN_ADAPTER_KINDS)})")
        families = getattr(klass, "families", None)
        if not (isinstance(families, (frozenset, set, tuple, list)) and families
                and all(isinstance(f, str) for f in families)):
            problems.append(f"families={families!r} must be a non-empty set of family names")
        abstract = sorted(getattr(klass, "__abstractmethods__", ()))
        if abstract:
            problems.append(f"abstract methods not implemented: {', '.join(abstract)}")
        return problems

    def __init__(self, source: str | None = None, *, scale: float | None = None,
                 start: float = 0.0, end: float = 1.0, device: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        """Describe what to load; nothing is loaded until :meth:`load`.

        :param source: weights location (Hub repo id or local path); default ``default_source``.
        :param scale: conditioning scale (default ``default_scale``), finite and >= 0.
        :param start: fraction of the schedule where the adapter starts acting (0..1).
        :param end: fraction where it stops (``start < end <= 1``).
        :param options: adapter-specific options; a subclass must reject unknown ones.
        """
        from adapterswap.backbone import parse_dtype
        from adapterswap.config import configured_source

        if source is None:
            source = configured_source(self.name) or self.default_source
        self.source = str(source)
        self.scale = self.default_scale if scale is None else scale
        self.set_window(start, end)
        self._check_scale(self.scale)
        self.device = device
        self.dtype = parse_dtype(dtype)
        self.options = dict(options)
        self.attached_to: Backbone | None = None
        self.loaded = False

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} scale={self.scale} "
                f"window=[{self.start}, {self.end}]>")

    # ------------------------------------------------------------------ settings
    @staticmethod
    def _check_scale(scale: Any) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale) or scale < 0:
            raise InvalidArgumentError("scale", scale, "must be a finite number >= 0")

    def set_scale(self, scale: float) -> None:
        """Change the conditioning scale (takes effect at the next step)."""
        self._check_scale(scale)
        self.scale = float(scale)

    def set_window(self, start: float, end: float) -> None:
        """Change the active window (fractions of the schedule, ``0 <= start < end <= 1``)."""
        for arg, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise InvalidArgumentError(arg, value, "must be a number in [0, 1]")
        if start >= end:
            raise InvalidArgumentError("start", start, f"must be less than end={end}")
        self.start, self.end = float(start), float(end)

    def is_active(self, step_index: int, num_steps: int) -> bool:
        """Whether the adapter acts at this step (see :func:`is_active`)."""
        if getattr(self, "_switched_off", False):
            return False
        return is_active(step_index, num_steps, self.start, self.end)

    def active_steps(self, num_steps: int) -> int:
        """How many of ``num_steps`` steps the adapter acts at (0: its window never opens;
        see :func:`window_confounds`)."""
        return active_steps(num_steps, self.start, self.end)

    def first_step_key(self, num_steps: int) -> Any:
        """What, besides the denoiser's inputs, makes this adapter's first step differ between
        runs of ``num_steps`` steps: by default whether it acts at step 0 (its window depends
        on the step count). Runs whose keys are equal share their first forward in a
        step-parallel sweep (see :attr:`Schedule.first_step_key`); an adapter whose first
        step depends on the step count in other ways returns ``None`` (never shared)."""
        return self.is_active(0, num_steps)

    def active_mask(self, ctx: StepContext) -> list[bool]:
        """Per-sample activity for a (possibly step-parallel) batch (all off inside
        :meth:`switched_off`)."""
        return [self.is_active(i, n) for i, n in zip(ctx.step_indices, ctx.num_steps)]

    @contextlib.contextmanager
    def switched_off(self) -> Iterator[None]:
        """Within it the adapter acts at no step (:meth:`is_active` is false), so its
        :meth:`denoiser_inputs` are those it gives outside its window: how an enhancer asks
        for the prediction without the adapter's conditioning."""
        self._switched_off = True
        try:
            yield
        finally:
            self._switched_off = False

    # ------------------------------------------------------------------ compatibility
    def supports(self, backbone: Backbone | type[Backbone]) -> bool:
        """Whether this adapter works with ``backbone``'s family."""
        return backbone.family in self.families

    def check_backbone(self, backbone: Backbone | type[Backbone], *,
                       installed: Iterable[type[Backbone]] = ()) -> None:
        """Raise :class:`IncompatibleAdapterError` (naming both) if ``backbone`` is of another
        family; the message lists those of ``installed`` (backbone classes, e.g. the
        registry's) that the adapter does support."""
        if self.supports(backbone):
            return
        supported = [cls.name for cls in installed if self.supports(cls)]
        raise IncompatibleAdapterError(self.name, self.families, backbone.name, backbone.family,
                                       supported)

    @classmethod
    def backbone_options(cls, adapter_options: Mapping[str, Any]) -> dict[str, Any]:
        """Backbone options that these adapter options require, e.g. a T5 length the
        adapter's reference pipeline always uses; default ``{}``.

        The backbone is loaded once for every cell that uses it, so what an adapter option
        changes in the backbone cannot be done at attach time: it is declared here instead.
        ``sweep`` merges it into each backbone's options before cells are keyed
        (:meth:`SweepSpec.options_for <adapterswap.sweep.spec.SweepSpec.options_for>`) and
        ``generate`` into its backbone's (:func:`with_backbone_options`); a user value that
        contradicts it is refused naming both. Called on the class, before anything is built:
        a bad value of an option it reads raises
        :class:`~adapterswap.errors.InvalidArgumentError` naming the option and the value."""
        return {}

    def check_references(self, references: Sequence[str]) -> None:
        """Raise :class:`~adapterswap.errors.WeightsNotFoundError` now, before any model
        loads, when something these references will need cannot be found (e.g. the face
        models an image reference needs and an embedding does not); default: nothing to
        check. Path checks only: nothing is loaded or downloaded."""
        return None

    @classmethod
    def run_defaults(cls, adapter_options: Mapping[str, Any], backbone_cls: Any) -> Any:
        """The :class:`~adapterswap.run_defaults.RunDefaults` these options ask of a run on
        ``backbone_cls`` where the user gave none (a size, a step count, sizes rounded down
        rather than refused); default: none. Called on the classes before anything loads."""
        from adapterswap.run_defaults import RunDefaults

        return RunDefaults()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def weights_status(cls, source: str | None = None) -> WeightsStatus:
        """Whether the weights are present locally (path or HF cache), without network."""
        from adapterswap.config import configured_source

        source = source or configured_source(cls.name) or cls.default_source
        return weights_status(source, cls.required_files)

    def load(self) -> Adapter:
        """Load the weights once (a no-op when already loaded) and return self.

        Device and dtype default to CUDA/bf16 (CPU/fp32 without a GPU); :meth:`attach` loads on
        the backbone's device and dtype when the adapter was not loaded before.
        """
        if self.loaded:
            return self
        from adapterswap.backbone import default_device, default_dtype

        self.device = self.device or default_device()
        self.dtype = self.dtype or default_dtype(self.device)
        self.load_weights()
        self.loaded = True
        return self

    @abstractmethod
    def load_weights(self) -> None:
        """Load the weights from ``self.source`` on ``self.device``/``self.dtype`` (called once
        by :meth:`load`). It gets no backbone: an adapter loads once and then moves between
        backbones, so whatever depends on the backbone (moving to its device, fitting its
        widths, per-backbone caches) belongs in :meth:`_attach`.

        Read files with the safe loaders of :mod:`adapterswap.weights` (``read_safetensors``,
        ``read_pickle`` = ``torch.load(..., weights_only=True)``, ``load_model``,
        ``load_pipeline``): safetensors first, pickles never executed, never
        ``trust_remote_code``, one error naming the file. Check the source with
        :func:`adapterswap.hub.resolve_source` so a missing file is named."""

    def attach(self, backbone: Backbone) -> None:
        """Attach to a loaded backbone (detaching from the previous one first). The adapter's
        weights are not reloaded: the same object moves between backbones."""
        self.check_backbone(backbone)
        backbone.require_loaded()
        if self.attached_to is backbone:
            return
        if self.attached_to is not None:
            self.detach()
        if not self.loaded:
            self.device = self.device or backbone.device
            self.dtype = self.dtype or backbone.dtype
            self.load()
        self._attach(backbone)
        self.attached_to = backbone

    def detach(self) -> None:
        """Remove the adapter from its backbone; the backbone's outputs return exactly to what
        they were before :meth:`attach`."""
        if self.attached_to is None:
            return
        self._detach(self.attached_to)
        self.attached_to = None

    @abstractmethod
    def _attach(self, backbone: Backbone) -> None:
        """Install whatever the adapter needs in ``backbone.pipe`` (attention processors,
        modules); called by :meth:`attach` after the checks."""

    @abstractmethod
    def _detach(self, backbone: Backbone) -> None:
        """Undo :meth:`_attach` completely."""

    def fast_modules(self) -> dict[str, Any]:
        """The adapter's own heavy modules that the fast path may compile, fuse or cast to
        float8 along with the denoiser (e.g. InfuseNet's ControlNet). Modules that live inside
        the denoiser (attention processors) are covered by the denoiser's; default: none."""
        return {}

    # ------------------------------------------------------------------ per reference / step
    @abstractmethod
    def encode_reference(self, image: Image.Image | str | Path,
                         backbone: Backbone) -> TensorBundle:
        """Turn a reference image into a conditioning (one batch row), computed once per
        reference and reused across prompts, seeds and step counts. Use :func:`load_image` to
        accept paths with a clear error for unreadable files."""

    @abstractmethod
    def denoiser_inputs(self, backbone: Backbone, conditioning: TensorBundle,
                        latents: torch.Tensor, ctx: StepContext,
                        prompt: TensorBundle) -> Any:
        """Extra inputs for :meth:`Backbone.predict` at this step.

        :param conditioning: this batch's conditionings (``B`` rows).
        :param latents: the current latents ``(B, ...)``.
        :param ctx: per-sample timesteps and step indices; honour :meth:`active_mask` per
            sample: rows of one batch may be at different steps of different step counts
            (step-parallel batching), so the adapter may be active on some rows only, and an
            inactive row must get exactly the no-adapter result (scale its contribution by 0,
            or split the batch: :mod:`adapterswap.kit.rows`). CFG backbones run the negative
            rows inside ``predict``; what the adapter gives them is the family's rule (the
            IP-Adapter's negative image embeddings, for example).
        :param prompt: the batch's prompt encoding (some adapters need the pooled text).
        :returns: the inputs the backbone's ``predict`` understands, in the typed structure
            its family documents (e.g. ``FluxDenoiserInputs`` of ``adapterswap-flux``,
            :class:`adapterswap.kit.ip_adapter_inputs.IPAdapterInputs` of UNet backbones), or
            ``None`` when the adapter acts on no row at this step.
        """

    def draw_before_latents(self, generators: Sequence[torch.Generator], backbone: Backbone, *,
                            height: int, width: int) -> TensorBundle | None:
        """Random tensors the adapter draws from each run's generator BEFORE the backbone
        draws its starting noise; default: none (``None``: nothing is drawn, so the
        generators reach :meth:`Backbone.prepare_latents` untouched).

        Some reference pipelines draw from the seeded RNG before the initial latents (a
        ControlNet that samples its control image's VAE posterior, for example); to give
        their image for a seed, the adapter must make the same draws in the same order.
        :func:`adapterswap.denoise.denoise` and the sweep's runner call this right before
        ``backbone.prepare_latents(generators, ...)``, with one generator per image row
        (seeded with that row's seed, on ``backbone.generator_device``).

        :returns: a bundle whose ``batched`` tensors have one row per generator (row ``i``
            drawn from ``generators[i]`` only, so a batch of seeds equals the seeds one at a
            time). Its rows travel with the image rows exactly as the conditioning does: they
            are merged into the per-row conditioning bundle that :meth:`denoiser_inputs`
            receives (selected and kept together with the rows, including rows that finish
            early in a step-parallel batch); its keys must not clash with those of
            :meth:`encode_reference`.
        """
        return None

    def encode_references(self, images: Sequence[Any], backbone: Backbone) -> TensorBundle:
        """Encode several references (one row each)."""
        from adapterswap.denoise import TensorBundle

        if not images:
            raise UsageError("encode_references needs at least one image")
        return TensorBundle.cat([self.encode_reference(i, backbone) for i in images])

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, backbone: Backbone, seed: int = 0, *, cache_dir: str | None = None,
             **kwargs: Any) -> Adapter:
        """An adapter built from tiny random-initialised weights that fit ``backbone`` (a tiny
        preset backbone), saved in the real on-disk layout and loaded through :meth:`load`.
        ``kwargs`` go to the constructor (scale, window). Plugins that support
        ``--preset tiny`` override this."""
        raise UsageError(f"adapter {cls.name!r} has no tiny preset")

    @classmethod
    def random(cls, backbone: Backbone, seed: int = 0, **kwargs: Any) -> Adapter:
        """A loaded adapter with random weights at the published size that fits ``backbone``
        (the ``random`` preset, for latency studies). Plugins that support it override this."""
        raise UsageError(f"adapter {cls.name!r} has no random (published-size) preset")

    @classmethod
    def tiny_reference(cls, seed: int = 0) -> Image.Image:
        """A synthetic reference image for the tiny preset (a face-like image with known
        keypoints for identity adapters). The default is a smooth colour pattern."""
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:256, 0:256] / 255.0
        phase = rng.uniform(0, 2 * np.pi, size=3)
        channels = [0.5 + 0.5 * np.sin(6 * x + 4 * y + p) for p in phase]
        array = (np.stack(channels, axis=-1) * 255).astype(np.uint8)
        return Image.fromarray(array, "RGB")

