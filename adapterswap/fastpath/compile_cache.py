"""Compiled code kept across processes: no cold start on a machine that compiled before.

``torch.compile`` spends tens of seconds to minutes the first time a backbone's denoiser runs
at a shape (tracing, inductor's code generation, autotuning); a new process starts over unless
that work is on disk. After a compiled run, :func:`save` stores what torch compiled
(``torch.compiler.save_cache_artifacts``: inductor's FX graph and autotuning caches, AOT
autograd's) under ``~/.cache/adapterswap/compile/`` (``$XDG_CACHE_HOME/adapterswap/...``);
before compiling, :func:`load` hands them back to torch
(``torch.compiler.load_cache_artifacts``), so the first call at a known shape reuses the
compiled kernels instead of generating them again (tracing still runs; see the README for the
measured overhead).

A file is keyed by what the compiled code depends on (:func:`cache_key`): the card (name and
compute capability), torch's version, the dtype, the backbone, the compile mode and scope, and
the image size. A file whose recorded key differs (another card or torch, copied from another
machine, written by an older version) or that torch cannot read is ignored with a note, never
trusted; a file is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: The format of a cache file's metadata.
FORMAT = 1
#: What a warm start costs against a cold compile, as a share: the auto-compile policy
#: counts compiling as repaying itself after this share of the forwards a cold compile needs
#: (the break-even of the backbone's compile profile). Measured on one H200 (torch 2.11,
#: flux-schnell + InfuseNet at 1024 x 1024, 4 cells, each process with an empty inductor
#: cache): 38.8 s of compile overhead cold, 4.9 s with this cache loaded (0.13).
WARM_COMPILE_SHARE = 0.13


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/adapterswap/compile`` (``~/.cache/...`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adapterswap" / "compile"


def device_identity(device: Any) -> str:
    """The card a compiled kernel is for: ``"NVIDIA H200 (sm_90)"``, or ``"cpu"``."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    return str(torch.device(device).type)


def cache_key(*, backbone: str, device: Any, dtype: Any, mode: str | None, scope: str | None,
              sizes: Any) -> dict[str, Any]:
    """Everything the compiled code of a backbone's run depends on (module docstring)."""
    import torch

    return {"format": FORMAT, "backbone": backbone, "device": device_identity(device),
            "torch": torch.__version__, "dtype": str(dtype), "mode": mode or "default",
            "scope": scope or "", "sizes": sorted([int(h), int(w)] for h, w in sizes)}


def _path(key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{key['backbone']}-{digest}.bin"


def is_warm(key: Mapping[str, Any]) -> bool:
    """Whether a cache file for exactly ``key`` is on disk."""
    path = _path(key)
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()).get("key") == dict(key)
    except (OSError, ValueError):
        return False


def load(key: Mapping[str, Any], log: Callable[[str], None] = print) -> bool:
    """Hand the compiled artifacts saved for ``key`` to torch; ``True`` when they were
    loaded. A missing file returns ``False`` silently; a stale or unreadable one with a note."""
    import torch

    path = _path(key)
    if not path.is_file():
        return False
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("key") != dict(key):
        log(f"compile cache {str(path)!r} ignored: it was written for "
            f"{meta.get('key', {}).get('device', 'another setup')} / torch "
            f"{meta.get('key', {}).get('torch', '?')}, not this one")
        return False
    loader = getattr(getattr(torch, "compiler", None), "load_cache_artifacts", None)
    if loader is None:
        log(f"compile cache ignored: torch {torch.__version__} cannot load cache artifacts")
        return False
    try:
        loader(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - a foreign or truncated file is only a cold start
        log(f"compile cache {str(path)!r} ignored: torch could not read it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return False
    return True


def save(key: Mapping[str, Any], log: Callable[[str], None] = print) -> Path | None:
    """Store what torch compiled in this process for ``key`` (atomically); the path, or
    ``None`` when torch has nothing to save."""
    import torch

    saver = getattr(getattr(torch, "compiler", None), "save_cache_artifacts", None)
    if saver is None:
        return None
    artifacts = saver()
    if not artifacts:
        return None
    data = artifacts[0]
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    meta = {"key": dict(key), "bytes": len(data), "saved_at": time.time()}
    tmp_meta = path.with_name(f".{path.stem}.{os.getpid()}.json.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)
    os.replace(tmp_meta, path.with_suffix(".json"))
    log(f"compile cache saved: {str(path)!r} ({len(data) / 2**20:.1f} MiB); a new process "
        "reuses it")
    return path
