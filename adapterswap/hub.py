"""Where weights come from: a local directory, the local Hugging Face cache, or the Hub.

Nothing here downloads. :func:`resolve_source` decides how a backbone or adapter should load its
``source`` and fails early, naming the path and the missing files, when a local directory is
incomplete or when ``HF_HUB_OFFLINE`` is set and the cache lacks the files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adapterswap.errors import WeightsNotFoundError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "true", "yes", "on"}


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_repo_id(source: str) -> bool:
    """``owner/name`` with Hub-legal characters, and no such local path."""
    return bool(REPO_ID.match(source)) and not Path(source).expanduser().exists()


@dataclass
class ResolvedSource:
    """How to load a source.

    :ivar source: what to pass to ``from_pretrained`` (a local directory or a repo id).
    :ivar local: True for a local directory.
    :ivar local_files_only: pass to ``from_pretrained``: True when offline or local.
    :ivar cached_path: the snapshot directory in the HF cache, when found there.
    """

    source: str
    local: bool
    local_files_only: bool
    cached_path: Path | None = None


@dataclass
class WeightsStatus:
    """Whether a source's files are present, checked without network (``adapterswap doctor``)."""

    source: str
    where: str  # "local", "hf-cache", "missing"
    present: bool
    missing: list[str] = field(default_factory=list)
    path: Path | None = None

    def describe(self) -> str:
        if self.present:
            return f"present ({self.where}: {self.path})"
        if self.missing and self.path is not None:
            return f"incomplete ({self.path}): missing {', '.join(self.missing)}"
        return "missing"


def missing_files(root: Path, required: Sequence[str]) -> list[str]:
    """Entries of ``required`` (relative paths; ``a|b`` means either) absent under ``root``."""
    missing = []
    for entry in required:
        options = entry.split("|")
        if not any((root / option).exists() for option in options):
            missing.append(" or ".join(options))
    return missing


def pickle_hint(root: Path, required: Sequence[str]) -> str:
    """For missing ``.safetensors`` entries of ``required`` that exist as a pickle (``.bin``)
    under ``root``: a sentence saying that pickles are not loaded; else ``""``."""
    found = []
    for entry in required:
        for option in entry.split("|"):
            if option.endswith(".safetensors") and not (root / option).exists():
                stem = option[: -len(".safetensors")]
                found += [f"{stem}{suffix}" for suffix in (".bin", ".pt", ".pth", ".ckpt")
                          if (root / f"{stem}{suffix}").is_file()]
    if not found:
        return ""
    return (f" Found {', '.join(sorted(set(found)))} instead: pickled weights are not loaded (a "
            "pickle can run code); convert it to safetensors or download the .safetensors "
            "files.")


def cached_snapshot(repo_id: str, required: Sequence[str] = ()) -> Path | None:
    """The newest HF-cache snapshot of ``repo_id`` holding ``required``, else None (no network)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return None
    repo_dir = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    candidates = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        if candidate.is_dir() and not missing_files(candidate, required):
            return candidate
    return None


def weights_status(source: str, required: Sequence[str] = ()) -> WeightsStatus:
    """Check a local path or the HF cache for ``source`` without any network access."""
    path = Path(source).expanduser()
    if path.exists() or not looks_like_repo_id(source):
        if not path.exists():
            return WeightsStatus(source, "missing", False, [str(path)])
        missing = missing_files(path, required) if path.is_dir() else []
        return WeightsStatus(source, "local", not missing, missing, path)
    snapshot = cached_snapshot(source, required)
    if snapshot is not None:
        return WeightsStatus(source, "hf-cache", True, [], snapshot)
    partial = cached_snapshot(source, ())
    if partial is not None:
        return WeightsStatus(source, "hf-cache", False, missing_files(partial, required), partial)
    return WeightsStatus(source, "missing", False, list(required))


def resolve_source(source: str, *, what: str, required: Sequence[str] = (),
                   how_to_get: str = "") -> ResolvedSource:
    """Decide how to load ``source`` and fail early with a clear message if it cannot be.

    :param source: a local directory/file, or a Hub repo id (``owner/name``).
    :param what: a name for messages (``"backbone 'flux-dev'"``).
    :param required: relative paths that must exist (``a|b`` for alternatives).
    :param how_to_get: a hint appended to the error (download command, licence page).
    :raises WeightsNotFoundError: a local path that does not exist or lacks files; or offline
        mode with the repo absent from the cache.
    """
    hint = f" {how_to_get}" if how_to_get else ""
    path = Path(source).expanduser()
    if path.exists():
        missing = missing_files(path, required) if path.is_dir() else []
        if missing:
            raise WeightsNotFoundError(
                f"{what}: the directory {str(path)!r} is incomplete: missing "
                f"{', '.join(missing)}.{pickle_hint(path, required)}{hint}"
            )
        return ResolvedSource(str(path), local=True, local_files_only=True)
    if not looks_like_repo_id(source):
        raise WeightsNotFoundError(
            f"{what}: {source!r} is neither an existing path nor a Hugging Face repo id "
            f"(owner/name).{hint}"
        )
    snapshot = cached_snapshot(source, required)
    if is_offline() and snapshot is None:
        raise WeightsNotFoundError(
            f"{what}: {source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            f"set, so it cannot be downloaded.{hint}"
        )
    return ResolvedSource(source, local=False, local_files_only=is_offline(), cached_path=snapshot)
