"""Sweeps across GPUs and machines on torch.distributed (launched by ``torchrun``).

``torchrun --nproc-per-node N -m adapterswap sweep ...`` (or ``adapterswap sweep --launcher
torchrun --nproc N ...``) starts N ranks. Every rank expands the same spec, skips the cells
already finished in the merged store or any shard, and takes a deterministic share of the rest:
whole (backbone, adapter setting, reference, prompt) groups, balanced by estimated cost (steps x
pixels) with the longest-processing-time rule, so a rank loads each backbone at most once and
reuses encodings within its groups. Each rank writes its own store shard under
``<out>/shards/rank-NNN/``; after a barrier, rank 0 merges the shards into
``<out>/results.sqlite`` (every cell exactly once) and writes the report. A rank that dies loses
only its in-flight cells; re-running the same command finishes the rest. The backend is NCCL
on CUDA and gloo on CPU; only the barrier uses it, the work itself needs no communication.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterswap.sweep.spec import Cell
from adapterswap.sweep.store import RunStore


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int


def dist_env() -> DistEnv | None:
    """The torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or ``None``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                   int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def init_process_group(env: DistEnv, timeout_s: float = 7200.0) -> str:
    """Join the torchrun job: NCCL on CUDA, gloo otherwise; return the backend."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def barrier() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def cell_cost(cell: Cell) -> float:
    """Estimated cost of a cell: denoising steps x pixels."""
    return float(cell.steps) * cell.height * cell.width


def assign(keyed: Sequence[tuple[Cell, str]], world_size: int) -> dict[str, int]:
    """Deterministic shard of each key: whole groups, longest-processing-time first."""
    groups: dict[tuple[Any, ...], list[tuple[Cell, str]]] = {}
    for cell, key in keyed:
        groups.setdefault(cell.group(), []).append((cell, key))
    ordered = sorted(groups.values(),
                     key=lambda g: (-sum(cell_cost(c) for c, _ in g), min(k for _, k in g)))
    loads = [0.0] * world_size
    owner: dict[str, int] = {}
    for group in ordered:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += sum(cell_cost(c) for c, _ in group)
        for _, key in group:
            owner[key] = rank
    return owner


def shard_dir(out: str | Path, rank: int) -> Path:
    return Path(out) / "shards" / f"rank-{rank:03d}"


def finished_everywhere(out: str | Path) -> set[str]:
    """Finished keys in the merged store and every shard (read-only)."""
    out = Path(out)
    stores = [out / "results.sqlite"] + sorted((out / "shards").glob("rank-*/results.sqlite"))
    keys: set[str] = set()
    for path in stores:
        if not path.is_file():
            continue
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            try:
                keys |= {r[0] for r in db.execute("SELECT key FROM cells WHERE status='done'")}
            except sqlite3.OperationalError:
                continue
    return keys


TABLES = ("cells", "scores", "trajectory", "probes", "latency", "metric_status")


def merge(out: str | Path) -> dict[str, int]:
    """Merge every shard under ``out/shards`` into ``out/results.sqlite``; each cell once.

    Finished cells win over failed ones; a key already finished in the merged store is kept.
    Images and references are moved next to the merged store. Returns counts.
    """
    out = Path(out)
    shards = sorted((out / "shards").glob("rank-*/results.sqlite"))
    counts = {"shards": len(shards), "cells_added": 0}
    with RunStore(out) as merged:
        for path in shards:
            shard = path.parent
            db = merged.db
            db.execute("ATTACH DATABASE ? AS shard", (str(path),))
            try:
                with merged.transaction():
                    before = db.execute("SELECT count(*) FROM cells WHERE status='done'"
                                        ).fetchone()[0]
                    done_keys = "SELECT key FROM shard.cells WHERE status='done' AND key NOT IN " \
                                "(SELECT key FROM main.cells WHERE status='done')"
                    new = [r[0] for r in db.execute(done_keys)]
                    for key in new:
                        for table in ("scores", "trajectory", "probes"):
                            db.execute(f"DELETE FROM main.{table} WHERE cell = ?", (key,))
                            db.execute(f"INSERT INTO main.{table} SELECT * FROM shard.{table} "
                                       "WHERE cell = ?", (key,))
                        db.execute("INSERT OR REPLACE INTO main.cells SELECT * FROM shard.cells "
                                   "WHERE key = ?", (key,))
                    db.execute("INSERT OR IGNORE INTO main.cells SELECT * FROM shard.cells "
                               "WHERE status != 'done'")
                    db.execute("INSERT OR IGNORE INTO main.latency SELECT * FROM shard.latency")
                    db.execute("INSERT OR REPLACE INTO main.metric_status "
                               "SELECT * FROM shard.metric_status WHERE available = 0")
                    db.execute("INSERT OR IGNORE INTO main.metric_status "
                               "SELECT * FROM shard.metric_status")
                    db.execute("INSERT OR IGNORE INTO main.meta SELECT * FROM shard.meta")
                    after = db.execute("SELECT count(*) FROM cells WHERE status='done'"
                                       ).fetchone()[0]
                    counts["cells_added"] += after - before
            finally:
                db.execute("DETACH DATABASE shard")
            for folder in ("images", "references"):
                source = shard / folder
                if source.is_dir():
                    (out / folder).mkdir(exist_ok=True)
                    for item in source.iterdir():
                        target = out / folder / item.name
                        if not target.exists():
                            shutil.copy2(item, target)
    return counts
