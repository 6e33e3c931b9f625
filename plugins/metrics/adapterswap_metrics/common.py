"""What the model-based metrics share: options, device, lazy loading, mini-batches, weights.

A :class:`ModelMetric` declares its options with their defaults in ``options_spec``; unknown
options are refused when the metric is built. Models load once, on :meth:`ModelMetric.load` or on
the first :meth:`~adapterswap.metrics.Metric.score` call, and never from a source that is missing:
:meth:`~adapterswap.metrics.Metric.availability` says why, and ``load()`` raises
:class:`~adapterswap.errors.MetricUnavailableError` with that reason.

Nothing here imports torch or transformers at module level (``adapterswap list`` stays fast).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError, WeightsNotFoundError
from adapterswap.hub import (
    ResolvedSource,
    is_offline,
    looks_like_repo_id,
    resolve_source,
    weights_status,
)
from adapterswap.metrics.base import Metric, MetricBatch

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: Weight files a transformers checkpoint may hold (safetensors first).
TRANSFORMERS_WEIGHTS = "model.safetensors|model.safetensors.index.json|pytorch_model.bin"

DEFAULT_BATCH_SIZE = 16


def missing_package(*names: str) -> str | None:
    """A reason naming the first package of ``names`` that is not installed, else None."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            return f"the Python package {name!r} is not installed (pip install {name})"
    return None


def weights_problem(source: str, required: Sequence[str], *, what: str,
                    how_to_get: str = "") -> str | None:
    """Why ``source`` (a local directory or a Hub repo id) cannot be loaded here, else None.

    Checks without network: a local directory must hold ``required``; a repo id must be in the
    Hugging Face cache when ``HF_HUB_OFFLINE`` is set (otherwise it can still be downloaded).
    """
    hint = f" {how_to_get}" if how_to_get else ""
    status = weights_status(source, required)
    if status.present:
        return None
    if status.where == "local":
        return (f"{what}: the directory {str(status.path)!r} is incomplete: missing "
                f"{', '.join(status.missing)}.{hint}")
    if not looks_like_repo_id(source):
        return (f"{what}: {source!r} is neither an existing directory nor a Hugging Face repo id "
                f"(owner/name).{hint}")
    if is_offline():
        where = "is not" if status.where == "missing" else "is incomplete"
        return (f"{what}: {source!r} {where} in the local Hugging Face cache and HF_HUB_OFFLINE "
                f"is set, so it cannot be downloaded.{hint}")
    return None


def local_weights(source: str, required: Sequence[str], *, how_to_get: str = ""
                  ) -> tuple[bool, str]:
    """Whether ``source`` (a local directory or a Hub repo id) is on this machine holding
    ``required``, and where it is or what is missing; no network. A repo id that is not in the
    local Hugging Face cache is missing, even where it could still be downloaded."""
    status = weights_status(source, required)
    if status.present:
        return True, f"{source} ({status.where}: {status.path})"
    if status.where == "missing" and looks_like_repo_id(source):
        detail = f"{source} is not in the local Hugging Face cache"
    else:
        detail = f"{source}: {status.describe()}"
    return False, f"{detail}. {how_to_get}" if how_to_get else detail


def resolve(source: str, required: Sequence[str], *, what: str,
            how_to_get: str = "") -> ResolvedSource:
    """:func:`adapterswap.hub.resolve_source`, with a missing source reported as the metric
    being unavailable. A repo id found complete in the Hugging Face cache resolves to its
    snapshot directory, so loading reads exactly the files that were checked."""
    try:
        resolved = resolve_source(source, what=what, required=required, how_to_get=how_to_get)
    except WeightsNotFoundError as exc:
        raise MetricUnavailableError(str(exc)) from exc
    if not resolved.local and resolved.cached_path is not None:
        return ResolvedSource(str(resolved.cached_path), local=True, local_files_only=True,
                              cached_path=resolved.cached_path)
    return resolved


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading report and progress bar for one load (restored after).

    Safe because :func:`from_pretrained_strict` checks the loading info itself: weights that
    are missing from the checkpoint are an error, not a log line.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()


