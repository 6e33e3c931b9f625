"""What a sweep runs: the :class:`SweepSpec`, its validation, and its expansion into cells.

A spec comes from a TOML file (``--config sweep.toml``) and/or command-line flags (flags win).
Every invalid value raises :class:`~adapterswap.errors.InvalidArgumentError` naming the field
and the value, before anything heavy is loaded.

Example ``sweep.toml``::

    backbones = ["flux-dev", "flux-schnell"]
    adapter = "infusenet"          # default: each backbone family's built-in adapter
    scale = 1.0
    references = ["faces/ada.jpg", "faces/alan.jpg"]
    prompts = ["a portrait of a chef", "a photo in a snowy forest"]
    seeds = [0, 1, 2, 3]
    steps = [1, 2, 4, 8, 16, 28]   # default: each backbone's own grid
    metrics = ["identity", "lpips", "sharpness", "contrast", "latency"]
    out = "runs/flux-swap"
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError
from adapterswap.run_defaults import apply_to_spec
from adapterswap.sweep.cells import Cell, expand, preset_size
from adapterswap.sweep.checks import (  # noqa: F401 - re-exported: callers import them here
    MAX_SEED,
    _finite,
    _float_list,
    _int_list,
    _no_repeats,
    _str_list,
    check_device,
    check_dtype,
    check_enhancers,
    check_guidance,
    check_image_format,
    check_output_dir,
    check_output_file,
    check_probes,
    check_reference,
    check_seed,
    check_size,
    check_steps,
    parse_float_list,
    parse_int_list,
    parse_windows,
    read_prompts_file,
)

if TYPE_CHECKING:
    from adapterswap.fastpath import FastPath

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: ``tiny``: tiny random models on CPU; ``random``: random weights at the published sizes
#: (real latency and memory without downloads, meaningless images).
PRESETS = (None, "tiny", "random")
SYNTHETIC_REFERENCE = "synthetic:0"
#: Prompts used when none are given (the tiny preset uses the first only).
DEFAULT_PROMPTS = [
    "a portrait photo of a person, soft studio light",
    "a person reading a book in a cafe, cinematic lighting",
    "a watercolor painting of a lighthouse on a cliff",
    "a photo of a cat sitting on a windowsill at sunset",
]


@dataclass
class SweepSpec:
    """A sweep: backbones x references x prompts x seeds x step counts, one adapter setting.

    :ivar adapter: adapter name; ``None`` uses each backbone's ``default_adapter``; ``"none"``
        runs without an adapter.
    :ivar references: image paths; ``synthetic:N`` is the adapter's synthetic reference N
        (the default with ``preset="tiny"``). Each file is decoded when the spec is validated
        (before any model loads), within PIL's decompression-bomb limit.
    :ivar seeds: integers in ``[0, MAX_SEED]``; seeds, prompts, references, scales and
        windows may each be given once (a repeat would run the same cells twice).
    :ivar steps: the step grid; empty uses each backbone's own grid; at most each
        backbone's ``max_steps``. ``height`` x ``width``: at most its ``max_pixels``.
    :ivar out: the output folder: a writable directory, or one that can be created (it is
        created only when the sweep starts, never by a refused spec).
    :ivar scales: adapter scale grid (ablation); empty uses ``scale``.
    :ivar windows: adapter windows ``[[start, end], ...]`` (ablation); empty uses
        ``[[start, end]]``.
    :ivar adapter_off: also run every cell with the adapter detached (ablation baseline).
    :ivar trajectory: decode and score the predicted clean image at every step.
    :ivar probes: record attention-stream norm probes (adapter vs base stream) per step and
        block.
    :ivar only_default_steps: run each backbone at its own default step count only (the
        ``swap`` comparison).
    :ivar step_parallel: advance runs with different step counts together in one forward;
        ``None`` (default): yes, unless the denoiser is compiled (compiled graphs want the
        constant batch of the sequential order: one step count at a time, seeds batched).
    :ivar max_batch: most samples in one denoiser forward.
    :ivar compile: ``torch.compile`` each backbone's denoiser and adapter (the fast path,
        :mod:`adapterswap.fastpath`); ``None`` (default): on with a CUDA device for backbones
        whose cells plan enough work to repay it (the break-even of the backbone's compile
        profile for this card, :mod:`adapterswap.fastpath.profile`), off elsewhere. The first call
        at each batch shape compiles (seconds to minutes).
    :ivar attention: SDPA kernel preference (:data:`adapterswap.fastpath.ATTENTION_CHOICES`).
    :ivar fp8: float8 linear layers (an approximation: its cells get keys of their own).
    :ivar cache: block cache policy, ``"threshold:T"`` or ``"interval:N"`` (an approximation,
        backbones that declare ``block_cache_layout`` only:
        :mod:`adapterswap.fastpath.blockcache`; cells get keys of their own).
    :ivar overlap: finish cells (copy to host, images, metrics, store) on a background thread
        while the next forwards run; ``None`` (default): on when the sweep runs on CUDA.
    :ivar image_format: ``png`` (default), ``webp`` (lossless) or ``jpeg`` (quality 95): how
        cell images are written (:mod:`adapterswap.sweep.images_io`); metrics read no file.
    :ivar metric_options: per-metric options, e.g. ``{"identity": {"recognizer": "ir-se50"}}``.
    :ivar timing_repeats: timed runs per latency configuration after one warm-up per backbone
        (stored as median and IQR); 0 measures no latency.
    :ivar timing_budget_s: seconds latency timing may take per adapter setting before it
        times only two step counts and fits a fixed + per-step model to the others (residuals
        stored); default 60 s (5 s with the tiny preset).
    :ivar backbone_options: backbone options (``Backbone.check_options``), e.g.
        ``{"timestep_spacing": "trailing"}`` for every backbone of the sweep, or a table per
        backbone name, ``{"sd15": {"timestep_spacing": "trailing"}}``. They enter cell keys.
    """

    backbones: list[str] = field(default_factory=list)
    adapter: str | None = None
    scale: float | None = None
    start: float = 0.0
    end: float = 1.0
    references: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: list[int] = field(default_factory=list)
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    metrics: list[str] = field(default_factory=list)
    out: str = "runs/sweep"
    preset: str | None = None
    dtype: str | None = None
    device: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    adapter_source: str | None = None
    adapter_options: dict[str, Any] = field(default_factory=dict)
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    only_default_steps: bool = False
    scales: list[float] = field(default_factory=list)
    windows: list[list[float]] = field(default_factory=list)
    adapter_off: bool = False
    enhancers: list[str] | None = None  # NAME[:k=v,...] each (adapterswap.enhancer); "none"
    enhancer_backbones: list[str] | None = None  # the backbones they act on (None: all)
    trajectory: bool = False
    probes: bool = False
    step_parallel: bool | None = None
    compile: bool | None = None
    attention: str = "auto"
    fp8: bool = False
    cache: str | None = None
    overlap: bool | None = None
    max_batch: int = 16
    timing_repeats: int = 5
    timing_budget_s: float | None = None
    save_images: bool = True
    image_format: str = "png"
    defaults_used: list[str] = field(default_factory=list, repr=False)
    _resolved_sources: dict[str, str] = field(default_factory=dict, repr=False)
    #: per backbone, what its adapter's options ask where the spec gives nothing
    #: (:meth:`Adapter.run_defaults <adapterswap.adapter.Adapter.run_defaults>`)
    _run_defaults: dict[str, Any] = field(default_factory=dict, repr=False)

    def fast_path(self, device: str, forwards: int = 0,
                  repays: bool | None = None) -> FastPath:
        """The fast-path switches for a backbone on ``device`` whose cells plan ``forwards``
        denoiser forwards: with ``compile=None``, compile on CUDA where it ``repays`` itself
        (``Accelerator.compile_repays`` from the compile profile; without it, from
        :data:`adapterswap.fastpath.AUTO_COMPILE_FORWARDS` forwards on)."""
        from adapterswap.fastpath import AUTO_COMPILE_FORWARDS, FastPath

        compile_ = self.compile
        if compile_ is None:
            if repays is None:
                repays = forwards >= AUTO_COMPILE_FORWARDS
            compile_ = str(device).startswith("cuda") and repays
        return FastPath(attention=self.attention, compile=bool(compile_), fp8=self.fp8,
                        cache=self.cache)

    def use_overlap(self) -> bool:
        """Whether finishing overlaps the forwards (see ``overlap``)."""
        if self.overlap is not None:
            return self.overlap
        if self.preset == "tiny":
            return False  # the tiny preset runs on the CPU
        if self.device is not None:
            return str(self.device).startswith("cuda")
        from adapterswap.backbone import default_device

        return default_device().startswith("cuda")

    def use_step_parallel(self, compiled: bool) -> bool:
        """Whether runs with different step counts share forwards (see ``step_parallel``)."""
        if self.step_parallel is not None:
            return self.step_parallel
        return not compiled

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "spec") -> SweepSpec:
        """Build from a mapping (TOML table, flags); unknown keys are refused by name."""
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(
                unknown[0], data[unknown[0]],
                f"unknown field in {origin}; known fields: {', '.join(sorted(known))}",
            )
        spec = cls()
        for key, value in data.items():
            setattr(spec, key, value)
        return spec

    @classmethod
    def from_toml(cls, path: str | Path) -> dict[str, Any]:
        """The raw mapping of a TOML spec file (merged with flags by :meth:`merged`)."""
        path = Path(path)
        if not path.is_file():
            raise InvalidArgumentError("--config", str(path), "no such file")
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgumentError("--config", str(path), f"invalid TOML: {exc}") from None
        if "backbone" in data and "backbones" not in data:
            data["backbones"] = data.pop("backbone")
        if isinstance(data.get("backbones"), str):
            data["backbones"] = [data["backbones"]]
        return data

    @classmethod
    def merged(cls, config: Mapping[str, Any] | None, flags: Mapping[str, Any]) -> SweepSpec:
        """Config file values overridden by the flags that were given (not ``None``)."""
        data = dict(config or {})
        data.update({k: v for k, v in flags.items() if v is not None})
        return cls.from_mapping(data, origin="the sweep spec")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_resolved_sources", None)
        data.pop("_run_defaults", None)
        return data

    # ------------------------------------------------------------------ validation
    def validate(self) -> SweepSpec:
        """Check every field, resolve defaults that need the registries; return self."""
        from adapterswap.metrics.base import default_metrics
        from adapterswap.plugins import adapters, backbones, get_adapter, get_backbone, metrics

        self.backbones = _str_list("backbones", self.backbones)
        if not self.backbones:
            raise InvalidArgumentError("backbones", self.backbones, "give at least one backbone")
        if len(set(self.backbones)) != len(self.backbones):
            raise InvalidArgumentError("backbones", self.backbones, "repeated backbone")
        classes = [get_backbone(name) for name in self.backbones]  # unknown -> suggestion
        installed = [entry.cls for entry in backbones().entries()]
        del adapters
        if self.preset not in PRESETS:
            raise InvalidArgumentError("preset", self.preset,
                                       f"choose one of {', '.join(p for p in PRESETS if p)}")
        check_device("device", self.device)
        check_dtype("dtype", self.dtype)

        adapter_names = {self.adapter_for(cls) for cls in classes} - {None}
        for cls in classes:
            name = self.adapter_for(cls)
            if name is not None:
                adapter_cls = get_adapter(name)
                adapter_cls(scale=self.scale, start=self.start, end=self.end).check_backbone(
                    cls, installed=installed)
        if len(adapter_names) > 1 and self.adapter is not None:
            raise InvalidArgumentError("adapter", self.adapter, "one adapter per sweep")

        self.scales = _float_list("scales", self.scales)
        for scale in self.scales:
            if scale < 0:
                raise InvalidArgumentError("scales", scale, "must be >= 0")
        _no_repeats("scales", self.scales, "scale")
        windows = []
        for window in self.windows or []:
            if not (isinstance(window, (list, tuple)) and len(window) == 2
                    and all(_finite(v) for v in window)
                    and 0 <= window[0] < window[1] <= 1):
                raise InvalidArgumentError("windows", window,
                                           "each window is [start, end] with 0 <= start < end <= 1")
            windows.append([float(window[0]), float(window[1])])
        self.windows = windows
        _no_repeats("windows", self.windows, "window")
        if (self.scales or self.windows or self.adapter_off) and not adapter_names:
            raise InvalidArgumentError("adapter", self.adapter,
                                       "scale/window grids and adapter_off need an adapter")
        self.seeds = _int_list("seeds", self.seeds, minimum=0)
        if not self.seeds:
            raise InvalidArgumentError("seeds", self.seeds, "give at least one seed")
        for seed in self.seeds:
            check_seed("seeds", seed)
        _no_repeats("seeds", self.seeds, "seed")
        self.steps = _int_list("steps", self.steps, minimum=1)
        pairs = [(cls, get_adapter(self.adapter_for(cls)) if self.adapter_for(cls) else None)
                 for cls in classes]
        apply_to_spec(self, pairs)  # what the adapters' options ask where the spec is silent
        if self.enhancer_backbones is not None:
            self.enhancer_backbones = _str_list("enhancer_backbones", self.enhancer_backbones)
            for name in set(self.enhancer_backbones) - set(self.backbones):
                raise InvalidArgumentError("enhancer_backbones", name, "not a backbone of the "
                                           f"sweep ({', '.join(self.backbones)})")
            pairs = [(c, a) for c, a in pairs if c.name in self.enhancer_backbones]
        self.enhancers = check_enhancers(self.enhancers, [a for _, a in pairs])
        for cls in classes:
            check_steps("steps", self.step_grid(cls), cls)
            check_size(cls, self.height, self.width, default=self.size(cls))
            check_guidance("guidance_scale", self.guidance_scale, cls)
        if not isinstance(self.max_batch, int) or isinstance(self.max_batch, bool) \
                or self.max_batch < 1:
            raise InvalidArgumentError("max_batch", self.max_batch, "must be an integer >= 1")
        for name in ("step_parallel", "compile", "overlap"):
            if getattr(self, name) not in (None, True, False):
                raise InvalidArgumentError(name, getattr(self, name), "must be true or false")
        self.image_format = check_image_format("image_format", self.image_format)
        self._validate_backbone_options(classes)
        self.cache = self.fast_path("cpu").cache  # validates attention, fp8 and cache
        if self.probes:
            check_probes(self, classes)
        for cls in classes if self.cache else ():
            if cls.block_cache_layout is None:
                raise InvalidArgumentError(
                    "cache", self.cache, f"backbone {cls.name!r} has no block cache (it "
                    "declares no block_cache_layout: its denoiser is not a joint-attention "
                    "transformer the cache can serve)")
        if self.cache and self.probes:
            raise InvalidArgumentError("cache", self.cache,
                                       "probes need every block to run at every step; drop "
                                       "--probes or --cache")
        if self.timing_budget_s is not None and not _finite(self.timing_budget_s, minimum=0) \
                or self.timing_budget_s == 0:
            raise InvalidArgumentError("timing_budget_s", self.timing_budget_s,
                                       "must be a number of seconds > 0")
        if not isinstance(self.timing_repeats, int) or self.timing_repeats < 0:
            raise InvalidArgumentError("timing_repeats", self.timing_repeats,
                                       "must be an integer >= 0")

        self.prompts = _str_list("prompts", self.prompts)
        _no_repeats("prompts", self.prompts, "prompt")
        if not self.prompts:
            self.prompts = DEFAULT_PROMPTS[:1] if self.preset else list(DEFAULT_PROMPTS)
            self.defaults_used.append(f"no prompts given: using {len(self.prompts)} built-in "
                                      "prompt(s)")
        self.references = _str_list("references", self.references)
        if adapter_names:
            if not self.references:
                self.references = [SYNTHETIC_REFERENCE]
                if self.preset is None:
                    self.defaults_used.append(
                        "no --ref given: using the adapter's synthetic reference image "
                        "(give --ref for a meaningful study)")
            _no_repeats("references", self.references, "reference")
            for ref in self.references:  # read now, before any model loads
                for name in sorted(adapter_names):
                    check_reference("references", ref, get_adapter(name))
        elif self.references:
            raise InvalidArgumentError("references", self.references,
                                       "references need an adapter (adapter is 'none')")

        kind = None
        if adapter_names:
            kind = get_adapter(sorted(adapter_names)[0]).kind
        self.metrics = _str_list("metrics", self.metrics)
        registry = metrics()
        if not self.metrics:
            classes = [entry.cls for entry in registry.entries()]
            self.metrics = default_metrics(kind, classes,
                                           model_free_only=self.preset in ("tiny", "random"))
            if self.preset in ("tiny", "random"):
                self.defaults_used.append(
                    f"{self.preset} preset: model-based metrics are off by default (their "
                    "weights would be downloaded); name them with --metrics to use them")
        for name in self.metrics:
            metric_cls = get_metric_cls(name)
            if "reference" in metric_cls.needs and not adapter_names:
                raise InvalidArgumentError(
                    "metrics", name,
                    "needs a reference image, and this sweep has no adapter/references")
        if len(set(self.metrics)) != len(self.metrics):
            raise InvalidArgumentError("metrics", self.metrics, "repeated metric")
        if not isinstance(self.metric_options, dict) or not all(
                isinstance(v, dict) for v in self.metric_options.values()):
            raise InvalidArgumentError("metric_options", self.metric_options,
                                       "must map metric names to option tables")
        for name, options in self.metric_options.items():
            if name not in self.metrics:
                raise InvalidArgumentError("metric_options", name,
                                           f"options for a metric the sweep does not use "
                                           f"(metrics: {', '.join(self.metrics)})")
            try:
                get_metric_cls(name)(**options)  # the metric validates its own options
            except TypeError as exc:
                raise InvalidArgumentError("metric_options", {name: options}, str(exc)) \
                    from None
        if not isinstance(self.out, (str, Path)) or not str(self.out).strip():
            raise InvalidArgumentError("--out", self.out, "must be a directory path")
        check_output_dir("--out", str(self.out))
        return self

    def options_for(self, backbone: str) -> dict[str, Any]:
        """The options of one backbone: the flat options plus its own table, if any, plus
        those its adapter's options require (:meth:`Adapter.backbone_options
        <adapterswap.adapter.Adapter.backbone_options>`; a contradicting value is refused)."""
        from adapterswap.adapter import with_backbone_options
        from adapterswap.plugins import backbones, get_adapter, get_backbone

        names = set(backbones().names())
        flat = {k: v for k, v in self.backbone_options.items()
                if not (isinstance(v, dict) and (k in self.backbones or k in names))}
        own = self.backbone_options.get(backbone)
        options = {**flat, **(own if isinstance(own, dict) else {})}
        adapter = self.adapter_for(get_backbone(backbone))
        if adapter is None:
            return options
        return with_backbone_options(options, get_adapter(adapter), self.adapter_options,
                                     backbone=backbone)

    def _validate_backbone_options(self, classes: Sequence[Any]) -> None:
        if not isinstance(self.backbone_options, dict):
            raise InvalidArgumentError("backbone_options", self.backbone_options,
                                       "must map option names to values (or backbone names "
                                       "to option tables)")
        for key, value in self.backbone_options.items():
            if isinstance(value, dict) and key not in self.backbones:
                raise InvalidArgumentError("backbone_options", key,
                                           "an option table for a backbone the sweep does not "
                                           f"run (backbones: {', '.join(self.backbones)})")
        if not isinstance(self.adapter_options, Mapping):  # read by options_for
            raise InvalidArgumentError("adapter_options", self.adapter_options,
                                       "must map option names to values")
        for name, cls in zip(self.backbones, classes):
            cls.check_options(self.options_for(name))  # unknown names and bad values

    def adapter_for(self, backbone_cls: Any) -> str | None:
        """The adapter name used with a backbone class (``None`` for no adapter)."""
        if self.adapter == "none":
            return None
        if self.adapter is not None:
            return self.adapter
        return backbone_cls.default_adapter

    def step_grid(self, backbone_cls: Any) -> list[int]:
        """The step counts run for a backbone."""
        if self.steps:
            return sorted(set(self.steps))
        run = self._run_defaults.get(backbone_cls.name)
        own = run.steps if run is not None and run.steps is not None else None
        if self.only_default_steps:
            return [own or backbone_cls.default_steps]
        return sorted(set(backbone_cls.default_step_grid()) | ({own} if own else set()))

    # ------------------------------------------------------------------ cells
    def cells(self) -> list[Cell]:
        """Every cell of the sweep, in a stable order (validate first): see
        :func:`adapterswap.sweep.cells.expand`."""
        return expand(self)

    def size(self, backbone_cls: Any) -> tuple[int, int]:
        """``(height, width)`` of the backbone's images: the spec's, else the size the
        backbone declares for the preset (:attr:`Backbone.tiny_size
        <adapterswap.backbone.Backbone.tiny_size>` with ``tiny``), else its default."""
        default = preset_size(self.preset, backbone_cls)
        run = self._run_defaults.get(backbone_cls.name)
        if run is not None and self.preset != "tiny":  # the adapter's defaults
            default = (run.height or default[0], run.width or default[1])
        return (self.height or default[0], self.width or default[1])


def get_metric_cls(name: str) -> Any:
    from adapterswap.plugins import get_metric

    return get_metric(name)
