"""Model directories and pipelines loaded safely: safetensors only, every component checked
against its config, no code from the directory run (see :mod:`adapterswap.weights`)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapterswap.errors import AdapterswapError, UnsafeWeightsError, WeightsNotFoundError
from adapterswap.weights.files import (
    CONVERT_HINT,
    PICKLE_SUFFIXES,
    check_safetensors,
    first_line,
    some,
    unpickling_reason,
)


def _variant_of(name: str) -> str | None:
    """``fp16`` for ``model.fp16.safetensors`` / ``model.fp16-00001-of-00002.safetensors``."""
    parts = name.split(".")
    return parts[1].split("-")[0] if len(parts) == 3 else None


def _index_variant(name: str) -> str | None:
    """``fp16`` for ``model.safetensors.index.fp16.json``; None without a variant."""
    parts = name.split(".")
    return parts[3] if len(parts) == 5 else None


def folder_variant(folder: Path, variant: str | None) -> str | None:
    """``variant`` if ``folder`` has weight files of it, else None: as a diffusers pipeline
    loads each component's variant only where it exists."""
    if variant is None or not folder.is_dir():
        return variant
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") and _variant_of(n) == variant for n in names) or any(
            ".safetensors.index" in n and _index_variant(n) == variant for n in names):
        return variant
    return None


def weight_files(folder: Path, variant: str | None = None) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle files) of a model folder that a load with ``variant`` reads:
    the variant's files when the folder has them, else the plain ones."""
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if variant is not None and any(_variant_of(p.name) == variant for p in safetensors):
        return [p for p in safetensors if _variant_of(p.name) == variant], pickles
    return [p for p in safetensors if _variant_of(p.name) is None], pickles


