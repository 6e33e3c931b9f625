"""A one-cell ``adapterswap sweep --preset tiny`` through the CLI, for the contract mixins.

The sweep runs in this process (click's test runner), so a plugin registered only for the
test (:func:`adapterswap.plugins.register_plugin`) takes part as an installed one would. It
uses no size flags: the cell must come out at the size the backbone declares for the tiny
preset (:attr:`Backbone.tiny_size <adapterswap.backbone.Backbone.tiny_size>`), which is what
``sweep``, ``generate``, ``--dry-run`` and these mixins all read.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TinySweep:
    """What a tiny sweep stored: its cells' status, size and image file, and its output."""

    exit_code: int
    output: str
    cells: list[dict] = field(default_factory=list)

    @property
    def sizes(self) -> set[tuple[int, int]]:
        """``(height, width)`` of every stored cell."""
        return {(c["height"], c["width"]) for c in self.cells}


def run_tiny_sweep(out: Path, backbone: str, *, adapter: str = "none",
                   extra: tuple[str, ...] = ()) -> TinySweep:
    """Run ``adapterswap sweep --backbone BACKBONE --adapter ADAPTER --preset tiny`` for one
    cell (one seed, one step, the sharpness metric, no latency timing) into ``out`` and
    return what it stored."""
    from click.testing import CliRunner

    from adapterswap.cli import main

    args = ["sweep", "--backbone", backbone, "--adapter", adapter, "--preset", "tiny",
            "--steps", "1", "--seeds", "0", "--metrics", "sharpness",
            "--timing-repeats", "0", "--out", str(out), *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    cells = []
    store = Path(out) / "results.sqlite"
    if store.exists():
        with sqlite3.connect(store) as db:
            db.row_factory = sqlite3.Row
            cells = [dict(row) for row in db.execute(
                "SELECT backbone, adapter, status, error, height, width, image FROM cells")]
    return TinySweep(result.exit_code, result.output, cells)
