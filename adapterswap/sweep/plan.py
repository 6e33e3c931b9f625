"""Pure planning of a sweep: which cells run, in what order, and together.

Nothing here touches a model or imports torch: the planner works on :class:`Cell` values and
their keys, and on host-side keys that the runner computes (the first-step sharing plan), so
every decision can be tested, printed and broadcast (``distributed``) before anything loads.

The order is the engine's: cells -> by backbone (each loaded once) -> by adapter setting (the
adapter attached once) -> groups (one reference and prompt: encodings reused) -> chunks (at most
``max_batch`` images per forward: step-parallel, or one step count at a time) -> the first-step
sharing plan of a chunk. Several ranks (torchrun) and Ray workers take groups and chunks
dynamically, longest group first by :func:`cell_cost` (:mod:`adapterswap.sweep.workqueue`,
:mod:`adapterswap.sweep.scheduler`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from adapterswap.sweep.spec import Cell

Keyed = tuple[Cell, str]


class HasSteps(Protocol):
    steps: int


S = TypeVar("S", bound=HasSteps)


@dataclass
class GroupPlan:
    """Cells of one (backbone, adapter setting, reference, prompt): they share the prompt
    encoding and the reference conditioning; their seeds and step counts batch together."""

    items: list[Keyed]

    @property
    def first(self) -> Cell:
        return self.items[0][0]


@dataclass
class SettingPlan:
    """Cells of one adapter setting (adapter, scale, start, end) on one backbone."""

    setting: tuple[Any, ...]
    groups: list[GroupPlan]

    @property
    def cells(self) -> list[Cell]:
        return [cell for group in self.groups for cell, _ in group.items]

    @property
    def first(self) -> Cell:
        return self.groups[0].first


@dataclass
class BackbonePlan:
    """Cells of one backbone: it is loaded once, then each setting runs in turn."""

    backbone: str
    settings: list[SettingPlan]

    @property
    def cells(self) -> list[Cell]:
        return [cell for setting in self.settings for cell in setting.cells]


@dataclass
class SweepPlan:
    """What a run does: ``total`` cells of which ``skipped`` are already finished; the rest,
    in order, under :attr:`backbones`."""

    total: int
    skipped: int
    backbones: list[BackbonePlan] = field(default_factory=list)

    @property
    def todo(self) -> list[Keyed]:
        return [item for b in self.backbones for s in b.settings for g in s.groups
                for item in g.items]


def _grouped(items: Iterable[Keyed], key: Any) -> dict[Any, list[Keyed]]:
    """Items by ``key(cell)``, in order of first appearance (stable)."""
    out: dict[Any, list[Keyed]] = {}
    for cell, cell_key in items:
        out.setdefault(key(cell), []).append((cell, cell_key))
    return out


def plan_sweep(keyed: Sequence[Keyed], finished: set[str] | frozenset[str] = frozenset()
               ) -> SweepPlan:
    """Plan the unfinished cells of ``keyed``: by backbone, by adapter setting, by group, in
    the spec's order."""
    todo = [(c, k) for c, k in keyed if k not in finished]
    plan = SweepPlan(total=len(keyed), skipped=len(keyed) - len(todo))
    for backbone, items in _grouped(todo, lambda c: c.backbone).items():
        settings = []
        for setting, setting_items in _grouped(items, lambda c: c.setting()).items():
            groups = [GroupPlan(group) for group in
                      _grouped(setting_items, lambda c: c.group()).values()]
            settings.append(SettingPlan(setting, groups))
        plan.backbones.append(BackbonePlan(backbone, settings))
    return plan


def chunks(samples: Sequence[S], *, step_parallel: bool, max_batch: int) -> list[list[S]]:
    """Split a group's samples into forwards of at most ``max_batch`` images: in order
    (step-parallel: different step counts advance together), or one step count at a time,
    fewest steps first (seeds batched; what a compiled denoiser wants)."""
    if step_parallel:
        return [list(samples[i:i + max_batch]) for i in range(0, len(samples), max_batch)]
    by_steps: dict[int, list[S]] = {}
    for sample in sorted(samples, key=lambda s: s.steps):
        by_steps.setdefault(sample.steps, []).append(sample)
    out: list[list[S]] = []
    for group in by_steps.values():
        out += [group[i:i + max_batch] for i in range(0, len(group), max_batch)]
    return out


@dataclass
class FirstStepPlan:
    """Which rows of a chunk's first step need a forward.

    :ivar compute: the rows the forward computes.
    :ivar keys: every row's first-step key (``None``: never shared).
    """

    compute: list[int]
    keys: list[Hashable | None]

    @property
    def shared(self) -> int:
        """Rows whose output is reused instead of computed."""
        return len(self.keys) - len(self.compute)


def first_step_key(seed: int, schedule_key: Hashable | None,
                   adapter_key: Hashable | None, with_adapter: bool) -> Hashable | None:
    """A row's first-step key: its seed (same latents: a group shares prompt, reference and
    setting), the schedule's first-step key and the adapter's; ``None`` when either part
    says never (``None``)."""
    if schedule_key is None or (with_adapter and adapter_key is None):
        return None
    return (seed, schedule_key, adapter_key)


def first_step_plan(keys: Sequence[Hashable | None],
                    known: Any = frozenset()) -> FirstStepPlan | None:
    """Rows to compute at step 0: one per key not already ``known`` (outputs kept from
    earlier chunks of the group), plus every unshared row. ``None`` when no row has a key."""
    compute: list[int] = []
    seen: set[Any] = set()
    for j, key in enumerate(keys):
        if key is None or (key not in known and key not in seen):
            compute.append(j)
            seen.add(key)
    if len(compute) == len(keys) and all(k is None for k in keys):
        return None
    return FirstStepPlan(compute, list(keys))


def cell_cost(cell: Cell) -> float:
    """Estimated cost of a cell: denoising steps x pixels."""
    return float(cell.steps) * cell.height * cell.width