def check_model_dir(folder: str | Path, *, what: str, variant: str | None = None) -> None:
    """Check a model folder (``config.json`` + weights) before loading it.

    :raises WeightsNotFoundError: no weights, a shard its index lists is absent, or a
        safetensors file is truncated or corrupt.
    :raises UnsafeWeightsError: the weights exist only as a pickle (convert to safetensors).
    """
    folder = Path(folder)
    safetensors, pickles = weight_files(folder, variant)
    indexes = [p for p in sorted(folder.glob("*.safetensors.index*.json"))
               if _index_variant(p.name) == folder_variant(folder, variant)]
    for index in indexes:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise WeightsNotFoundError(
                f"{what}: {str(index)!r} is not a valid safetensors shard index") from None
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise WeightsNotFoundError(
                f"{what}: {str(folder)!r} is incomplete: {index.name} lists the shards "
                f"{some(absent)}, which are missing")
    if not safetensors:
        if pickles:
            names = ", ".join(p.name for p in pickles)
            raise UnsafeWeightsError(
                f"{what}: {str(folder)!r} has its weights only as a pickle ({names}), which "
                "adapterswap does not load for models because a pickle can run code when it "
                f"is loaded; {CONVERT_HINT}")
        raise WeightsNotFoundError(
            f"{what}: {str(folder)!r} has a config but no weights (no .safetensors file)")
    for path in safetensors:
        check_safetensors(path, what=what)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers' and transformers' loading warnings and progress bars for one load:
    the checks here turn what they would log into one error."""
    restore = []
    for module in ("diffusers", "transformers"):
        try:
            logging = __import__(f"{module}.utils.logging", fromlist=["get_verbosity"])
        except ImportError:  # pragma: no cover - both come with adapterswap
            continue
        bars = logging.is_progress_bar_enabled()
        restore.append((logging, logging.get_verbosity(), bars))
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    try:
        yield
    finally:
        for logging, verbosity, bars in restore:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()


def library_exceptions() -> tuple[type[BaseException], ...]:
    """What diffusers/transformers/safetensors raise on a broken file."""
    import pickle

    kinds: list[type[BaseException]] = [OSError, ValueError, RuntimeError, KeyError, TypeError,
                                        EOFError, AttributeError, pickle.UnpicklingError]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    return tuple(kinds)


@contextlib.contextmanager
def loading(what: str, where: str | Path) -> Iterator[None]:
    """Turn an exception from a library loading ``where`` into one adapterswap error naming it
    (adapterswap's own errors pass through)."""
    import pickle

    try:
        yield
    except AdapterswapError:
        raise
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsError(
            f"{what}: a pickle under {str(where)!r} holds more than tensors, so it was not "
            f"loaded ({unpickling_reason(exc)}); {CONVERT_HINT}") from None
    except library_exceptions() as exc:  # the cause stays for --debug
        raise WeightsNotFoundError(
            f"{what}: could not load {str(where)!r}: {first_line(exc)}") from exc


_SHAPE = re.compile(r"(\S+) expected shape torch\.Size\(\[([^\]]*)\]\), but got "
                    r"torch\.Size\(\[([^\]]*)\]\)")


def _weights_name(folder: Path, variant: str | None) -> str:
    files = weight_files(folder, variant)[0] if folder.is_dir() else []
    return repr(str(files[0])) if len(files) == 1 else f"the weights in {str(folder)!r}"


def _extra_layers(model: Any, unexpected: Sequence[str]) -> list[str]:
    """Unexpected checkpoint keys that belong to numbered layers the model does not have
    (``transformer_blocks.2`` when the config makes two): the config has fewer layers than the
    weights. Other stray keys (old buffers, unused heads) are tolerated."""
    modules = {name for name, _ in model.named_modules()}
    extra = set()
    for key in unexpected:
        parts = key.split(".")
        for i, part in enumerate(parts[1:], start=1):
            if part.isdigit():
                container, layer = ".".join(parts[:i]), ".".join(parts[:i + 1])
                if container in modules and layer not in modules:
                    extra.add(layer)
                break
    return sorted(extra)


def _dtype_kwargs(model_class: type, dtype: Any) -> dict[str, Any]:
    if dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
        new_diffusers = True
    except ImportError:
        new_diffusers = False
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    if model_class.__module__.startswith("transformers"):
        return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    return {"dtype": dtype} if new_diffusers else {"torch_dtype": dtype}


def load_model(model_class: type, source: str | Path, *, what: str, subfolder: str = "",
               dtype: Any = None, variant: str | None = None, local_files_only: bool = True,
               **kwargs: Any) -> Any:
    """``model_class.from_pretrained`` (a diffusers ``ModelMixin`` or a transformers
    ``PreTrainedModel``) from safetensors, checked: a local folder is checked first
    (:func:`check_model_dir`), the config must describe ``model_class`` (diffusers), and the
    weights must cover the model exactly (no missing, mis-shaped or extra layers).

    :raises WeightsNotFoundError / UnsafeWeightsError: naming the folder, config or file.
    """
    folder = Path(source).expanduser() / subfolder if subfolder else Path(source).expanduser()
    local = folder.is_dir()
    if not local and local_files_only:  # a repo id: check its copy in the HF cache
        from adapterswap.hub import cached_snapshot, looks_like_repo_id

        snapshot = cached_snapshot(str(source)) if looks_like_repo_id(str(source)) else None
        if snapshot is not None and (snapshot / subfolder).is_dir():
            folder, local = snapshot / subfolder, True
    if local:
        variant = folder_variant(folder, variant)
        check_model_dir(folder, what=what, variant=variant)
        _check_model_class(model_class, folder, what=what)
    is_transformers = model_class.__module__.startswith("transformers")
    options: dict[str, Any] = {**_dtype_kwargs(model_class, dtype), "use_safetensors": True,
                               "local_files_only": local_files_only,
                               "output_loading_info": True, **kwargs}
    if variant is not None:
        options["variant"] = variant
    if is_transformers:  # report mismatches in loading_info rather than raise mid-way
        options.setdefault("ignore_mismatched_sizes", True)
    where = folder if local else f"{source}{'/' + subfolder if subfolder else ''}"
    with loading(what, where), quiet_loading():
        try:
            if local:
                model, info = model_class.from_pretrained(str(folder), **options)
            else:
                model, info = model_class.from_pretrained(
                    str(source), **({"subfolder": subfolder} if subfolder else {}), **options)
        except ValueError as exc:  # diffusers refuses mis-shaped weights with one of these
            mismatch = _model_mismatch(exc)
            if mismatch is None:
                raise
            raise WeightsNotFoundError(
                f"{what}: {str(Path(str(where)) / 'config.json')!r} does not match "
                f"{_weights_name(Path(str(where)), variant)}: {mismatch}") from None
    _check_loading_info(model, info, what=what, folder=folder if local else Path(str(where)),
                        variant=variant)
    return model


def _check_model_class(model_class: type, folder: Path, *, what: str) -> None:
    """A diffusers config names its class (``_class_name``): it must be ``model_class``'s."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise WeightsNotFoundError(f"{what}: {str(folder)!r} has no config.json") from None
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(
            f"{what}: {str(config_path)!r} is not a valid JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise WeightsNotFoundError(f"{what}: {str(config_path)!r} is not a JSON object")
    found = config.get("_class_name")
    if found is None or not model_class.__module__.startswith("diffusers"):
        return
    import diffusers

    other = getattr(diffusers, str(found), None)
    if found != model_class.__name__ and not (
            isinstance(other, type) and issubclass(other, model_class)):
        raise WeightsNotFoundError(
            f"{what}: {str(config_path)!r} describes the class {found}, not "
            f"{model_class.__name__}: {str(folder)!r} holds another kind of model")


def _check_loading_info(model: Any, info: Mapping[str, Any], *, what: str, folder: Path,
                        variant: str | None) -> None:
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    extra = _extra_layers(model, sorted(info.get("unexpected_keys") or ()))
    if not (missing or mismatched or extra):
        return
    problems = []
    if mismatched:
        shapes = [f"{key} is {tuple(ckpt)} in the weights but {tuple(want)} in the config's "
                  "model" for key, ckpt, want in mismatched]
        problems.append(f"{len(mismatched)} weights have other shapes ({some(shapes, 2)})")
    if missing:
        problems.append(f"the config makes {len(missing)} weights the file lacks "
                        f"({some(missing)})")
    if extra:
        problems.append(f"the weights have layers the config lacks ({some(extra)})")
    raise WeightsNotFoundError(
        f"{what}: {str(folder / 'config.json')!r} does not match "
        f"{_weights_name(folder, variant)}: {'; '.join(problems)}")


def _model_mismatch(exc: BaseException) -> str | None:
    """diffusers' shape-mismatch ValueError, as one phrase."""
    match = _SHAPE.search(str(exc))
    if match is None:
        return None
    key, want, got = match.groups()

    def shape(text: str) -> tuple[int, ...]:
        return tuple(int(n) for n in text.replace(" ", "").split(",") if n)

    return f"{key} is {shape(got)} in the weights but {shape(want)} in the config's model"


# ----------------------------------------------------------------------------------- pipelines
def pipeline_components(pipeline_class: type, root: Path) -> dict[str, type]:
    """The model components of a diffusers pipeline directory (from ``model_index.json``) that
    ``pipeline_class`` takes, as diffusers or transformers model classes. Classes are looked
    up in those two libraries only: nothing named by the directory is imported."""
    import inspect

    import diffusers
    import transformers

    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}  # diffusers says what is wrong
    accepted = set(inspect.signature(pipeline_class.__init__).parameters)
    libraries = {"diffusers": (diffusers, diffusers.ModelMixin),
                 "transformers": (transformers, transformers.PreTrainedModel)}
    components = {}
    for name, entry in index.items() if isinstance(index, dict) else ():
        if name.startswith("_") or name not in accepted or not isinstance(entry, list) \
                or len(entry) != 2 or entry[0] not in libraries:
            continue
        module, base = libraries[entry[0]]
        model_class = getattr(module, str(entry[1]), None)
        if isinstance(model_class, type) and issubclass(model_class, base) \
                and (root / name).is_dir():
            components[name] = model_class
    return components


