"""What produced a cell: code, weights, reference content, device, dtype, options.

A sweep's figures end up in papers and model choices, so a cell's key covers everything that
changes its pixels or its scores, and every invocation records a ``runs`` row
(:meth:`adapterswap.sweep.store.RunStore.begin_run`) with the same facts in readable form:

- ``code_hash``: sha256 over the source files of adapterswap and of the plugins a sweep uses
  (a changed line means new cells, even when the version number did not move);
- weights identity per model: the Hub snapshot commit for a repo id (from the local cache;
  online, the Hub's current commit), or a content hash of a local folder's weight and config
  files (cached by path, size and mtime in ``~/.cache/adapterswap/weights-hashes.json``);
  tiny and random presets are identified by their seed (their code is in ``code_hash``);
- the sha256 of every reference image's bytes (not its path);
- the device kind (``cpu``, ``cuda:NVIDIA H200``) and the resolved dtype;
- backbone, adapter and metric options, and the metric list.

Nothing here imports torch at module level or loads a model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

#: Files whose bytes make a model: weights and the configs that shape them (scheduler, model
#: and tokenizer configs change pixels as surely as weights do).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".json",
                   ".txt", ".model", ".yaml")
_CHUNK = 1 << 20


# ---------------------------------------------------------------------- code
def _package_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


@cache
def _tree_hash(root: str) -> str:
    digest = hashlib.sha256()
    base = Path(root)
    for path in _package_files(base):
        digest.update(str(path.relative_to(base)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def code_hash(modules: Iterable[str] = ()) -> str:
    """sha256 over the source of adapterswap and of the named modules' packages (plugins).

    :param modules: importable module names (a plugin's registering module); each one's top
        package directory is hashed whole.
    """
    import importlib

    import adapterswap

    roots = {str(Path(adapterswap.__file__).resolve().parent)}
    for name in modules:
        top = name.split(":")[0].split(".")[0]
        try:
            module = importlib.import_module(top)
        except ImportError:
            continue
        file = getattr(module, "__file__", None)
        if file:
            path = Path(file).resolve()
            roots.add(str(path.parent if path.name == "__init__.py" else path))
    digest = hashlib.sha256()
    for root in sorted(roots):
        digest.update(Path(root).name.encode())
        digest.update(_tree_hash(root).encode() if Path(root).is_dir()
                      else hashlib.sha256(Path(root).read_bytes()).hexdigest().encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------- weights
def _hash_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adapterswap" / "weights-hashes.json"


def _load_hash_cache() -> dict[str, Any]:
    try:
        return json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_hash_cache(cache: Mapping[str, Any]) -> None:
    path = _hash_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: hash again next time


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_weights_hash(path: str | Path) -> str:
    """Content hash of a local weights file or folder (its weight and config files), cached
    by (path, size, mtime) so a 30 GB folder is read once."""
    root = Path(path).expanduser().resolve()
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file()
                       and p.suffix.lower() in WEIGHT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    cache = _load_hash_cache()
    digest = hashlib.sha256()
    changed = False
    for file in files:
        stat = file.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        entry = cache.get(str(file))
        if not entry or entry.get("stamp") != stamp:
            entry = {"stamp": stamp, "sha256": file_sha256(file)}
            cache[str(file)] = entry
            changed = True
        name = file.name if root.is_file() else str(file.relative_to(root))
        digest.update(f"{name}\0{entry['sha256']}\0".encode())
    if changed:
        _save_hash_cache(cache)
    return digest.hexdigest()[:16]


def weights_identity(source: str, *, required: Iterable[str] = ()) -> str:
    """What a source resolves to, without loading it: ``local:<content hash>``,
    ``hub:<repo>@<commit>`` (from the HF cache, or asked of the Hub when online), or
    ``hub:<repo>@unresolved`` (not cached and the Hub not reachable: the key changes once the
    weights are downloaded, so those cells run again; never mixed with another revision)."""
    from adapterswap.hub import cached_snapshot, is_offline, looks_like_repo_id

    path = Path(source).expanduser()
    if path.exists():
        return f"local:{local_weights_hash(path)}"
    if not looks_like_repo_id(source):
        return f"unknown:{source}"
    snapshot = cached_snapshot(source, tuple(required))
    if snapshot is None:
        snapshot = cached_snapshot(source, ())
    if snapshot is not None:
        return f"hub:{source}@{snapshot.name}"
    if not is_offline():
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(source, timeout=10)
            if info.sha:
                return f"hub:{source}@{info.sha}"
        except Exception:  # noqa: BLE001 - offline, gated, rate-limited: unresolved
            pass
    return f"hub:{source}@unresolved"


def reference_identity(reference: str) -> str:
    """``sha256:<hex>`` of a reference file's bytes; synthetic references by their name."""
    if not reference or reference.startswith("synthetic:"):
        return reference
    return "sha256:" + file_sha256(Path(reference).expanduser())


# ---------------------------------------------------------------------- device
def device_kind(device: str | None) -> str:
    """``cpu``, ``mps`` or ``cuda:<card name>``: the hardware class whose kernels produced a
    cell (rounding differs between them)."""
    import torch

    from adapterswap.backbone import default_device

    device = str(device or default_device())
    kind = device.split(":")[0]
    if kind == "cuda" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(index)}"
    return kind


def resolved_dtype(preset: str | None, dtype: Any, device: str | None) -> str:
    """The dtype a sweep's models run in, by name (``float32``, ``bfloat16``)."""
    from adapterswap.backbone import default_device, default_dtype, parse_dtype

    if preset == "tiny":
        return "float32"  # tiny components are built in fp32 and only moved
    value = parse_dtype(dtype) or default_dtype(str(device or default_device()))
    return str(value).replace("torch.", "")