def from_pretrained_strict(model_class: Any, resolved: ResolvedSource, *, what: str,
                           **kwargs: Any) -> Any:
    """``model_class.from_pretrained`` that refuses a checkpoint lacking any of the model's
    weights (transformers would initialise them randomly), in eval mode.

    Weights in the checkpoint that the class does not use (a CLIP text tower when only the image
    tower is loaded) are fine.
    """
    from adapterswap.weights import first_line, library_exceptions, safetensors_problem

    root = Path(resolved.source)
    for path in sorted(root.glob("*.safetensors")) if root.is_dir() else ():
        problem = safetensors_problem(path)
        if problem is not None:
            raise MetricUnavailableError(
                f"{what}: {str(path)!r} is a truncated or corrupt safetensors file ({problem})")
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(
                resolved.source, local_files_only=resolved.local_files_only,
                output_loading_info=True, **kwargs)
    except library_exceptions() as exc:
        raise MetricUnavailableError(
            f"{what}: could not load {resolved.source!r}: {first_line(exc)}") from exc
    missing = sorted(info.get("missing_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing[:4])}"
                            + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
        if mismatched:
            problems.append(f"wrong shapes for {', '.join(str(m[0]) for m in mismatched[:4])}")
        raise MetricUnavailableError(
            f"{what}: {resolved.source!r} is not a {model_class.__name__} checkpoint "
            f"({'; '.join(problems)}); refusing to score with randomly initialised weights")
    return model.eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Row-wise cosine similarity of two ``(n, d)`` tensors, computed in float64."""
    import torch

    a = a.double()
    b = b.double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


class ModelMetric(Metric):
    """A metric with a model: options with defaults, a device, loading once, mini-batches.

    Subclasses set ``options_spec`` (option name -> default), implement
    :meth:`_missing_reason` (cheap, no model loading) and :meth:`_load_models`.

    Every model metric accepts ``batch_size`` (images per forward pass, default 16) and
    ``device`` (default ``"cuda"`` when available, else ``"cpu"``).
    """

    options_spec: ClassVar[dict[str, Any]] = {}

    @classmethod
    def known_options(cls) -> list[str]:
        """``options_spec``, ``device`` and ``batch_size``, sorted."""
        return sorted({"batch_size", *super().known_options()})

    def __init__(self, *, device: str | None = None, **options: Any) -> None:
        self.check_options(options)
        merged = {"batch_size": DEFAULT_BATCH_SIZE, **self.options_spec, **options}
        super().__init__(device=device, **merged)
        batch_size = merged["batch_size"]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError("batch_size", batch_size, "must be a positive integer")
        if device is not None and not isinstance(device, str):
            raise InvalidArgumentError("device", device, "must be a string such as 'cuda:0'")
        self.batch_size = batch_size

    # -- availability and loading -------------------------------------------------------------

    def _missing_reason(self) -> str | None:
        """Why the metric cannot run here (missing package or weights), without loading."""
        return None

    def _load_models(self) -> None:
        """Load the models onto ``self.torch_device``; raise MetricUnavailableError if
        impossible."""
        raise NotImplementedError

    def availability(self) -> str | None:
        return self._missing_reason()

    @classmethod
    def weights_status(cls, options: Mapping[str, Any] | None = None) -> tuple[bool, str]:
        """See :meth:`adapterswap.metrics.Metric.weights_status`: the metric is built with
        ``options`` (cheap, nothing loads) and asked by :meth:`_local_weights`."""
        return cls(**dict(options or {}))._local_weights()

    def _local_weights(self) -> tuple[bool, str]:
        """Whether this instance's weights are on this machine, and where or what is missing."""
        raise NotImplementedError

    def load(self) -> ModelMetric:
        """Load the models once (later calls return at once)."""
        if self.loaded:
            return self
        reason = self.availability()
        if reason is not None:
            raise MetricUnavailableError(f"metric {self.name!r} is unavailable: {reason}")
        self.device = self._resolve_device()
        self._load_models()
        self.loaded = True
        return self

    def _resolve_device(self) -> str:
        import torch

        if self.device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError) as exc:
            raise InvalidArgumentError("device", self.device, str(exc)) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgumentError("device", self.device, "CUDA is not available here")
        return str(device)

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device or "cpu")

    # -- scoring helpers ----------------------------------------------------------------------

    def _prepare(self, batch: MetricBatch) -> None:
        """Check the batch against ``needs`` and load the models if not done yet."""
        self.check_batch(batch)
        self.load()

    def embed_unique(self, items: Sequence[Any], embed: Callable[[Sequence[Any]], torch.Tensor],
                     key: Callable[[Any], Hashable] = id) -> list[torch.Tensor]:
        """Embed ``items`` in mini-batches, each distinct item once.

        Sweeps pass the same reference image (or prompt) with many cells; ``key`` (object
        identity by default) decides which items are the same. Returns one embedding per item.
        """
        import torch

        slot: dict[Hashable, int] = {}
        unique: list[Any] = []
        for item in items:
            k = key(item)
            if k not in slot:
                slot[k] = len(unique)
                unique.append(item)
        embedded: list[torch.Tensor] = []
        with torch.inference_mode():
            for part in chunks(unique, self.batch_size):
                embedded.extend(embed(part).float().cpu())
        return [embedded[slot[key(item)]] for item in items]


def rgb(image: Image.Image) -> Image.Image:
    """The image in RGB mode (PIL ``convert`` only when needed)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *parts)
