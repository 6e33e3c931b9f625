"""Run settings an adapter's options ask for where the user gave none.

An adapter that reproduces another program (InfuseNet's ``reproduce="infiniteyou"``) needs that
program's defaults (its image size, its step count on one backbone) and its handling of sizes
the backbone cannot make (rounded down, not refused). It declares them with
:meth:`Adapter.run_defaults <adapterswap.adapter.Adapter.run_defaults>`, a :class:`RunDefaults`
read on the classes before anything loads; ``generate`` and ``sweep`` apply them through
:func:`apply_run_defaults`, which says in one note per change what it did and why. What the
user gave always wins, except a size the backbone cannot make, which is rounded down only when
the adapter declares ``round_size_to`` (and refused otherwise, as without an adapter).

The ``tiny`` preset keeps its declared tiny size: its models are random and small, and a
program's published size would only make them slow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunDefaults:
    """What an adapter's options ask of a run (``None``: nothing).

    :ivar height: image height where the user gave none.
    :ivar width: image width where the user gave none.
    :ivar steps: step count where the user gave none (``generate``: the run's; ``sweep``: added
        to the default grid, and the only one with ``only_default_steps``).
    :ivar round_size_to: sizes that are not multiples of this (and of the backbone's
        ``size_multiple``) are rounded down to one, with a note, instead of refused.
    :ivar why: the option behind them, for notes (``"reproduce='infiniteyou'"``).
    """

    height: int | None = None
    width: int | None = None
    steps: int | None = None
    round_size_to: int | None = None
    why: str = ""

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.height, self.width, self.steps,
                                           self.round_size_to))


def size_multiple(backbone_cls: Any, defaults: RunDefaults) -> int:
    """The multiple a size is rounded down to: the least common multiple of the backbone's
    ``size_multiple`` and the adapter's ``round_size_to``."""
    multiple = int(backbone_cls.size_multiple)
    if defaults.round_size_to:
        multiple = math.lcm(multiple, int(defaults.round_size_to))
    return multiple


def round_size(value: Any, multiple: int) -> Any:
    """``value`` rounded down to a multiple of ``multiple``; anything that is not an integer
    above ``multiple``, or already a multiple, comes back as it is (for the size checks to
    judge)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < multiple:
        return value
    return value - value % multiple


def apply_run_defaults(backbone_cls: Any, defaults: RunDefaults, *, height: Any, width: Any,
                       steps: Any = None, preset: str | None = None,
                       names: tuple[str, str, str] = ("height", "width", "steps"),
                       ) -> tuple[Any, Any, Any, list[str]]:
    """``(height, width, steps, notes)`` after ``defaults``: values the user left out
    (``None``) take the adapter's defaults (sizes not under the ``tiny`` preset); sizes the
    user gave are rounded down where the adapter declares ``round_size_to``. ``notes`` says,
    one line each, what changed and why (``names``: the settings' names for them)."""
    notes: list[str] = []
    if not defaults:
        return height, width, steps, notes
    why = f" ({defaults.why})" if defaults.why else ""
    if defaults.round_size_to:
        multiple = size_multiple(backbone_cls, defaults)
        rounded = []
        for name, value in zip(names[:2], (height, width)):
            new = round_size(value, multiple)
            if new != value:
                notes.append(f"{name} {value} rounded down to {new}, a multiple of "
                             f"{multiple}{why}")
            rounded.append(new)
        height, width = rounded
    if preset != "tiny":
        given = []
        if height is None and defaults.height is not None:
            height = defaults.height
            given.append(f"{names[0]} {height}")
        if width is None and defaults.width is not None:
            width = defaults.width
            given.append(f"{names[1]} {width}")
        if given:
            notes.append(f"{' and '.join(given)} by default{why}")
    if steps is None and defaults.steps is not None:
        steps = defaults.steps
        notes.append(f"{names[2]} {steps} by default on {backbone_cls.name}{why}")
    return height, width, steps, notes


def apply_to_spec(spec: Any, pairs: Sequence[tuple[Any, Any]]) -> None:
    """A sweep spec's view of its adapters' run defaults, set in ``spec._run_defaults`` per
    backbone: the sizes it gives rounded down where an adapter rounds them; its size and step
    defaults read by ``spec.size`` and ``spec.step_grid`` (the step count joins the default
    grid, or is the only one with ``only_default_steps``); each change noted in
    ``spec.defaults_used``. ``pairs``: each backbone class with its adapter class (or
    ``None``). Called by ``SweepSpec.validate``."""
    spec._run_defaults = {}
    if not isinstance(spec.adapter_options, Mapping):
        return  # refused with its own message by the spec
    for cls, adapter_cls in pairs:
        defaults = adapter_cls.run_defaults(spec.adapter_options, cls) \
            if adapter_cls is not None else None
        if not defaults:
            continue
        spec._run_defaults[cls.name] = defaults
        height, width, _, notes = apply_run_defaults(
            cls, defaults, height=spec.height, width=spec.width, steps=0, preset=spec.preset)
        if spec.height is not None:  # rounded; the defaults stay per backbone
            spec.height = height
        if spec.width is not None:
            spec.width = width
        if defaults.steps is not None and not spec.steps:
            where = "the only step count" if spec.only_default_steps else \
                "added to the default step grid"
            notes.append(f"steps {defaults.steps} {where} ({defaults.why})")
        for note in notes:
            note = f"{cls.name}: {note}"
            if note not in spec.defaults_used:
                spec.defaults_used.append(note)
