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

import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError, UsageError

if TYPE_CHECKING:
    from adapterswap.fastpath import FastPath

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Metrics used when none are given, by adapter kind (those not installed are left out).
DEFAULT_METRICS = {
    "identity": ["identity", "lpips", "clip-t", "sharpness", "contrast", "latency"],
    "style": ["style", "clip-t", "lpips", "sharpness", "contrast", "latency"],
    "object": ["clip-i", "dino", "clip-t", "sharpness", "contrast", "latency"],
    None: ["clip-t", "sharpness", "contrast", "latency"],
}
#: ``tiny``: tiny random models on CPU; ``random``: random weights at the published sizes
#: (real latency and memory without downloads, meaningless images).
PRESETS = (None, "tiny", "random")
#: Metrics that need no model weights (the tiny preset's default).
MODEL_FREE_METRICS = ("sharpness", "contrast", "latency")
SYNTHETIC_REFERENCE = "synthetic:0"
#: Seeds are integers in ``[0, MAX_SEED]``. ``torch.Generator.manual_seed`` takes
#: ``0 .. 2**64 - 1`` (a negative seed silently aliases a large one: -1 is 2**64 - 1, larger
#: ones overflow), and the store keeps seeds as SQLite INTEGERs (signed 64-bit), so
#: ``2**63 - 1`` is the largest seed that is both drawn and stored exactly.
MAX_SEED = 2**63 - 1
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
        whose cells plan enough work to repay it (``Backbone.compile_repays``: FLUX ~470
        image-steps, SD1.5 ~3000 forwards, SDXL ~3700 on an H100), off elsewhere. The first call
        at each batch shape compiles (seconds to minutes).
    :ivar attention: SDPA kernel preference (:data:`adapterswap.fastpath.ATTENTION_CHOICES`).
    :ivar fp8: float8 linear layers (an approximation: its cells get keys of their own).
    :ivar cache: block cache policy, ``"threshold:T"`` or ``"interval:N"`` (an approximation,
        FLUX backbones only: :mod:`adapterswap.blockcache`; cells get keys of their own).
    :ivar overlap: finish cells (copy to host, images, metrics, store) on a background thread
        while the next forwards run; ``None`` (default): on when the sweep runs on CUDA.
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
    defaults_used: list[str] = field(default_factory=list, repr=False)
    _resolved_sources: dict[str, str] = field(default_factory=dict, repr=False)

    def fast_path(self, device: str, forwards: int = 0,
                  repays: bool | None = None) -> FastPath:
        """The fast-path switches for a backbone on ``device`` whose cells plan ``forwards``
        denoiser forwards: with ``compile=None``, compile on CUDA where it ``repays`` itself
        (``Backbone.compile_repays``; without it, from
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
        return data

    # ------------------------------------------------------------------ validation
    def validate(self) -> SweepSpec:
        """Check every field, resolve defaults that need the registries; return self."""
        from adapterswap.plugins import adapters, backbones, get_adapter, get_backbone, metrics

        self.backbones = _str_list("backbones", self.backbones)
        if not self.backbones:
            raise InvalidArgumentError("backbones", self.backbones, "give at least one backbone")
        if len(set(self.backbones)) != len(self.backbones):
            raise InvalidArgumentError("backbones", self.backbones, "repeated backbone")
        classes = [get_backbone(name) for name in self.backbones]  # unknown -> suggestion
        del backbones, adapters
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
                adapter_cls(scale=self.scale, start=self.start, end=self.end).check_backbone(cls)
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
        for cls in classes:
            check_steps("steps", self.step_grid(cls), cls)
            check_size(cls, self.height, self.width,
                       default=(_tiny_or_default(self, cls, "height"),
                                _tiny_or_default(self, cls, "width")))
            check_guidance("guidance_scale", self.guidance_scale, cls)
        if not isinstance(self.max_batch, int) or isinstance(self.max_batch, bool) \
                or self.max_batch < 1:
            raise InvalidArgumentError("max_batch", self.max_batch, "must be an integer >= 1")
        for name in ("step_parallel", "compile", "overlap"):
            if getattr(self, name) not in (None, True, False):
                raise InvalidArgumentError(name, getattr(self, name), "must be true or false")
        self._validate_backbone_options(classes)
        self.cache = self.fast_path("cpu").cache  # validates attention, fp8 and cache
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
                check_reference("references", ref)
        elif self.references:
            raise InvalidArgumentError("references", self.references,
                                       "references need an adapter (adapter is 'none')")

        kind = None
        if adapter_names:
            kind = get_adapter(sorted(adapter_names)[0]).kind
        self.metrics = _str_list("metrics", self.metrics)
        registry = metrics()
        if not self.metrics:
            self.metrics = [m for m in DEFAULT_METRICS[kind] if m in registry]
            if self.preset in ("tiny", "random"):
                self.metrics = [m for m in self.metrics if m in MODEL_FREE_METRICS]
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
        """The options of one backbone: the flat options plus its own table, if any."""
        from adapterswap.plugins import backbones

        names = set(backbones().names())
        flat = {k: v for k, v in self.backbone_options.items()
                if not (isinstance(v, dict) and (k in self.backbones or k in names))}
        own = self.backbone_options.get(backbone)
        return {**flat, **(own if isinstance(own, dict) else {})}

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
        if self.only_default_steps:
            return [backbone_cls.default_steps]
        if self.steps:
            return sorted(set(self.steps))
        return backbone_cls.default_step_grid()

    # ------------------------------------------------------------------ cells
    def cells(self) -> list[Cell]:
        """Every cell of the sweep, in a stable order (validate first)."""
        from adapterswap.plugins import get_backbone

        out = []
        for backbone in self.backbones:
            cls = get_backbone(backbone)
            self._resolved_sources[backbone] = self._source_of(backbone, cls)
            adapter = self.adapter_for(cls)
            refs = self.references if adapter else [""]
            for ref in refs:
                for adapter_name, scale, start, end in self.adapter_settings(adapter):
                    for prompt in self.prompts:
                        for seed in self.seeds:
                            for steps in self.step_grid(cls):
                                out.append(self._cell(
                                    cls, backbone, adapter_name, scale, start, end, ref,
                                    prompt, seed, steps))
        return out

    def adapter_settings(self, adapter: str | None) -> list[tuple[str, float | None, float,
                                                                  float]]:
        """(adapter, scale, start, end) variants: the scale x window grid, plus 'none'."""
        if adapter is None:
            return [("none", None, 0.0, 1.0)]
        scales = self.scales or [self.scale]
        windows = self.windows or [[self.start, self.end]]
        settings = [(adapter, s, w[0], w[1]) for s in scales for w in windows]
        if self.adapter_off:
            settings.append(("none", None, 0.0, 1.0))
        return settings

    def _source_of(self, name: str, cls: Any) -> str:
        """The source a model loads from: the preset, the spec's, config.toml's, or the
        plugin's default (never ``""``: cells of different sources must not share keys)."""
        from adapterswap.config import configured_source

        if self.preset:
            return self.preset
        return self.sources.get(name) or configured_source(name) or cls.default_source

    def _cell(self, cls: Any, backbone: str, adapter: str, scale: float | None, start: float,
              end: float, ref: str, prompt: str, seed: int, steps: int) -> Cell:
        on = adapter != "none"
        tiny = self.preset or ""
        if on and adapter not in self._resolved_sources:
            from adapterswap.plugins import get_adapter

            self._resolved_sources[adapter] = self.adapter_source or self._source_of(
                adapter, get_adapter(adapter))
        return Cell(
            backbone=backbone, adapter=adapter, scale=scale, start=start, end=end,
            reference=ref, prompt=prompt, seed=seed, steps=steps,
            height=self.height or _tiny_or_default(self, cls, "height"),
            width=self.width or _tiny_or_default(self, cls, "width"),
            guidance_scale=self.guidance_scale,
            source=self._resolved_sources.get(backbone) or self.sources.get(backbone, tiny),
            adapter_source=self._resolved_sources.get(adapter, self.adapter_source or tiny)
            if on else "",
            dtype=self.dtype or "",
            adapter_options=json.dumps(self.adapter_options, sort_keys=True) if on else "{}",
            trajectory=self.trajectory,
            probes=self.probes,
            backbone_options=json.dumps(self.options_for(backbone), sort_keys=True),
        )


