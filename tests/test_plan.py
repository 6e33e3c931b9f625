"""The pure planner: no torch, stable order, chunks, the first-step sharing plan."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from adapterswap.sweep.plan import (
    FirstStepPlan,
    chunks,
    first_step_key,
    first_step_plan,
    plan_sweep,
)
from adapterswap.sweep.spec import Cell


def cell(backbone: str = "b", adapter: str = "a", scale: float | None = None,
         reference: str = "r", prompt: str = "p", seed: int = 0, steps: int = 1,
         size: int = 64) -> Cell:
    return Cell(backbone=backbone, adapter=adapter, scale=scale, start=0.0, end=1.0,
                reference=reference, prompt=prompt, seed=seed, steps=steps, height=size,
                width=size, guidance_scale=None, source="tiny", adapter_source="tiny", dtype="")


def grid(**fixed) -> list[tuple[Cell, str]]:  # noqa: ANN003
    cells = [cell(backbone=b, scale=s, prompt=p, seed=seed, steps=n, **fixed)
             for b in ("b1", "b2") for s in (None, 0.0) for p in ("p1", "p2")
             for seed in (0, 1) for n in (1, 2, 4)]
    return [(c, f"k{i:03d}") for i, c in enumerate(cells)]


def test_the_planner_imports_no_torch() -> None:
    code = textwrap.dedent("""
        import sys
        from adapterswap.sweep import plan
        from adapterswap.sweep.spec import Cell
        c = Cell(backbone="b", adapter="a", scale=None, start=0.0, end=1.0, reference="r",
                 prompt="p", seed=0, steps=2, height=8, width=8, guidance_scale=None,
                 source="", adapter_source="", dtype="")
        result = plan.plan_sweep([(c, "k")], set())
        plan.chunks([c], step_parallel=False, max_batch=2)
        assert result.backbones[0].settings[0].groups[0].first is c
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def test_plan_groups_by_backbone_setting_and_group_in_spec_order() -> None:
    keyed = grid()
    finished = {"k000", "k001"}
    plan = plan_sweep(keyed, finished)
    assert (plan.total, plan.skipped) == (48, 2)
    assert [b.backbone for b in plan.backbones] == ["b1", "b2"]
    first = plan.backbones[0]
    assert [s.setting[1] for s in first.settings] == [None, 0.0]
    for setting in first.settings:
        assert [g.first.prompt for g in setting.groups] == ["p1", "p2"]
        for group in setting.groups:
            assert len({c.group() for c, _ in group.items}) == 1
    todo = plan.todo
    assert [k for _, k in todo] == [k for _, k in keyed if k not in finished]  # order kept


def test_chunks_step_parallel_or_one_step_count_at_a_time() -> None:
    samples = [cell(seed=s, steps=n) for n in (4, 1, 2) for s in (0, 1, 2)]
    parallel = chunks(samples, step_parallel=True, max_batch=4)
    assert [len(c) for c in parallel] == [4, 4, 1]
    assert [c for chunk in parallel for c in chunk] == samples  # order kept
    sequential = chunks(samples, step_parallel=False, max_batch=2)
    assert [[c.steps for c in chunk] for chunk in sequential] == [
        [1, 1], [1], [2, 2], [2], [4, 4], [4]]
    assert [c.seed for c in sequential[0] + sequential[1]] == [0, 1, 2]  # stable within steps


def test_first_step_plan_computes_each_key_once() -> None:
    keys = [first_step_key(seed, "sigma1", None, False) for seed in (0, 1)] * 3
    plan = first_step_plan(keys)
    assert isinstance(plan, FirstStepPlan)
    assert plan.compute == [0, 1] and plan.shared == 4
    # outputs known from an earlier chunk of the group are not computed again
    again = first_step_plan(keys[:2], known={keys[0]})
    assert again.compute == [1] and again.shared == 1
    # nothing shareable: no plan
    assert first_step_plan([None, None]) is None
    mixed = first_step_plan([None, keys[0], None])
    assert mixed.compute == [0, 1, 2] and mixed.shared == 0
    # either part saying "never" makes the row unshared; the adapter's key separates rows
    assert first_step_key(0, None, "w", True) is None
    assert first_step_key(0, "s", None, True) is None
    assert first_step_key(0, "s", None, False) == (0, "s", None)
    assert first_step_key(0, "s", "in", True) != first_step_key(0, "s", "out", True)

