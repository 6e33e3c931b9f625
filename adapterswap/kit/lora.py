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
from typing import Any, ClassVar

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


class FusedLoRA:
    """A mixin (before the pipeline backbone class among the bases) for a distilled backbone
    that is its base pipeline with a LoRA fused in at load: the options ``lora`` (a Hub repo
    id, a folder, the ``.safetensors`` file itself, or ``None`` when the source has it fused),
    ``lora_file`` and ``lora_scale``; the LoRA located before the base pipeline is read,
    fused (:func:`fuse_lora`) after it loads, and named in the cells' provenance
    (``extra_weights``). A subclass sets :attr:`lora_repo`, :attr:`lora_file`,
    :attr:`lora_title` (for messages), :attr:`lora_model` (what a wrong file is not) and,
    where its card fuses at another scale, :attr:`lora_scale`."""

    lora_repo: ClassVar[str]
    lora_file: ClassVar[str]
    lora_title: ClassVar[str] = "LoRA"
    lora_model: ClassVar[str] = "a LoRA of this base model"
    lora_scale: ClassVar[float] = 1.0
    name: str
    options: dict[str, Any]
    how_to_get: str

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        check_lora_option(name, value)
        return super().check_option(name, value)  # type: ignore[misc]

    @classmethod
    def extra_weights(cls, options: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
        """The LoRA file (none when ``lora`` is ``None``: the source has it fused), for
        provenance: nothing loads."""
        backbone = cls(device="cpu", **cls.check_options(options))  # type: ignore[attr-defined,call-arg]
        return weights_entry(backbone.options.get("lora", cls.lora_repo),
                             backbone.lora_filename())

    def lora_filename(self) -> str:
        """The LoRA file inside ``lora`` (the ``lora_file`` option, else :attr:`lora_file`)."""
        return str(self.options.get("lora_file") or type(self).lora_file)

    def lora_location(self) -> tuple[str, str, bool] | None:
        """``(directory or repo id, file name, local_files_only)`` of the LoRA, or ``None``
        without one; :class:`WeightsNotFoundError` names what is missing."""
        return lora_location(self.options.get("lora", type(self).lora_repo),
                             default_file=self.lora_filename(),
                             what=f"backbone {self.name!r} {self.lora_title}",
                             how_to_get=self.how_to_get)

    def load_pipeline(self, source: str, *, local_files_only: bool) -> Any:
        lora = self.lora_location()  # fail before reading the base pipeline
        pipe = super().load_pipeline(source, local_files_only=local_files_only)  # type: ignore[misc]
        if lora is not None and self.fuses_at_load():
            self.fuse_lora_into(pipe, lora)
        return pipe

    def fuses_at_load(self) -> bool:
        """Whether :meth:`load_pipeline` fuses the LoRA (a backbone that quantises its
        denoiser fuses it earlier, into the full-precision weights, and says ``False``)."""
        return True

    def fuse_lora_into(self, pipe: Any, lora: tuple[str, str, bool]) -> None:
        """Fuse the LoRA at ``lora`` (:meth:`lora_location`) into ``pipe`` at the
        ``lora_scale`` option (default :attr:`lora_scale`, the card's)."""
        fuse_lora(pipe, lora, adapter_name=self.name.replace("-", "_"),
                  what=f"backbone {self.name!r} {self.lora_title}", model=self.lora_model,
                  lora_scale=float(self.options.get("lora_scale", type(self).lora_scale)))


class LoRAStepFiles:
    """A mixin (first among the bases) for a LoRA backbone published as one file per step
    count (Hyper-SD's): the ``lora_steps`` option picks the file and the instance's default
    step count; a file named as one of them (by ``lora_file``, or given as ``lora``) runs at
    its own count (:func:`lora_file_steps`); ``lora_steps`` beside ``lora_file`` is refused
    when the options are checked, before anything loads. A subclass sets
    :attr:`lora_step_files` and :attr:`lora_file` (the file without either option)."""

    #: step count -> the published file distilled for it
    lora_step_files: ClassVar[Mapping[int, str]] = {}
    lora_file: ClassVar[str]
    options: dict[str, Any]
    default_steps: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_steps = lora_file_steps(self.options, self.lora_step_files,
                                             type(self).default_steps)

    @classmethod
    def check_options(cls, options: Any) -> dict[str, Any]:
        options = super().check_options(options)  # type: ignore[misc]
        if options.get("lora_steps") is not None and options.get("lora_file"):
            raise InvalidArgumentError(
                "lora_steps", options["lora_steps"],
                f"give lora_steps or lora_file={options['lora_file']!r}, not both")
        return options

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        if name == "lora_steps" and (isinstance(value, bool)
                                     or value not in cls.lora_step_files):
            raise InvalidArgumentError(
                name, value, f"choose one of {', '.join(map(str, cls.lora_step_files))}")
        return super().check_option(name, value)  # type: ignore[misc]

    def lora_filename(self) -> str:
        """The LoRA file inside ``lora``: the one ``lora_steps`` picks, the ``lora_file``
        option, else :attr:`lora_file`."""
        steps = self.options.get("lora_steps")
        if steps is not None:
            return self.lora_step_files[steps]
        return str(self.options.get("lora_file") or type(self).lora_file)
