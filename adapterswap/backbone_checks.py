"""The checks behind :class:`adapterswap.backbone.Backbone`: a subclass's declaration (when a
plugin registers it), its options, and the settings of a generation.

Kept apart so that ``backbone.py`` reads as the interface a plugin implements; the
:class:`~adapterswap.backbone.Backbone` methods of the same names call these. Every refusal
names the argument (or class attribute) and the value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from adapterswap.errors import InvalidArgumentError

#: ``embedded``: guidance is an input of the model (FLUX dev); ``cfg``: classifier-free guidance
#: with a negative prompt (SDXL, SD1.5); ``none``: no guidance (distilled models, FLUX schnell).
GUIDANCE_MODES = ("embedded", "cfg", "none")
_FAMILY = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def declaration_problems(klass: type) -> list[str]:
    """What is wrong with a backbone class's declaration: required class attributes, their
    values (family, guidance mode, default steps, ``size_multiple``, ``tiny_size``) and
    abstract methods left unimplemented."""
    problems = []
    for attr in ("family", "default_source", "default_steps", "guidance_mode"):
        if not hasattr(klass, attr):
            problems.append(f"class attribute {attr!r} is not set")
    family = getattr(klass, "family", None)
    if family is not None and not (isinstance(family, str) and _FAMILY.match(family)):
        problems.append(f"family={family!r} must be a lowercase identifier")
    mode = getattr(klass, "guidance_mode", None)
    if mode is not None and mode not in GUIDANCE_MODES:
        problems.append(f"guidance_mode={mode!r} must be one of {', '.join(GUIDANCE_MODES)}")
    steps = getattr(klass, "default_steps", None)
    if steps is not None and not (isinstance(steps, int) and steps >= 1):
        problems.append(f"default_steps={steps!r} must be an integer >= 1")
    multiple = getattr(klass, "size_multiple", 8)
    if not _positive_int(multiple):
        problems.append(f"size_multiple={multiple!r} must be an integer >= 1")
    tiny = getattr(klass, "tiny_size", None)
    if tiny is not None and not (isinstance(tiny, tuple) and len(tiny) == 2 and all(
            _positive_int(v) and (not _positive_int(multiple) or v % multiple == 0)
            for v in tiny)):
        problems.append(f"tiny_size={tiny!r} must be a (height, width) pair of positive "
                        f"multiples of size_multiple={multiple!r}")
    abstract = sorted(getattr(klass, "__abstractmethods__", ()))
    if abstract:
        problems.append(f"abstract methods not implemented: {', '.join(abstract)}")
    return problems


def checked_options(cls: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` of backbone class ``cls`` normalised by its ``check_option``; an unknown
    name refused for ``backbone_options`` with the known ones (and why, where the backbone
    says: ``unsupported_options``)."""
    if not isinstance(options, Mapping):
        raise InvalidArgumentError("backbone_options", options,
                                   "must be a mapping of option names to values")
    checked = {}
    for name, value in options.items():
        if name not in cls.option_docs:
            known = ", ".join(cls.option_docs) or "none"
            why = cls.unsupported_options.get(name)
            raise InvalidArgumentError(
                "backbone_options", {name: value},
                f"unknown option {name!r} of backbone {cls.name!r}"
                f"{f' ({why})' if why else ''}; known options: {known}")
        checked[name] = cls.check_option(name, value)
    return checked


def check_guidance(backbone: Any, guidance_scale: Any) -> None:
    """A guidance scale is ``None`` or a finite number >= 0, and, for a backbone without
    guidance (``guidance_mode="none"``), ``None``, 0 or 1."""
    if backbone.guidance_mode == "none" and guidance_scale not in (None, 0.0, 1.0):
        raise InvalidArgumentError(
            "guidance_scale", guidance_scale,
            f"backbone {backbone.name!r} runs without guidance (guidance_mode='none')")
    if guidance_scale is not None and not (isinstance(guidance_scale, (int, float))
                                           and math.isfinite(guidance_scale)
                                           and guidance_scale >= 0):
        raise InvalidArgumentError("guidance_scale", guidance_scale,
                                   "must be a finite number >= 0")


def check_generation(backbone: Any, *, num_inference_steps: Any, height: Any, width: Any,
                     guidance_scale: Any) -> None:
    """The settings of one generation: the step count (1 to ``max_steps``), the size
    (positive multiples of ``size_multiple``, at most ``max_pixels``) and the guidance
    scale (:func:`check_guidance`)."""
    check_guidance(backbone, guidance_scale)
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError("num_inference_steps", steps, "must be an integer >= 1")
    if steps > backbone.max_steps:
        raise InvalidArgumentError("num_inference_steps", steps,
                                   f"backbone {backbone.name!r} takes at most "
                                   f"{backbone.max_steps} steps (max_steps)")
    m = backbone.size_multiple
    for arg, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < m or value % m:
            raise InvalidArgumentError(arg, value, f"must be a positive multiple of {m}")
    if height * width > backbone.max_pixels:
        raise InvalidArgumentError(
            "height", height, f"{height} x {width} is {height * width / 1e6:.1f} MP; "
            f"backbone {backbone.name!r} makes images of at most "
            f"{backbone.max_pixels / 1e6:.1f} MP (max_pixels)")


class BackboneWeights:
    """The class-level questions about a backbone's weights (a base of
    :class:`~adapterswap.backbone.Backbone`), answered without loading anything."""

    name: str
    default_source: str
    required_files: tuple[str, ...]

    @classmethod
    def weights_status(cls, source: str | None = None) -> Any:
        """Whether the weights are present locally (path or HF cache), without network."""
        from adapterswap.config import configured_source
        from adapterswap.hub import weights_status

        source = source or configured_source(cls.name) or cls.default_source
        return weights_status(source, cls.required_files)

    @classmethod
    def extra_weights(cls, options: Mapping[str, Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Weights the backbone reads besides its source, by label: ``{"lora": (where,
        (file,))}`` for a distilled LoRA or UNet file, so that provenance identifies them
        (a new LoRA at the same repo id is another cell); default none."""
        return {}
