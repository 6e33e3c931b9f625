"""Where the tiny preset keeps the models it saves before loading them back.

The tiny preset builds random-initialised components, saves them in the real on-disk layout and
loads them through the real loaders, so the demo and the tests exercise the loading code users
run. The files go to a per-process temporary directory (removed at exit) unless
``ADAPTERSWAP_TINY_DIR`` or an explicit ``cache_dir`` names one: tiny weights are cheap to
rebuild, and a stale copy from an older version could hide a loader bug.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_process_dir: Path | None = None


def _cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def tiny_dir(name: str, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory for tiny preset ``name`` with ``seed`` (not created; check ``exists()``)."""
    global _process_dir
    if cache_dir is not None:
        base = Path(cache_dir)
    elif os.environ.get("ADAPTERSWAP_TINY_DIR"):
        base = Path(os.environ["ADAPTERSWAP_TINY_DIR"]).expanduser()
    else:
        if _process_dir is None:
            _process_dir = Path(tempfile.mkdtemp(prefix="adapterswap-tiny-"))
            atexit.register(_cleanup, _process_dir)
        base = _process_dir
    return base / f"{name}-seed{seed}"


def build_in_dtype(device: Any, dtype: Any, make: Callable[[], Any]) -> Any:
    """Call ``make`` with torch's default dtype and device set, so modules are created
    directly in ``dtype`` on ``device`` (the ``random`` preset builds billions of parameters:
    no float32 copy on the CPU first). Every module returned (alone, or in a dict, list or
    tuple) is put in eval mode: a freshly constructed model is in training mode, where T5's
    dropout would make each prompt encoding random."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            built = make()
    finally:
        torch.set_default_dtype(previous)
    parts = built.values() if isinstance(built, dict) else \
        built if isinstance(built, (list, tuple)) else [built]
    for part in parts:
        if isinstance(part, torch.nn.Module):
            part.eval()
    return built
