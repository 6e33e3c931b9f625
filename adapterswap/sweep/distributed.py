"""Sweeps across GPUs and machines on torch.distributed (launched by ``torchrun``).

``torchrun --nproc-per-node N -m adapterswap sweep ...`` (or ``adapterswap sweep --launcher
torchrun --nproc N ...``) starts N ranks. Rank 0 plans: it reads the cells already finished in
the merged store and every shard, and shares the rest out (:func:`adapterswap.sweep.plan.assign`:
whole (backbone, adapter setting, reference, prompt) groups, balanced by estimated cost, steps x
pixels, with the longest-processing-time rule, so a rank loads each backbone at most once and
reuses encodings within its groups). It broadcasts the finished set and the shares
(:class:`SharePlan`, ``broadcast_object_list``); every other rank runs what it receives, so a
rank that starts late, or sees another state of the stores, can neither overlap nor miss a
share. Each rank writes its own store shard under ``<out>/shards/rank-NNN/``; after a barrier,
rank 0 merges the shards into ``<out>/results.sqlite`` (every cell exactly once) and writes the
report. A rank that dies loses only its in-flight cells; re-running the same command finishes
the rest. The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterswap.sweep.plan import assign, cell_cost, rank_shares
from adapterswap.sweep.spec import Cell
from adapterswap.sweep.store import RunStore

__all__ = ["DistEnv", "SharePlan", "assign", "barrier", "broadcast_plan", "cell_cost", "destroy",
           "dist_env", "finished_everywhere", "init_process_group", "merge", "plan_shares",
           "run_distributed", "shard_dir"]


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


@dataclass
class SharePlan:
    """Rank 0's plan, broadcast to every rank: the keys finished anywhere when it planned and
    the keys each rank runs (``shares[rank]``)."""

    finished: list[str]
    shares: list[list[str]]
    planned_by: int = 0
    #: the ``runs`` row rank 0 recorded in the merged store; every shard's cells point at it
    run_id: int | None = None
    world_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.world_size = len(self.shares)


def plan_shares(keyed: Sequence[tuple[Cell, str]], out: str | Path,
                world_size: int) -> SharePlan:
    """Rank 0's plan: the finished set of the merged store and every shard, and the rest of
    ``keyed`` shared out over ``world_size`` ranks."""
    finished = finished_everywhere(out)
    return SharePlan(sorted(finished), rank_shares(keyed, finished, world_size))


def broadcast_plan(plan: SharePlan | None, rank: int) -> SharePlan:
    """Rank 0 sends its plan (``plan``); every other rank passes ``None`` and gets it. Also a
    barrier: no rank starts writing its shard before rank 0 has read them all."""
    import torch.distributed as dist

    if rank == 0 and plan is None:
        raise ValueError("rank 0 must pass its plan")
    box: list[Any] = [plan if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_distributed(spec: Any, *, echo: Callable[[str], None] = print) -> tuple[Any, Any]:
    """One rank of a torchrun job: join it, receive rank 0's plan, run this rank's share into
    its shard; rank 0 then merges the shards and writes the report. Returns (summary of the
    whole job, report path on rank 0 else ``None``). ``echo`` prints a line (to stderr)."""
    import torch
    import torch.distributed as dist

    from adapterswap.sweep.engine import SweepEngine, SweepSummary
    from adapterswap.sweep.report import build_report

    env = dist_env()
    if env is None:
        raise RuntimeError("not started by torchrun (RANK and WORLD_SIZE are unset)")
    init_process_group(env)
    try:
        spec.validate()
        if spec.device is None and torch.cuda.is_available():
            spec.device = f"cuda:{env.local_rank}"
        with RunStore(shard_dir(spec.out, env.rank)) as store:
            engine = SweepEngine(spec, store, log=lambda m: echo(f"rank {env.rank}: {m}"))
            keyed = engine.keyed_cells()
            plan = None
            if env.rank == 0:
                plan = plan_shares(keyed, spec.out, env.world_size)
                with RunStore(spec.out) as merged:
                    plan.run_id = engine.begin_run(keyed, engine.versions(), store=merged)
            plan = broadcast_plan(plan, env.rank)
            finished = set(plan.finished)
            mine = set(plan.shares[env.rank])
            unknown = mine - {k for _, k in keyed}
            if unknown:
                echo(f"rank {env.rank}: {len(unknown)} cells of rank 0's plan are not in this "
                     "rank's spec (different software versions?); they are not run")
            summary = engine.run(only_keys=mine, finished_elsewhere=finished,
                                 run_id=plan.run_id)
            summary.skipped = len([k for _, k in keyed if k in finished])
        echo(f"rank {env.rank}/{env.world_size}: {summary.done} cells done, "
             f"{summary.failed} failed")
        summaries: list[Any] = [None] * env.world_size
        dist.all_gather_object(summaries, summary)
        barrier()
        report = None
        total = SweepSummary(total=len(keyed), skipped=summary.skipped)
        for part in summaries:
            total.done += part.done
            total.failed += part.failed
            if part.seconds >= total.seconds:  # the slowest rank's time and its parts
                total.seconds = part.seconds
                for name in ("load_seconds", "latency_seconds", "forward_seconds",
                             "finish_seconds", "finish_overlapped"):
                    setattr(total, name, getattr(part, name))
            total.forwards += part.forwards
            total.unavailable_metrics.update(part.unavailable_metrics)
        if env.rank == 0:
            merge(spec.out)
            if plan.run_id is not None:
                with RunStore(spec.out) as merged:
                    merged.end_run(plan.run_id, "done" if not total.failed
                                   else "done-with-failures")
            report = build_report(spec.out)
        barrier()
        return total, report
    finally:
        destroy()


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


def _common_columns(db: sqlite3.Connection, table: str) -> str:
    """The columns ``table`` has in both the merged store and the attached shard (a shard
    written by an older version may lack newer ones), quoted, comma-separated."""
    main = [r[1] for r in db.execute(f"PRAGMA main.table_info({table})")]
    shard = {r[1] for r in db.execute(f"PRAGMA shard.table_info({table})")}
    return ", ".join(f'"{c}"' for c in main if c in shard)


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
                    cells = _common_columns(db, "cells")
                    for key in new:
                        for table in ("scores", "trajectory", "probes"):
                            db.execute(f"DELETE FROM main.{table} WHERE cell = ?", (key,))
                            db.execute(f"INSERT INTO main.{table} SELECT * FROM shard.{table} "
                                       "WHERE cell = ?", (key,))
                        db.execute(f"INSERT OR REPLACE INTO main.cells ({cells}) SELECT {cells} "
                                   "FROM shard.cells WHERE key = ?", (key,))
                    db.execute(f"INSERT OR IGNORE INTO main.cells ({cells}) SELECT {cells} "
                               "FROM shard.cells WHERE status != 'done'")
                    latency = _common_columns(db, "latency")
                    db.execute(f"INSERT OR IGNORE INTO main.latency ({latency}) "
                               f"SELECT {latency} FROM shard.latency")
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
            for folder in ("images", "references", "thumbnails"):
                source = shard / folder
                if source.is_dir():
                    (out / folder).mkdir(exist_ok=True)
                    for item in source.iterdir():
                        target = out / folder / item.name
                        if not target.exists():
                            shutil.copy2(item, target)
    return counts
