"""The :class:`Metric` interface.

A metric scores a batch of generated images, optionally against their references, prompts,
baseline images (the same cell without the adapter, or on another backbone) and timings. It
declares what it needs so the engine can pass only that, and it reports itself unavailable,
with the reason, when its model or package is missing: a score is never invented.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError

if TYPE_CHECKING:
    from PIL import Image

#: What a metric may need besides the generated images.
METRIC_NEEDS = ("reference", "prompt", "baseline", "timing")


@dataclass
class MetricBatch:
    """Inputs for one :meth:`Metric.score` call; every list has one entry per image.

    :ivar images: generated images (PIL, RGB).
    :ivar references: the reference image of each cell (adapters' input), if any.
    :ivar prompts: the prompt of each cell.
    :ivar baselines: an image to compare against (e.g. the same cell with the adapter off).
    :ivar timings: per-image timing dicts (``total_s``, ``denoise_s``, ...).
    :ivar purpose: ``"final"`` for generated images, ``"trajectory"`` for the predicted clean
        images of intermediate steps (a metric that keeps counts for its notes skips those).
    """

    images: Sequence[Image.Image]
    references: Sequence[Image.Image | None] | None = None
    prompts: Sequence[str] | None = None
    baselines: Sequence[Image.Image | None] | None = None
    timings: Sequence[dict[str, float]] | None = None
    purpose: str = "final"

    def __len__(self) -> int:
        return len(self.images)


class Metric(ABC):
    """A batched image metric.

    Class attributes (set them in your subclass):

    :cvar name: registry name (``"identity"``, ``"lpips"``).
    :cvar needs: subset of :data:`METRIC_NEEDS` the metric requires.
    :cvar higher_is_better: direction, for reports and knee detection.
    :cvar kinds: adapter kinds the metric measures fidelity for (``{"identity"}``; ``{"none"}``
        for prompt fidelity, what a run without an adapter is judged on); empty for
        diagnostics that apply to any image (sharpness, contrast). A step recommendation is
        only made on a metric of the adapter's kind. Recorded with every run.
    :cvar default_for: adapter kinds for which the metric is in a sweep's default list besides
        the kind-matched ones (a metric is always a default for the kinds in :attr:`kinds`);
        ``"*"``: every kind, and runs without an adapter (``"none"``). E.g. LPIPS is a
        default for ``{"identity", "style"}``, sharpness for ``{"*"}``.
    :cvar model_free: True when the metric loads no model weights (sharpness, contrast,
        latency): the only defaults of the ``tiny`` and ``random`` presets.
    :cvar worst: the metric's worst possible value when bounded (cosine similarity: -1), used
        by ``report --missing worst`` for images it could not score; ``None``: unbounded.
    :cvar description: one line for ``adapterswap list metrics``.
    :cvar options_spec: the options the constructor takes besides ``device`` (name ->
        default); any other option is refused with the known ones listed
        (:meth:`check_options`). Empty: the metric takes none.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    higher_is_better: ClassVar[bool] = True
    kinds: ClassVar[frozenset[str]] = frozenset()
    default_for: ClassVar[frozenset[str]] = frozenset()
    model_free: ClassVar[bool] = False
    worst: ClassVar[float | None] = None
    description: ClassVar[str] = ""
    options_spec: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def class_problems(cls, klass: type) -> list[str]:
        """What is wrong with a subclass's declaration (used when a plugin registers it)."""
        problems = []
        needs = getattr(klass, "needs", None)
        if not isinstance(needs, (frozenset, set, tuple)) or not set(needs) <= set(METRIC_NEEDS):
            problems.append(f"needs={needs!r} must be a subset of {', '.join(METRIC_NEEDS)}")
        for attr in ("kinds", "default_for"):
            value = getattr(klass, attr, None)
            if not (isinstance(value, (frozenset, set, tuple))
                    and all(isinstance(k, str) and k for k in value)):
                problems.append(f"{attr}={value!r} must be a set of adapter kind names")
        abstract = sorted(getattr(klass, "__abstractmethods__", ()))
        if abstract:
            problems.append(f"abstract methods not implemented: {', '.join(abstract)}")
        return problems

    @classmethod
    def evaluator(cls, options: Mapping[str, Any] | None = None) -> str:
        """One line naming the model (and how it is used) behind this metric's figures with
        ``options``: the report prints it beside every figure of the metric, so a reader knows
        which recognizer or network produced a number. Default: :attr:`description`. A metric
        whose model is an option overrides it."""
        return cls.description or cls.name

    @classmethod
    def known_options(cls) -> list[str]:
        """The option names the constructor accepts, ``device`` included, sorted."""
        return sorted({"device", *cls.options_spec})

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse options the metric does not know, naming them and the known ones (a typo
        must not be ignored: the sweep would run with the default)."""
        unknown = sorted(set(options) - set(cls.known_options()))
        if unknown:
            names = ", ".join(repr(key) for key in unknown)
            raise InvalidArgumentError(
                "metric_options", {cls.name: dict(options)},
                f"unknown option{'s' if len(unknown) > 1 else ''} {names} of metric "
                f"{cls.name!r}; known options: {', '.join(cls.known_options())}")

    def __init__(self, *, device: str | None = None, **options: Any) -> None:
        """:param device: where a model-based metric runs; :param options: metric-specific
        (e.g. a model path), declared in :attr:`options_spec`; unknown ones are refused."""
        self.check_options(options)
        self.device = device
        self.options = dict(options)
        self.loaded = False

    @classmethod
    def weights_status(cls, options: Mapping[str, Any] | None = None) -> tuple[bool, str]:
        """Whether the weights this metric would load with ``options`` are on this machine
        (a configured path or the local Hugging Face cache), and where they are or what is
        missing. Checked without network and without loading anything (``adapterswap
        doctor``): weights that could still be downloaded are not present. The default is a
        metric that needs no weights; model metrics override it."""
        return True, "needs no weights"

    def availability(self) -> str | None:
        """``None`` if the metric can run here, else the reason it cannot (a missing package
        or model). Cheap: must not load models."""
        return None

    def load(self) -> Metric:
        """Load models once; raise :class:`MetricUnavailableError` with the reason if
        impossible."""
        if self.loaded:
            return self
        reason = self.availability()
        if reason is not None:
            raise MetricUnavailableError(f"metric {self.name!r} is unavailable: {reason}")
        self.loaded = True
        return self

    def notes(self) -> list[str]:
        """Caveats for the report about how this metric was computed here (e.g. "the
        evaluation model is the conditioning model"). Called after :meth:`load`."""
        return []

    def check_batch(self, batch: MetricBatch) -> None:
        """Raise if the batch lacks what the metric ``needs``."""
        fields = {"reference": batch.references, "prompt": batch.prompts,
                  "baseline": batch.baselines, "timing": batch.timings}
        for need in self.needs:
            values = fields[need]
            if values is None or len(values) != len(batch.images):
                raise InvalidArgumentError(
                    need + "s", None if values is None else f"{len(values)} items",
                    f"metric {self.name!r} needs one {need} per image ({len(batch.images)})",
                )

    @abstractmethod
    def score(self, batch: MetricBatch) -> list[float | None]:
        """One score per image (``None`` where a score is undefined, e.g. no face found)."""


#: The order of a default metric list after the kind-matched metrics: what the metric needs
#: (reference-based, prompt-based, image-only, timing), then its name.
_NEEDS_ORDER = ("reference", "baseline", "prompt", "", "timing")


def default_metrics(adapter_kind: str | None, classes: Iterable[type[Metric]], *,
                    model_free_only: bool = False) -> list[str]:
    """The metrics a sweep scores when none are given, from the metrics' declarations: those
    measuring fidelity for ``adapter_kind`` (:attr:`Metric.kinds`; ``None`` or ``"none"``: no
    adapter, prompt fidelity) by name, then those whose :attr:`Metric.default_for` names the
    kind or ``"*"``. ``model_free_only``: only :attr:`Metric.model_free` ones (presets of
    random weights, where model-based scores mean nothing)."""
    kind = adapter_kind or "none"
    classes = [c for c in classes if c.model_free or not model_free_only]
    matched = sorted(c.name for c in classes if kind in c.kinds)

    def order(cls: type[Metric]) -> tuple[int, str]:
        need = next((n for n in _NEEDS_ORDER if n and n in cls.needs), "")
        return _NEEDS_ORDER.index(need), cls.name

    extra = [c for c in classes if c.name not in matched
             and (kind in c.default_for or "*" in c.default_for)]
    return matched + [c.name for c in sorted(extra, key=order)]