def _tiny_or_default(spec: SweepSpec, cls: Any, attr: str) -> int:
    if spec.preset == "tiny":
        from adapterswap.tiny import TINY_SIZE

        family_key = {"flux": "flux-dev"}.get(cls.family, cls.family)
        if family_key in TINY_SIZE:
            return TINY_SIZE[family_key][0 if attr == "height" else 1]
    return getattr(cls, f"default_{attr}")


def get_metric_cls(name: str) -> Any:
    from adapterswap.plugins import get_metric

    return get_metric(name)


@dataclass(frozen=True)
class Cell:
    """One image of the sweep. Its key hashes every field and the software versions."""

    backbone: str
    adapter: str
    scale: float | None
    start: float
    end: float
    reference: str
    prompt: str
    seed: int
    steps: int
    height: int
    width: int
    guidance_scale: float | None
    source: str
    adapter_source: str
    dtype: str
    adapter_options: str = "{}"
    trajectory: bool = False
    probes: bool = False
    backbone_options: str = "{}"

    def config(self) -> dict[str, Any]:
        return asdict(self)

    def key(self, versions: Mapping[str, str],
            identity: Mapping[str, Any] | None = None) -> str:
        """sha256 of the cell's fields, the software versions and ``identity``: what else
        changes its pixels or scores (code hash, weights identity, reference content, device
        kind, dtype, metric options: :meth:`Provenance.cell_identity
        <adapterswap.sweep.provenance.Provenance.cell_identity>`)."""
        cell = self.config()
        payload = {"cell": cell, "versions": dict(versions)}
        if identity is not None:
            # the weights' identity replaces where they were read from: the same weights
            # moved to another folder resume, other weights at the same path do not
            del cell["source"], cell["adapter_source"]
            payload["identity"] = dict(identity)
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def group(self) -> tuple[Any, ...]:
        """Cells that share a loaded backbone, adapter setting, reference and prompt."""
        return (self.backbone, self.adapter, self.scale, self.start, self.end, self.reference,
                self.prompt, self.height, self.width, self.guidance_scale)

    def setting(self) -> tuple[str, float | None, float, float]:
        """The adapter setting: name, scale, start, end."""
        return (self.adapter, self.scale, self.start, self.end)


