"""Checks of a sweep's and a command's values, made before any model loads, and the parsers
of command-line lists. Each error names the argument and the value; none loads a model or
writes anything. Shared by :class:`~adapterswap.sweep.spec.SweepSpec` and ``generate``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterswap.errors import InvalidArgumentError, UsageError

#: Seeds are integers in ``[0, MAX_SEED]``. ``torch.Generator.manual_seed`` takes
#: ``0 .. 2**64 - 1`` (a negative seed silently aliases a large one: -1 is 2**64 - 1, larger
#: ones overflow), and the store keeps seeds as SQLite INTEGERs (signed 64-bit), so
#: ``2**63 - 1`` is the largest seed that is both drawn and stored exactly.
MAX_SEED = 2**63 - 1


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
    multiple = backbone_cls.size_multiple  # the backbone's declaration
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


def check_reference(argument: str, ref: str, adapter_cls: Any = None) -> None:
    """A reference that can be read: ``synthetic:N``, an image file PIL decodes within its
    decompression-bomb limit (:func:`adapterswap.adapter.load_image`), or an embedding file
    (``.npy``) of the length ``adapter_cls`` takes (:mod:`adapterswap.references`)."""
    from adapterswap.references import is_embedding, load_embedding

    if ref.startswith("synthetic:"):
        number = ref.split(":", 1)[1]
        if not (number.isdigit() and int(number) <= MAX_SEED):
            raise InvalidArgumentError(argument, ref, "a synthetic reference is synthetic:N "
                                                      "with N an integer >= 0")
        return
    if is_embedding(ref):
        dim = getattr(adapter_cls, "embedding_dim", None)
        if dim is None:
            name = f"adapter {adapter_cls.name!r}" if adapter_cls is not None else "the adapter"
            raise InvalidArgumentError(argument, ref, f"is an embedding file, but {name} "
                                                      "takes reference images only")
        load_embedding(ref, argument=argument, dim=dim)
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


def check_enhancers(values: Any, adapters: Sequence[Any]) -> list[str]:
    """The sweep's enhancers as canonical ``NAME[:k=v,...]`` strings (``"none"`` kept; the
    default is ``["none"]``): each parsed, its options checked by its class, no repeats, and
    each acting on every adapter class in ``adapters`` (``None``: a backbone without an
    adapter, which only ``none`` suits)."""
    from adapterswap.enhancer import NO_ENHANCER, parse_enhancer
    from adapterswap.plugins import get_enhancer

    if values is None:
        return [NO_ENHANCER]
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise InvalidArgumentError("enhancers", values, "give a list of NAME[:k=v,...]")
    out = []
    for value in values:
        name, options = parse_enhancer(value, argument="--enhancer")
        if name == NO_ENHANCER:
            if options:
                raise InvalidArgumentError("--enhancer", value, "'none' takes no options")
            canonical = NO_ENHANCER
        else:
            enhancer = get_enhancer(name)(**options)
            for adapter_cls in adapters:
                enhancer.check_adapter(adapter_cls)
            canonical = enhancer.spec()
        if canonical in out:
            raise InvalidArgumentError("--enhancer", value, "given twice")
        out.append(canonical)
    return out


def make_enhancer(spec: str) -> Any:
    """The :class:`~adapterswap.enhancer.Enhancer` of a cell's ``enhancer`` value; ``None``
    for ``"none"`` and for neutral settings (the plain run)."""
    from adapterswap.enhancer import NO_ENHANCER, parse_enhancer
    from adapterswap.plugins import get_enhancer

    if not spec or spec == NO_ENHANCER:
        return None
    name, options = parse_enhancer(spec)
    enhancer = get_enhancer(name)(**options)
    return None if enhancer.is_neutral() else enhancer


def check_probes(spec: Any, classes: Sequence[Any]) -> None:
    """``probes`` needs a backbone or adapter that declares ``supports_probes``: refused
    when no backbone of the sweep has one, noted for those that have none."""
    from adapterswap.plugins import get_adapter

    silent = []
    for cls in classes:
        adapter = spec.adapter_for(cls)
        parts = [cls] + ([get_adapter(adapter)] if adapter else [])
        if not any(part.supports_probes for part in parts):
            silent.append(cls.name + (f" with adapter {adapter!r}" if adapter else ""))
    if len(silent) == len(classes):
        raise InvalidArgumentError(
            "probes", True, f"no part of this sweep records probes ({'; '.join(silent)}: "
            "none declares supports_probes); drop --probes")
    for what in silent:
        spec.defaults_used.append(f"--probes: backbone {what} records no probes (neither "
                                  "declares supports_probes)")


def check_image_format(argument: str, value: Any) -> str:
    """One of :data:`~adapterswap.sweep.images_io.IMAGE_FORMATS` (``png``, ``webp``,
    ``jpeg``), as written; anything else is refused by name."""
    from adapterswap.sweep.images_io import IMAGE_FORMATS

    if not isinstance(value, str) or value not in IMAGE_FORMATS:
        raise InvalidArgumentError(argument, value,
                                   f"choose one of {', '.join(IMAGE_FORMATS)}")
    return value
