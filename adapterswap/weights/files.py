"""Weight files read safely: safetensors checked from their header, pickles only with
``torch.load(weights_only=True)``; one clear error naming the file (see
:mod:`adapterswap.weights`)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterswap.errors import UnsafeWeightsError, WeightsNotFoundError

#: File suffixes of pickled weights (torch.save / the legacy ``pytorch_model.bin``).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Largest safetensors header read (the format itself caps it at 100 MB).
_MAX_HEADER = 100_000_000
CONVERT_HINT = ("convert it to safetensors where you trust it (e.g. torch.load it in a sandbox and "
            "safetensors.torch.save_file the tensors), or download the .safetensors files")


def first_line(exc: BaseException) -> str:
    """The gist of a library exception: its first non-empty line, without diffusers' advice."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    line = line.split(" If you want to instead overwrite", 1)[0]
    return line or type(exc).__name__


def unpickling_reason(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in one line (torch's message spans many
    lines of advice, some of which is to load the file unsafely)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match is None:
        return first_line(exc)
    return match.group(1).split(" Please use ", 1)[0].strip().rstrip(".")


def some(items: Sequence[str], limit: int = 4) -> str:
    """The first ``limit`` items, and how many more there are (for messages)."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --------------------------------------------------------------------------------- single files
def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable safetensors file (truncated, corrupt header), else None.

    Reads only the header: the file's size must be what the header says its tensors need.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a safetensors header"
            length = int.from_bytes(head, "little")
            if length > min(size - 8, _MAX_HEADER):
                return (f"its header claims {length} bytes but the file has {size}: the file is "
                        "cut short or is not safetensors")
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    except (UnicodeDecodeError, ValueError):
        return "its header is not valid safetensors JSON"
    if not isinstance(header, dict):
        return "its header is not valid safetensors JSON"
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            return f"its header entry {key!r} has no valid data_offsets"
        ends.append(offsets[1])
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        return f"it has {size} bytes but its header describes {needed}: it was cut short"
    from safetensors import safe_open

    try:  # the rest of the format (dtypes, overlapping or uncovered ranges) as safetensors sees it
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except Exception as exc:  # SafetensorError does not derive from anything narrower
        return first_line(exc)
    return None


def check_safetensors(path: str | Path, *, what: str) -> None:
    """Raise :class:`WeightsNotFoundError` naming ``path`` if it is truncated or corrupt."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise WeightsNotFoundError(
            f"{what}: {str(path)!r} is a truncated or corrupt safetensors file ({problem}); "
            "download it again")


def read_safetensors(path: str | Path, *, what: str) -> dict[str, Any]:
    """All tensors of a safetensors file (on CPU), after :func:`check_safetensors`."""
    from safetensors.torch import load_file

    check_safetensors(path, what=what)
    try:
        return dict(load_file(str(path)))
    except Exception as exc:
        raise WeightsNotFoundError(
            f"{what}: {str(path)!r} is a truncated or corrupt safetensors file "
            f"({first_line(exc)}); download it again") from None


def read_pickle(path: str | Path, *, what: str, allowed_globals: Sequence[Any] = (),
                mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and containers only, no code runs.

    :param allowed_globals: extra types the checkpoint may hold (``torch.serialization``'s
        ``safe_globals``), e.g. ``argparse.Namespace`` in a training checkpoint.
    :raises UnsafeWeightsError: the pickle needs something else, e.g. code to run.
    :raises WeightsNotFoundError: the file is missing, truncated or not a torch checkpoint.
    """
    import pickle

    import torch

    path = Path(path)
    context = (torch.serialization.safe_globals(list(allowed_globals)) if allowed_globals
               else contextlib.nullcontext())
    try:
        with context:
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True,
                                  **({"mmap": True} if mmap else {}))
            except RuntimeError:
                if not mmap:
                    raise
                # a legacy (non-zip) file cannot be memory-mapped
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsError(
            f"{what}: {str(path)!r} is a pickle that holds more than tensors (e.g. code to run "
            f"when loaded), so it was not loaded (torch.load weights_only=True refused it: "
            f"{unpickling_reason(exc)}); {CONVERT_HINT}") from None
    except FileNotFoundError:
        raise WeightsNotFoundError(f"{what}: {str(path)!r} does not exist") from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise WeightsNotFoundError(
            f"{what}: {str(path)!r} is truncated or not a torch checkpoint "
            f"({first_line(exc)}); download it again") from None


# ---------------------------------------------------------------------------- model directories
