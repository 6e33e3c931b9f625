"""Where a user waits: a CLI sweep from process start to exit against the work it has to do
(issue #20 part 4).

    python benchmarks/gpu/bench_cli.py --out results/cli.json     # one GPU, published sizes
    python benchmarks/gpu/bench_cli.py --tiny --out /tmp/cli.json # CPU smoke test

Each row runs ``python -m adapterswap sweep ...`` as a new process (``--preset random``:
random weights at the published sizes, real latency, nothing downloaded) and times it from
the parent, start to exit, after one ``-X importtime`` run of the same command (which warms
what a machine that has run a sweep before has warm). The sweep stores its own time
accounting in the run's row (``runs.summary``): loading models and metrics, latency timing,
denoiser forwards, decoding.
Reported per row:

- ``wall_s``: process start to exit;
- ``work_s``: weights load + sum of denoiser forwards + decodes, the issue's denominator, and
  ``ratio`` = wall / work (target <= 1.3);
- ``work_with_latency_s`` / ``ratio_with_latency``: the same with the separate latency passes
  counted as work (they are forwards the ``latency`` metric asked for);
- ``outside_engine_s``: wall minus the engine's own seconds (imports, validation, weight
  checks, the report), and ``imports_s``: ``python -X importtime`` of the same command in a
  further process, summed over top-level imports.

Rows: flux-schnell + InfuseNet (steps 1,2,4 x 4 seeds = 12 cells) and SDXL + style
IP-Adapter (its default grid x 2 seeds = 12 cells), eager, then flux again with
``--timing-repeats 0`` (no latency passes) to show what those cost, and once more with
``ADAPTERSWAP_FULL_EXIT=1`` (the interpreter's teardown kept) to show what the fast exit saves.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import write  # noqa: E402

ROWS = {
    "flux-schnell 12 cells": ["--backbone", "flux-schnell", "--steps", "1,2,4",
                              "--seeds", "0,1,2,3"],
    "sdxl 12 cells": ["--backbone", "sdxl", "--seeds", "0,1"],
    "flux-schnell 12 cells, --timing-repeats 0": ["--backbone", "flux-schnell", "--steps",
                                                  "1,2,4", "--seeds", "0,1,2,3",
                                                  "--timing-repeats", "0"],
    "flux-schnell 12 cells, --timing-repeats 0, ordinary exit": [
        "--backbone", "flux-schnell", "--steps", "1,2,4", "--seeds", "0,1,2,3",
        "--timing-repeats", "0"],
}
#: Environment of a row beyond the parent's: the interpreter's teardown kept, to measure what
#: the entry point's fast exit (adapterswap.cli.fast_exit) saves.
ROW_ENV = {"flux-schnell 12 cells, --timing-repeats 0, ordinary exit":
           {"ADAPTERSWAP_FULL_EXIT": "1"}}


def sweep(extra: list[str], out: Path, preset: str, *, importtime: bool = False,
          env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run one CLI sweep as a new process; (wall seconds, stderr)."""
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m",
               "adapterswap", "sweep", "--preset", preset, *extra, "--out", str(out)]
    env = {**{k: v for k, v in os.environ.items() if k != "ADAPTERSWAP_FULL_EXIT"},
           "PYTHONUNBUFFERED": "1", **(env or {})}  # the exit is the row's, not the caller's
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return wall, done.stderr


def imports_seconds(stderr: str) -> float:
    """The sum of top-level imports' cumulative times from ``-X importtime`` output."""
    total = 0
    for line in stderr.splitlines():
        found = re.match(r"import time:\s+\d+ \|\s+(\d+) \| \S", line)  # top level
        if found:
            total += int(found.group(1))
    return total / 1e6


def run_summary(out: Path) -> dict[str, Any]:
    from adapterswap.sweep.store import RunStore

    with RunStore(out, lock=False) as store:
        run = store.latest_run()
    if not run or not run.get("summary"):
        raise SystemExit(f"{out}: the run stored no summary")
    return run["summary"]


def row(label: str, extra: list[str], preset: str, root: Path, index: int,
        importtime: bool = True) -> dict[str, Any]:
    out = root / f"{index}-{re.sub(r'[^a-z0-9]+', '-', label.lower())}"
    # first the -X importtime process: it also warms what a machine that ran a sweep before
    # has (the random preset's saved weights, the OS file cache); then the timed one
    env = ROW_ENV.get(label)
    imports_wall, imports_err = sweep(extra, root / (out.name + "-importtime"), preset,
                                      importtime=True, env=env) if importtime else (None, "")
    wall, _ = sweep(extra, out, preset, env=env)
    summary = run_summary(out)
    work = summary["load_seconds"] + summary["forward_seconds"] + summary["decode_seconds"]
    with_latency = work + summary["latency_seconds"]
    result = {
        "row": label, "env": env or {},
        "full_exit": int(bool(env and env.get("ADAPTERSWAP_FULL_EXIT"))),  # a number: history
        "command": "adapterswap sweep --preset " + preset + " " + " ".join(extra),
        "wall_s": wall, "engine_s": summary["seconds"],
        "outside_engine_s": wall - summary["seconds"],
        "load_s": summary["load_seconds"], "forward_s": summary["forward_seconds"],
        "forwards": summary["forwards"], "decode_s": summary["decode_seconds"],
        "finish_s": summary["finish_seconds"], "finish_overlapped": summary["finish_overlapped"],
        "latency_s": summary["latency_seconds"], "cells": summary["done"],
        "work_s": work, "ratio": wall / work,
        "work_with_latency_s": with_latency, "ratio_with_latency": wall / with_latency,
        "imports_s": imports_seconds(imports_err) if importtime else None,
        "importtime_run_wall_s": imports_wall,
    }
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()},
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/gpu/results/cli.json")
    parser.add_argument("--tiny", action="store_true", help="tiny preset on the CPU (smoke)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row numbers (0-based) to run, repeats allowed "
                             "(interleave two rows to compare them); default all")
    parser.add_argument("--no-importtime", action="store_true",
                        help="no -X importtime process per row: one untimed warm-up sweep "
                             "first, then only the timed ones")
    args = parser.parse_args()
    preset = "tiny" if args.tiny else "random"
    chosen = list(ROWS.items())
    if args.rows:
        picked = [i.strip() for i in args.rows.split(",")]
        bad = [i for i in picked if not (i.isdigit() and int(i) < len(chosen))]
        if bad:
            parser.error(f"--rows {args.rows}: {bad[0]!r} is not a row number 0-{len(chosen) - 1}")
        chosen = [chosen[int(i)] for i in picked]
    results: dict[str, Any] = {"preset": preset, "rows": []}  # write() adds the card
    with tempfile.TemporaryDirectory() as root:
        if args.no_importtime:  # what the importtime processes warm otherwise
            sweep(chosen[0][1], Path(root) / "warm-up", preset)
        for index, (label, extra) in enumerate(chosen):
            results["rows"].append(row(label, extra, preset, Path(root), index,
                                       importtime=not args.no_importtime))
            write(results, args.out, quiet=True)
    summary: dict[str, Any] = {}
    for r in results["rows"]:  # repeated rows: every measurement, in run order
        for key in ("ratio", "ratio_with_latency", "wall_s", "outside_engine_s"):
            summary.setdefault(r["row"], {}).setdefault(key, []).append(r[key])
    results["summary"] = summary
    write(results, args.out)


if __name__ == "__main__":
    main()