# ---------------------------------------------------------------------- checks
# Shared by the sweep's validation and ``generate``: each names the argument and the value, and
# none loads a model or writes anything.
def check_seed(argument: str, value: Any) -> int:
    """A seed in ``[0, MAX_SEED]`` (see :data:`MAX_SEED`)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InvalidArgumentError(argument, value,
                                   f"must be an integer in [0, {MAX_SEED}] (2**63 - 1: what "
                                   "a torch generator and the store's 64-bit integers hold)")
    return value


def check_steps(argument: str, steps: Sequence[int], backbone_cls: Any) -> None:
    """Every step count within the backbone's ``max_steps``."""
    limit = getattr(backbone_cls, "max_steps", None)
    for n in steps:
        if limit is not None and n > limit:
            raise InvalidArgumentError(argument, n, f"backbone {backbone_cls.name!r} takes at "
                                                    f"most {limit} steps (its max_steps)")


def check_size(backbone_cls: Any, height: Any, width: Any, *, default: tuple[int, int],
               names: tuple[str, str] = ("height", "width")) -> None:
    """Height and width (``None``: ``default``) that the backbone can make: integers >= 8, a
    multiple of its latent grid, at most ``max_pixels`` together."""
    multiple = 16 if backbone_cls.family == "flux" else 8
    for name, value in zip(names, (height, width)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 8:
            raise InvalidArgumentError(name, value, "must be an integer >= 8")
        if value % multiple:
            raise InvalidArgumentError(name, value,
                                       f"{backbone_cls.name} needs a multiple of {multiple}")
    h = default[0] if height is None else height
    w = default[1] if width is None else width
    limit = getattr(backbone_cls, "max_pixels", None)
    if limit is not None and h * w > limit:
        name, value = (names[0], height) if height is not None else (names[1], width)
        raise InvalidArgumentError(
            name, value, f"{h} x {w} is {h * w / 1e6:.1f} MP; backbone {backbone_cls.name!r} "
                         f"makes images of at most {limit / 1e6:.1f} MP (its max_pixels)")


def check_guidance(argument: str, value: Any, backbone_cls: Any) -> None:
    """A finite guidance scale >= 0 that the backbone takes (none on guidance-free backbones,
    where only 0 and 1, 'off', are accepted, as :meth:`Backbone.resolve_guidance_scale`)."""
    if value is None:
        return
    if not _finite(value, minimum=0):
        raise InvalidArgumentError(argument, value, "must be a finite number >= 0")
    if backbone_cls.guidance_mode == "none" and value not in (0, 1):
        raise InvalidArgumentError(argument, value,
                                   f"backbone {backbone_cls.name!r} runs without guidance "
                                   "(guidance_mode='none')")


def check_dtype(argument: str, value: Any) -> None:
    """A dtype name :func:`adapterswap.backbone.parse_dtype` knows (``None``: the default)."""
    if value is None:
        return
    from adapterswap.backbone import parse_dtype

    try:
        parse_dtype(value)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(argument, value, str(exc).split(": ", 1)[1]) from None


def check_device(argument: str, value: Any) -> None:
    """A device that exists here: ``cpu``; ``cuda`` / ``cuda:N`` with CUDA available and ``N``
    below the device count; ``mps`` where available (``None``: the default, CUDA if any)."""
    if value is None:
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError(argument, value,
                                   "not a device: use cpu, cuda, cuda:N or mps") from None
    kind = device.type
    if kind == "cpu":
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(argument, value,
                                       "CUDA is not available here (torch.cuda.is_available() "
                                       "is False: no GPU or driver, or a CPU-only torch)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidArgumentError(argument, value,
                                       f"this machine has {count} CUDA device(s): cuda:0 .. "
                                       f"cuda:{count - 1}")
        return
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidArgumentError(argument, value, "MPS is not available here "
                                       "(torch.backends.mps.is_available() is False)")
        return
    available = getattr(getattr(torch, kind, None), "is_available", None)
    if not callable(available):
        raise InvalidArgumentError(argument, value, f"device type {kind!r} cannot run models: "
                                                    "use cpu, cuda, cuda:N or mps")
    if not available():
        raise InvalidArgumentError(argument, value, f"{kind} is not available here")


def check_reference(argument: str, ref: str) -> None:
    """A reference that can be read: ``synthetic:N`` or an image file PIL decodes, within
    its decompression-bomb limit (:func:`adapterswap.adapter.load_image`)."""
    if ref.startswith("synthetic:"):
        number = ref.split(":", 1)[1]
        if not (number.isdigit() and int(number) <= MAX_SEED):
            raise InvalidArgumentError(argument, ref, "a synthetic reference is synthetic:N "
                                                      "with N an integer >= 0")
        return
    from adapterswap.adapter import load_image

    load_image(ref, argument=argument)


def _creatable(argument: str, shown: str, path: Path) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable directory."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    where = f"the folder {str(ancestor)!r}" if ancestor == path.parent else \
        f"cannot be created: {str(ancestor)!r}"
    if not ancestor.is_dir():
        raise InvalidArgumentError(argument, shown, f"{where} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidArgumentError(argument, shown, f"{where} is not writable")


def check_output_dir(argument: str, path: str) -> None:
    """An output folder that is a writable directory or can be created (nothing is created
    here: a refused command leaves nothing behind)."""
    target = Path(path).expanduser()
    if target.exists():
        if not target.is_dir():
            raise InvalidArgumentError(argument, path, "exists and is not a directory")
        if not os.access(target, os.W_OK | os.X_OK):
            raise InvalidArgumentError(argument, path, "the directory is not writable")
        return
    _creatable(argument, path, target)


def check_output_file(argument: str, path: str) -> None:
    """An image file PIL can write (its extension names a format PIL saves) in a folder that
    is writable or can be created (nothing is created here)."""
    from PIL import Image

    target = Path(path).expanduser()
    Image.init()
    suffix = target.suffix.lower()
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        what = f"unknown image file extension {suffix!r}" if suffix else \
            "no image file extension"
        raise InvalidArgumentError(argument, path, f"{what}: use .png, .jpg or .webp")
    if target.is_dir():
        raise InvalidArgumentError(argument, path, "is a directory, not an image file")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise InvalidArgumentError(argument, path, "exists and is not writable")
        return
    _creatable(argument, path, target)


def _no_repeats(name: str, values: Sequence[Any], what: str) -> None:
    """Refuse a repeated value: it would make the same cell twice (one key), so the summary
    would count cells the store holds once."""
    seen: list[Any] = []
    for value in values:
        if value in seen:
            raise InvalidArgumentError(name, value, f"repeated {what}: each {what} may be given "
                                                    "once (a repeat runs the same cells twice)")
        seen.append(value)


# ---------------------------------------------------------------------- parsing helpers
def _finite(value: Any, minimum: float | None = None) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and (minimum is None or value >= minimum)


def _str_list(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise InvalidArgumentError(name, value, "must be a list of strings")
    for item in value:
        if not item.strip() or "\x00" in item:
            raise InvalidArgumentError(name, item, "must be a non-empty string without NUL")
    return list(value)


def _int_list(name: str, value: Any, *, minimum: int) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, Sequence):
        raise InvalidArgumentError(name, value, "must be a list of integers")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise InvalidArgumentError(name, item, f"must be an integer >= {minimum}")
        if item < minimum:
            raise InvalidArgumentError(name, item, f"must be an integer >= {minimum}")
        out.append(item)
    return out


def _float_list(name: str, value: Any) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise InvalidArgumentError(name, value, "must be a list of numbers")
    for item in value:
        if not _finite(item):
            raise InvalidArgumentError(name, item, "must be a finite number")
    return [float(v) for v in value]


def parse_float_list(name: str, text: str | None) -> list[float] | None:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (flags)."""
    if text is None:
        return None
    items = []
    for part in text.split(","):
        try:
            items.append(float(part.strip()))
        except ValueError:
            raise InvalidArgumentError(name, part.strip(), "must be a number") from None
    return items


def parse_windows(name: str, text: str | None) -> list[list[float]] | None:
    """``"0-1,0-0.25,0.5-1"`` -> ``[[0, 1], [0, 0.25], [0.5, 1]]`` (flags)."""
    if text is None:
        return None
    windows = []
    for part in text.split(","):
        start, sep, end = part.strip().partition("-")
        try:
            if not sep:
                raise ValueError
            windows.append([float(start), float(end)])
        except ValueError:
            raise InvalidArgumentError(name, part.strip(), "expected START-END, e.g. 0-0.5") \
                from None
    return windows


def parse_int_list(name: str, text: str | None) -> list[int] | None:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (flags); errors name the flag and the bad item."""
    if text is None:
        return None
    items = []
    for part in text.split(","):
        part = part.strip()
        try:
            items.append(int(part))
        except ValueError:
            raise InvalidArgumentError(name, part, "must be an integer") from None
    return items


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line (``#`` comments skipped)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError("--prompts", path, "no such file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InvalidArgumentError("--prompts", path, "not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not prompts:
        raise UsageError(f"invalid --prompts={path!r}: the file has no prompts")
    return prompts
