"""Enhancers: training-free tricks that change how a step is predicted while an adapter acts.

An adapter moved onto a distilled backbone may lose fidelity; some of it can be recovered
without training (FastFace, arXiv 2505.21144): by combining several predictions per step
(decoupled guidance) or by reshaping the adapter's attention while it is attached (attention
manipulation). An :class:`Enhancer` is such a trick, registered by a plugin through the
``register_enhancers`` hook and named in a sweep with ``--enhancer NAME[:k=v,...]``, so that
base, distilled and distilled + enhancer cells land in one report, on the same references,
seeds and steps.

The engine calls an enhancer at two points:

- :meth:`Enhancer.attach` / :meth:`Enhancer.detach` around the runs of a group (after the
  adapter is attached): attention patches go in here and come out exactly as they were;
- :meth:`Enhancer.predict` once per step instead of the backbone's one prediction, with a
  :class:`PredictCall` whose :meth:`~PredictCall.forward` runs the adapter and the denoiser
  with or without the text, with or without the adapter's conditioning, with or without the
  backbone's own classifier-free guidance. Every forward is counted
  (:attr:`PredictCall.forwards`): a cell records how many denoiser forwards its image took, and
  the extra forwards are inside the timed step, so they are in its latency too.

Settings at which an enhancer changes nothing (:meth:`Enhancer.is_neutral`) are not installed
at all, so they give the plain run bit for bit. torch is imported lazily.
"""

from __future__ import annotations

import math
import re
import weakref
from abc import ABC
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

    from adapterswap.adapter import Adapter
    from adapterswap.backbone import Backbone
    from adapterswap.denoise import StepContext, TensorBundle

#: The name of "no enhancer" (a sweep value like any other).
NO_ENHANCER = "none"

_OPTION = re.compile(r"^[a-z][a-z0-9_]*$")


