"""Cells without models for the planning tests (scheduler, work queue): a grid of backbones x
references x seeds x steps, keyed by what they are."""

from __future__ import annotations

from adapterswap.sweep.spec import Cell


def make_cell(backbone="toy-dev", reference="r0", seed=0, steps=1, size=16,
              adapter="toy-adapter"):
    return Cell(backbone=backbone, adapter=adapter, scale=None, start=0.0, end=1.0,
                reference=reference, prompt="p", seed=seed, steps=steps, height=size,
                width=size, guidance_scale=None, source="", adapter_source="", dtype="fp32")


def grid(backbones=("toy-dev", "toy-fast"), references=("r0", "r1"), seeds=(0, 1, 2),
         steps=(1, 2, 4), size=16, adapter="toy-adapter"):
    cells = [make_cell(b, r, s, n, size, adapter) for b in backbones for r in references
             for s in seeds for n in steps]
    return [(c, f"{c.backbone}/{c.reference}/{c.seed}/{c.steps}/{c.height}") for c in cells]
