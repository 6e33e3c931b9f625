"""LoRAs fused into a backbone's pipeline: where the file comes from, and fusing it safely.

Distilled backbones that ship as a LoRA on a base model (LCM-LoRA, Hyper-SD, TCD, FLUX.1-Turbo,
Hyper-FLUX) share two steps, both here:

- :func:`lora_location`: the backbone option naming the LoRA (a Hub repo id, a local directory,
  the ``.safetensors`` file itself, or ``None`` when the source already has it fused) resolved
  to ``(directory or repo id, file name, local_files_only)`` without downloading, failing with
  one :class:`~adapterswap.errors.WeightsNotFoundError` that names what is missing;
- :func:`fuse_lora`: diffusers' ``load_lora_weights`` (local files are checked as safetensors
  first), ``fuse_lora(lora_scale=...)`` and ``unload_lora_weights``, so that the denoiser is a
  plain module with merged weights: nothing LoRA-specific stays in the forward, and compiled or
  float8 paths see the same module as for a full checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapterswap.errors import InvalidArgumentError, WeightsNotFoundError


def lora_location(value: Any, *, default_file: str, filename: str | None = None,
                  what: str, how_to_get: str = "") -> tuple[str, str, bool] | None:
    """``(directory or repo id, file name, local_files_only)`` of a LoRA given as ``value`` (a
    Hub repo id, a local directory, the ``.safetensors`` file itself), or ``None`` for
    ``None``/``""``/``"none"`` (no LoRA: the source already is the distilled model).
    ``filename`` (the backbone's ``lora_file`` option) overrides ``default_file``."""
    from adapterswap.hub import resolve_source

    if value is None or str(value).lower() in ("", "none"):
        return None
    filename = str(filename or default_file)
    path = Path(str(value)).expanduser()
    if path.is_file():
        return str(path.parent), path.name, True
    resolved = resolve_source(str(value), what=what, required=(filename,),
                              how_to_get=how_to_get)
    return resolved.source, filename, resolved.local_files_only


def weights_entry(value: Any, filename: str, *, label: str = "lora",
                  ) -> dict[str, tuple[str, tuple[str, ...]]]:
    """A backbone's :meth:`~adapterswap.backbone.Backbone.extra_weights` entry for a file
    given as ``value`` (as :func:`lora_location` reads it): the file itself where it is
    local, else the repo id with the file it needs; nothing for ``None``."""
    if value is None or str(value).lower() in ("", "none"):
        return {}
    path = Path(str(value)).expanduser()
    if path.is_dir() and (path / filename).is_file():
        path = path / filename
    if path.is_file():
        return {label: (str(path), ())}
    return {label: (str(value), (filename,))}


def fuse_lora(pipe: Any, location: tuple[str, str, bool], *, adapter_name: str, what: str,
              model: str, lora_scale: float = 1.0) -> None:
    """Load the LoRA at ``location`` (:func:`lora_location`) into ``pipe``, fuse it at
    ``lora_scale`` and drop the LoRA layers; a file diffusers cannot load into this pipeline
    raises one :class:`WeightsNotFoundError` naming it (``model``: what it should be, e.g.
    ``"an SD 1.5 LoRA"``)."""
    from adapterswap.weights import check_safetensors

    where, filename, offline = location
    if Path(where, filename).is_file():
        check_safetensors(Path(where, filename), what=what)
    try:
        pipe.load_lora_weights(where, weight_name=filename, adapter_name=adapter_name,
                               local_files_only=offline)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise WeightsNotFoundError(
            f"{what}: {filename!r} in {where!r} is not {model} diffusers can load: "
            f"{str(exc).splitlines()[0]}") from None
    loaded = getattr(pipe, "get_list_adapters", dict)()
    if not any(adapter_name in names for names in loaded.values()):
        # diffusers only warns when no key names a module of this pipeline
        pipe.unload_lora_weights()
        raise WeightsNotFoundError(
            f"{what}: {filename!r} in {where!r} is not {model}: none of its keys names a "
            "layer of this pipeline")
    pipe.fuse_lora(adapter_names=[adapter_name], lora_scale=float(lora_scale))
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers


def check_lora_option(name: str, value: Any) -> None:
    """The ``lora`` option is a path, a repo id or ``None``; ``lora_file`` a file name;
    ``lora_scale`` a finite number."""
    import math

    if name == "lora" and value is not None and not isinstance(value, (str, Path)):
        raise InvalidArgumentError(name, value, "must be a path, a repo id or None")
    if name == "lora_file" and value is not None and not isinstance(value, str):
        raise InvalidArgumentError(name, value, "must be a file name")
    if name == "lora_scale" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or not math.isfinite(value)):
        raise InvalidArgumentError(name, value, "must be a finite number")


def lora_file_steps(options: Mapping[str, Any], files: Mapping[int, str], default: int) -> int:
    """The step count a step-distilled LoRA backbone (Hyper-SD's) runs at by default, from
    its checked ``options``: ``lora_steps``; else the count of the file it loads where
    ``files`` (step count -> published file name) names it, by ``lora_file`` or by the name
    of the file ``lora`` gives; else ``default`` (each file runs at its own step count)."""
    steps = options.get("lora_steps")
    if steps is not None:
        return int(steps)
    lora = options.get("lora")
    named = options.get("lora_file")
    if lora is not None and Path(str(lora)).expanduser().is_file():
        named = Path(str(lora)).name  # the file itself: lora_file is not read
    by_file = {filename: count for count, filename in files.items()}
    return by_file.get(str(named), default) if named else default