def parse_enhancer(text: Any, *, argument: str = "--enhancer") -> tuple[str, dict[str, Any]]:
    """``"dcg:a=1.5,b=1/3/3/1"`` -> ``("dcg", {"a": 1.5, "b": [1.0, 3.0, 3.0, 1.0]})``.

    Values are numbers, ``true``/``false``, per-step lists of numbers joined by ``/``, or
    words; a malformed spec raises one :class:`InvalidArgumentError` naming ``argument``."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(argument, text, "give NAME or NAME:key=value,...")
    name, _, rest = text.strip().partition(":")
    options: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not _OPTION.match(key) or not value.strip():
                raise InvalidArgumentError(argument, text,
                                           f"{item.strip()!r} is not key=value")
            if key in options:
                raise InvalidArgumentError(argument, text, f"option {key!r} given twice")
            options[key] = _value(value.strip())
    elif ":" in text:
        raise InvalidArgumentError(argument, text, "nothing after ':'")
    return name.strip(), options


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    parts = text.split("/")
    numbers = []
    for part in parts:
        try:
            numbers.append(float(part))
        except ValueError:
            return text if len(parts) == 1 else parts
    return numbers[0] if len(numbers) == 1 else numbers


def format_value(value: Any) -> str:
    """An option value as :func:`parse_enhancer` reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "/".join(format_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def per_step(value: float | Sequence[float], step_index: int, num_steps: int) -> float:
    """A setting's value at ``step_index`` of ``num_steps``: a number everywhere, or a list as
    a piecewise-constant schedule over the run (list item ``floor(i * L / N)``; a list as long
    as the run is read step by step)."""
    if not isinstance(value, (list, tuple)):
        return float(value)
    return float(value[min(len(value) - 1, step_index * len(value) // num_steps)])


def check_number(name: str, value: Any, *, minimum: float | None = None,
                 schedule: bool = False) -> Any:
    """A finite number (or, with ``schedule``, a non-empty list of them), at least
    ``minimum``; else :class:`InvalidArgumentError` naming the option."""
    values = value if schedule and isinstance(value, (list, tuple)) else [value]
    if not values:
        raise InvalidArgumentError(name, value, "give at least one value")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (minimum is not None and v < minimum):
            need = "a finite number" + (f" >= {minimum:g}" if minimum is not None else "")
            raise InvalidArgumentError(
                name, value, f"must be {need}" + (", or a list a/b/c of them per step"
                                                  if schedule else ""))
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return float(value)


class Enhancer(ABC):
    """A training-free trick on a step (a guidance scheme, an attention patch, or both).

    Class attributes (set them in your subclass):

    :cvar name: registry name (``"dcg"``).
    :cvar description: one line for ``adapterswap list``.
    :cvar option_docs: ``{option: one line}`` of the options it takes, with their defaults.
    :cvar kinds: adapter kinds it applies to (``None``: any adapter).
    :cvar forwards_per_step: denoiser forwards one image takes at a step where it acts
        (three for decoupled guidance; one for an attention patch).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    option_docs: ClassVar[Mapping[str, str]] = {}
    kinds: ClassVar[frozenset[str] | None] = None
    forwards_per_step: ClassVar[int] = 1

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = self.check_options(options)
        #: the backbone and adapter it is attached to (:meth:`attach`)
        self.backbone: Backbone | None = None
        self.adapter: Adapter | None = None

    # ------------------------------------------------------------------ declaration
    @classmethod
    def class_problems(cls, klass: type) -> list[str]:
        """What is wrong with a subclass's declaration (used when a plugin registers it)."""
        problems = []
        kinds = getattr(klass, "kinds", None)
        if kinds is not None and not (isinstance(kinds, (frozenset, set, tuple))
                                      and all(isinstance(k, str) and k for k in kinds)):
            problems.append(f"kinds={kinds!r} must be None or a set of adapter kind names")
        docs = getattr(klass, "option_docs", None)
        if not isinstance(docs, Mapping):
            problems.append(f"option_docs={docs!r} must map option names to one line each")
        forwards = getattr(klass, "forwards_per_step", None)
        if isinstance(forwards, bool) or not isinstance(forwards, int) or forwards < 1:
            problems.append(f"forwards_per_step={forwards!r} must be an integer >= 1")
        return problems

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; an unknown name or a bad value raises
        :class:`InvalidArgumentError` naming it. Subclasses check their values in
        :meth:`check_option`."""
        unknown = sorted(set(options) - set(cls.option_docs))
        if unknown:
            known = ", ".join(cls.option_docs) or "none"
            raise InvalidArgumentError(f"enhancer {cls.name!r} option", unknown[0],
                                       f"its options are: {known}")
        return {name: cls.check_option(name, value) for name, value in options.items()}

    @classmethod
    def check_option(cls, name: str, value: Any) -> Any:
        """One option's value, checked (default: as given)."""
        return value

    def spec(self) -> str:
        """The canonical ``NAME[:k=v,...]`` of these settings (a sweep's cell value): the
        options given, sorted."""
        if not self.options:
            return self.name
        items = ",".join(f"{k}={format_value(v)}" for k, v in sorted(self.options.items()))
        return f"{self.name}:{items}"

    def is_neutral(self) -> bool:
        """Whether these settings change nothing (then the engine does not install the
        enhancer, and the run is the plain one bit for bit). Default: never."""
        return False

    def check_adapter(self, adapter_cls: type | None) -> None:
        """Refuse (:class:`InvalidArgumentError`) an adapter it cannot act on, by class,
        before anything loads. Default: an adapter of one of :attr:`kinds` is needed."""
        if adapter_cls is None:
            raise InvalidArgumentError("--enhancer", self.spec(),
                                       "acts on an adapter: give one (not --adapter none)")
        if self.kinds is not None and adapter_cls.kind not in self.kinds:
            raise InvalidArgumentError(
                "--enhancer", self.spec(),
                f"acts on adapters of kind {', '.join(sorted(self.kinds))}; adapter "
                f"{adapter_cls.name!r} is of kind {adapter_cls.kind!r}")

    # ------------------------------------------------------------------ lifecycle
    def attach(self, backbone: Backbone, adapter: Adapter | None) -> None:
        """Before the runs of a group, after the adapter is attached: install what acts while
        attached (attention patches). Default: remember them."""
        self.backbone, self.adapter = backbone, adapter

    def detach(self) -> None:
        """After the runs: remove what :meth:`attach` installed, leaving the backbone and the
        adapter exactly as they were."""
        self.backbone = self.adapter = None

    # ------------------------------------------------------------------ per step
    def forwards_at(self, step_index: int, num_steps: int) -> int:
        """Denoiser forwards per image at this step (compute accounting; the plain step's
        classifier-free guidance doubles it separately). Default :attr:`forwards_per_step`."""
        return self.forwards_per_step

    def predict(self, call: PredictCall) -> torch.Tensor:
        """The step's model output for the batch of ``call``: by default the plain one
        (``call.forward()``); a guidance scheme combines several forwards."""
        return call.forward()


@dataclass
class PredictCall:
    """One step's prediction, as an :class:`Enhancer` asks for it.

    :ivar forwards: denoiser forwards made so far for this call, per image (one forward of
        the batch, or of its two classifier-free guidance halves, counts 1 or 2).
    """

    backbone: Any
    adapter: Any
    conditioning: Any
    latents: Any
    ctx: StepContext
    prompt: TensorBundle
    guidance_scale: float | None
    forwards: int = 0
    _null_prompt: Any = field(default=None, repr=False)

    def forward(self, *, text: bool = True, identity: bool = True,
                guided: bool = True) -> torch.Tensor:
        """The denoiser's output for the batch: with the prompt (``text``) or the encoding of
        no text (:meth:`Backbone.null_prompt <adapterswap.backbone.Backbone.null_prompt>`);
        with the adapter acting (``identity``) or switched off for every row (it gives the
        denoiser what it gives outside its window); with the backbone's classifier-free
        guidance (``guided``) or as one conditional prediction. Guidance embedded in the
        denoiser (FLUX.1-dev's) is kept either way: it is part of the model, not a scheme."""
        backbone, adapter = self.backbone, self.adapter
        prompt = self.prompt if text else self.null_prompt()
        guidance = self.guidance_scale
        if not guided and backbone.guidance_mode == "cfg":
            guidance = None
        adapter_inputs = None
        if adapter is not None and self.conditioning is not None:
            if identity:
                adapter_inputs = adapter.denoiser_inputs(backbone, self.conditioning,
                                                         self.latents, self.ctx, prompt)
            else:
                with adapter.switched_off():
                    adapter_inputs = adapter.denoiser_inputs(backbone, self.conditioning,
                                                             self.latents, self.ctx, prompt)
        cfg = backbone.guidance_mode == "cfg" and guidance is not None and guidance > 1.0
        self.forwards += 2 if cfg else 1
        return backbone.predict(self.latents, self.ctx, prompt, guidance_scale=guidance,
                                adapter_inputs=adapter_inputs)

    def null_prompt(self) -> TensorBundle:
        """The encoding of no text for this batch: made once per backbone (its loaded
        pipeline) and prompt layout, not at every step, since it runs the text encoders."""
        if self._null_prompt is None:
            layout = tuple((name, tuple(value.shape), str(value.dtype), str(value.device))
                           for name, value in sorted(self.prompt.batched.items())
                           if value is not None)
            cache = _NULL_PROMPTS.setdefault(self.backbone, {})
            key = (id(self.backbone.pipe), layout)
            if key not in cache:
                cache.clear()  # another pipeline or prompt layout: the old ones are stale
                cache[key] = self.backbone.null_prompt(self.prompt)
            self._null_prompt = cache[key]
        return self._null_prompt


#: Per backbone, its encodings of no text (:meth:`PredictCall.null_prompt`); dropped with it.
_NULL_PROMPTS: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def predict_step(backbone: Any, adapter: Any, conditioning: Any, latents: Any,
                 ctx: StepContext, prompt: TensorBundle, guidance_scale: float | None,
                 enhancer: Enhancer | None = None) -> tuple[torch.Tensor, int]:
    """``(model output, denoiser forwards per image)`` of one step: the enhancer's
    prediction, or the plain one (the adapter's inputs, then the backbone's ``predict``)."""
    call = PredictCall(backbone, adapter, conditioning, latents, ctx, prompt, guidance_scale)
    output = call.forward() if enhancer is None else enhancer.predict(call)
    return output, call.forwards