# ---------------------------------------------------------------------- a sweep's provenance
@dataclass
class Provenance:
    """The facts behind one sweep's cells; :meth:`cell_identity` is what enters a key."""

    code_hash: str
    device: str
    dtype: str
    weights: dict[str, str] = field(default_factory=dict)  # "backbone:x"/"adapter:y" -> id
    sources: dict[str, str] = field(default_factory=dict)  # same keys -> source string
    references: dict[str, str] = field(default_factory=dict)  # reference -> content id
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> options (sorted names)
    backbone_options: dict[str, Any] = field(default_factory=dict)

    def cell_identity(self, cell: Any) -> dict[str, Any]:
        """Everything besides the cell's own fields that changes its pixels or scores."""
        identity = {
            "code": self.code_hash,
            "device": self.device,
            "dtype": self.dtype,
            "weights": self.weights.get(f"backbone:{cell.backbone}", ""),
            "metrics": self.metrics,
            "backbone_options": self.backbone_options.get(cell.backbone, {}),
        }
        if cell.adapter != "none":
            identity["adapter_weights"] = self.weights.get(f"adapter:{cell.adapter}", "")
        if cell.reference:
            identity["reference"] = self.references.get(cell.reference, cell.reference)
        return identity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_provenance(spec: Any, plugin_modules: Iterable[str] = ()) -> Provenance:
    """Resolve a validated spec's provenance (hashes files; loads no model)."""
    from adapterswap.config import configured_source
    from adapterswap.plugins import get_adapter, get_backbone

    device = device_kind(spec.device)
    provenance = Provenance(code_hash=code_hash(plugin_modules), device=device,
                            dtype=resolved_dtype(spec.preset, spec.dtype, spec.device))
    adapters = set()
    for name in spec.backbones:
        cls = get_backbone(name)
        provenance.backbone_options[name] = spec.options_for(name)
        if spec.preset:
            provenance.sources[f"backbone:{name}"] = spec.preset
            provenance.weights[f"backbone:{name}"] = f"{spec.preset}:seed0"
        else:
            source = spec.sources.get(name) or configured_source(name) or cls.default_source
            provenance.sources[f"backbone:{name}"] = source
            identity = weights_identity(source, required=cls.required_files)
            for label, (where, files) in sorted(cls.extra_weights(spec.options_for(name))
                                                .items()):
                identity += f" + {label}:{weights_identity(str(where), required=files)}"
            provenance.weights[f"backbone:{name}"] = identity
        adapter = spec.adapter_for(cls)
        if adapter is not None:
            adapters.add(adapter)
    for name in sorted(adapters):
        cls = get_adapter(name)
        if spec.preset:
            provenance.sources[f"adapter:{name}"] = spec.preset
            provenance.weights[f"adapter:{name}"] = f"{spec.preset}:seed0"
        else:
            source = spec.adapter_source or configured_source(name) or cls.default_source
            provenance.sources[f"adapter:{name}"] = source
            provenance.weights[f"adapter:{name}"] = weights_identity(
                source, required=getattr(cls, "required_files", ()))
    for ref in spec.references:
        provenance.references[ref] = reference_identity(ref)
    provenance.metrics = {name: spec.metric_options.get(name, {})
                          for name in sorted(spec.metrics)}
    return provenance


def metric_record(metric_cls: Any, *, available: bool = True, reason: str | None = None,
                  options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the store keeps of a metric so readers never guess: its direction, the adapter
    kinds it measures fidelity for, its role (``kind``), its worst value when bounded, and
    whether it could run."""
    kinds = sorted(getattr(metric_cls, "kinds", ()) or ())
    needs = set(getattr(metric_cls, "needs", ()) or ())
    if "timing" in needs:
        kind = "latency"
    elif kinds == ["none"]:
        kind = "text"  # fidelity to the prompt: what a run without an adapter is judged on
    elif kinds:
        kind = kinds[0]
    else:
        kind = "diagnostic"
    return {"higher_is_better": bool(metric_cls.higher_is_better), "kinds": kinds,
            "kind": kind, "worst": getattr(metric_cls, "worst", None),
            "available": bool(available), "reason": reason,
            "evaluator": metric_cls.evaluator(options or {}),
            "options": dict(options or {}),
            "plugin_version": _dist_version_of(metric_cls)}


def _dist_version_of(cls: Any) -> str | None:
    """``"adapterswap-flux 0.1.0"``: the distribution a class's package comes from. The
    distribution named like the package is tried first (one metadata read); the mapping of
    every installed package (``packages_distributions``, seconds in a large environment) is
    made only when that fails, and once per process."""
    from importlib import metadata

    top = cls.__module__.split(".")[0]
    for name in dict.fromkeys((top, top.replace("_", "-"))):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if top in (dist.read_text("top_level.txt") or top).split():
            return f"{dist.metadata['Name']} {dist.version}"
    try:
        dists = _package_distributions().get(top) or []
        return f"{dists[0]} {metadata.version(dists[0])}" if dists else None
    except Exception:  # noqa: BLE001 - informational only
        return None


@functools.cache
def _package_distributions() -> Mapping[str, list[str]]:
    from importlib import metadata

    return metadata.packages_distributions()


def adapter_kinds(spec: Any) -> dict[str, str | None]:
    """Adapter name -> kind for every adapter a validated spec runs (``none`` -> None)."""
    from adapterswap.plugins import get_adapter, get_backbone

    kinds: dict[str, str | None] = {"none": None}
    for name in spec.backbones:
        adapter = spec.adapter_for(get_backbone(name))
        if adapter is not None:
            kinds[adapter] = get_adapter(adapter).kind
    return kinds