def refuse_custom_code(root: Path, *, what: str) -> None:
    """Raise :class:`UnsafeWeightsError` if ``model_index.json`` names a component class from a
    ``.py`` file shipped in the directory: adapterswap never runs code from a model directory."""
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        return
    for name, entry in index.items() if isinstance(index, dict) else ():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 \
                or not isinstance(entry[0], str) or entry[0] in ("diffusers", "transformers"):
            continue
        for script in (root / name / f"{entry[0]}.py", root / f"{entry[0]}.py"):
            if script.is_file():
                raise UnsafeWeightsError(
                    f"{what}: {str(root / 'model_index.json')!r} makes component {name!r} a "
                    f"class from {str(script)!r}, code shipped with the model; adapterswap never "
                    "runs code from a model directory (no trust_remote_code): use a directory "
                    "whose components are diffusers/transformers classes")


def pipeline_root(pipeline_class: type, source: str, *, local_files_only: bool,
                  variant: str | None = None) -> Path:
    """The local directory of a pipeline ``source``: itself, its Hugging Face cache snapshot,
    or (online) the download of its safetensors files."""
    from adapterswap.hub import cached_snapshot

    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if local_files_only:
        snapshot = cached_snapshot(source, ("model_index.json",))
        if snapshot is not None:
            return snapshot
    return Path(pipeline_class.download(source, local_files_only=local_files_only,
                                        use_safetensors=True, variant=variant))


def load_pipeline(pipeline_class: type, source: str, *, what: str, dtype: Any = None,
                  local_files_only: bool = True, variant: str | None = None,
                  components: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """``pipeline_class.from_pretrained(source)`` from safetensors, every model component loaded
    through :func:`load_model` first, so a broken component is named with what is wrong.

    :param components: components already built (or ``None`` to leave one out), passed on as is.
    :param kwargs: other ``from_pretrained`` arguments (``add_watermarker=False`` ...).
    """
    components = dict(components or {})
    with loading(what, source):
        root = pipeline_root(pipeline_class, source, local_files_only=local_files_only,
                             variant=variant)
    refuse_custom_code(root, what=what)
    for name, model_class in pipeline_components(pipeline_class, root).items():
        if name in components or name in kwargs:
            continue
        components[name] = load_model(model_class, root / name, what=what, dtype=dtype,
                                      variant=variant)
    options = {"use_safetensors": True, "local_files_only": True,
               **_dtype_kwargs(pipeline_class, dtype), **kwargs}
    if variant is not None:
        options["variant"] = variant
    with loading(what, root), quiet_loading():
        return pipeline_class.from_pretrained(str(root), **components, **options)
