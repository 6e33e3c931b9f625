"""Sweeps across GPUs and machines on torch.distributed (launched by ``torchrun``).

``torchrun --nproc-per-node N -m adapterswap sweep ...`` (or ``adapterswap sweep --launcher
torchrun --nproc N ...``) starts N ranks. Rank 0 plans: it reads the cells already finished in
the merged store and every shard, cuts the rest into groups and chunks (as one process batches
them) and writes them, longest group first, into a shared queue (:mod:`~adapterswap.sweep.
workqueue`, ``<out>/shards/queue.sqlite``); it records the run in the merged store and
broadcasts the queue's token and the run's id (:class:`QueuePlan`). Then every rank takes work
from the queue until none is left: the next chunk of its group, a new group (of the backbone it
has loaded first, longest first), else a chunk stolen from the rank with the most left. So a
rank that finishes early takes the remaining groups, and no rank waits for another's model
loading: each starts its first group as soon as its own backbone is loaded.

A rank keeps its backbone, adapters, encodings and metrics loaded from chunk to chunk (a
:class:`~adapterswap.sweep.worker.ChunkWorker`, the Ray backend's worker) and writes each chunk's
cells into its own store shard under ``<out>/shards/rank-NNN/``. Latency is timed once per
configuration, by the first rank that needs it; the others take its rows from the queue
(:class:`~adapterswap.sweep.workqueue.SharedLatencyMeter`), and the merged store's meta
``latency_timed_by`` names the rank, host and device that timed each row. After the last chunk,
rank 0 merges the shards into ``<out>/results.sqlite`` (every cell exactly once) and writes the
report. A rank that dies loses only its running chunk; re-running the same command finishes the
rest. The backend is NCCL on CUDA and gloo on CPU; the few control messages (the plan, the
summaries, the end) always go over gloo, and work is never handed out by a collective.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterswap.sweep.spec import Cell
from adapterswap.sweep.store import RunStore
from adapterswap.sweep.workqueue import WorkQueue, queue_path

__all__ = ["DistEnv", "QueuePlan", "barrier", "broadcast_plan", "destroy",
           "dist_env", "finished_everywhere", "init_process_group", "merge", "plan_queue",
           "run_distributed", "shard_dir", "stored_latency_rows"]


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


_control: Any = None  # the gloo group of control messages (``None``: the default group)


def init_process_group(env: DistEnv, timeout_s: float = 7200.0) -> str:
    """Join the torchrun job: NCCL on CUDA, gloo otherwise (control messages on gloo
    always); return the backend."""
    import torch
    import torch.distributed as dist

    global _control
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, timeout=timeout)
        _control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" \
            else None
    return backend


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=_control)


def destroy() -> None:
    import torch.distributed as dist

    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None


@dataclass
class QueuePlan:
    """Rank 0's plan, broadcast to every rank: the token of the queue it wrote, the ``runs``
    row it recorded in the merged store (every shard's cells point at it), and the counts."""

    token: str
    run_id: int | None
    total: int
    skipped: int
    planned_by: int = 0


def plan_queue(engine: Any, keyed: Sequence[tuple[Cell, str]], versions: dict[str, str],
               world_size: int) -> QueuePlan:
    """Rank 0's plan: the unfinished cells of ``keyed`` (not finished in the merged store
    nor in any shard) into a new queue, and the run recorded in the merged store."""
    from adapterswap.sweep.scheduler import ChunkScheduler

    spec = engine.spec
    scheduler = ChunkScheduler(keyed, finished_everywhere(spec.out), max_batch=spec.max_batch,
                               step_parallel=spec.use_step_parallel(compiled=bool(spec.compile)))
    queue = WorkQueue.create(queue_path(spec.out), scheduler.groups(), world_size=world_size,
                             latency_rows=stored_latency_rows(spec.out))
    queue.close()
    with RunStore(spec.out) as merged:
        run_id = engine.record_run(keyed, versions, store=merged)
    return QueuePlan(queue.token or "", run_id, scheduler.total, scheduler.skipped)


def broadcast_plan(plan: QueuePlan | None, rank: int) -> QueuePlan:
    """Rank 0 sends its plan (``plan``); every other rank passes ``None`` and gets it. No rank
    opens the queue before rank 0 has written it."""
    import torch.distributed as dist

    if rank == 0 and plan is None:
        raise ValueError("rank 0 must pass its plan")
    box: list[Any] = [plan if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def run_distributed(spec: Any, *, echo: Callable[[str], None] = print) -> tuple[Any, Any]:
    """One rank of a torchrun job: join it, receive rank 0's plan, take work from the queue
    into this rank's shard; rank 0 then merges the shards and writes the report. Returns
    (summary of the whole job, report path on rank 0 else ``None``). ``echo`` prints a line
    (to stderr)."""
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
            versions = engine.versions()
            keyed = engine.keyed_cells(versions)
            plan = plan_queue(engine, keyed, versions, env.world_size) if env.rank == 0 \
                else None
            plan = broadcast_plan(plan, env.rank)
            store.run_id = plan.run_id
            summary = run_rank(engine, keyed, plan, env, echo)
        summaries: list[Any] = [None] * env.world_size
        dist.all_gather_object(summaries, summary, group=_control)
        report = None
        total = SweepSummary(total=plan.total, skipped=plan.skipped)
        total.add([vars(part) for part in summaries])  # times: the slowest rank's
        if env.rank == 0:
            merge(spec.out)
            with RunStore(spec.out) as merged:
                _record_timers(merged, spec.out)
                status = {m: (False, r) for m, r in total.unavailable_metrics.items()}
                if plan.run_id is not None:
                    merged.update_run(plan.run_id, metrics=engine.metric_records(status))
                    merged.end_run(plan.run_id, "done" if not total.failed
                                   else "done-with-failures", summary=total.record())
            report = build_report(spec.out)
        barrier()
        return total, report
    finally:
        destroy()


def run_rank(engine: Any, keyed: Sequence[tuple[Cell, str]], plan: QueuePlan, env: DistEnv,
             echo: Callable[[str], None]) -> Any:
    """Take chunks from the queue until none is left, storing each into this rank's shard
    (``engine.store``); returns this rank's summary."""
    from adapterswap.sweep.engine import SweepSummary
    from adapterswap.sweep.worker import replay_journal

    started = time.perf_counter()
    spec, store = engine.spec, engine.store
    cells = {key: cell for cell, key in keyed}
    queue = WorkQueue(queue_path(spec.out), token=plan.token)
    planned = queue.keys()
    unknown = [key for key in planned if key not in cells]
    if unknown:
        echo(f"rank {env.rank}: {len(unknown)} cells of rank 0's plan are not in this rank's "
             "spec (different software versions?); they are not run")
    setting_cells: dict[tuple[Any, ...], list[Cell]] = {}
    for key in planned:
        if key in cells:
            setting_cells.setdefault((cells[key].backbone, cells[key].setting()),
                                     []).append(cells[key])
    summary = SweepSummary(total=plan.total, skipped=plan.skipped)
    meta = {key: store.meta(key) for key in ("image_formats",) if store.meta(key)}
    worker = _rank_worker(spec, queue, env, meta)
    worker.prepare(setting_cells)
    loaded, claims, stolen = None, 0, 0
    try:
        while (claim := queue.claim(env.rank, loaded)) is not None:
            items = [(cells[key], key) for key in claim.keys if key in cells]
            if items:
                replay_journal(store, worker.run_chunk(items).journal, summary)
            queue.finish(claim, env.rank)
            loaded, claims, stolen = claim.backbone, claims + 1, stolen + claim.stolen
        result = worker.close()
        replay_journal(store, result.journal, summary)
    finally:
        queue.close()
    if env.rank == 0:  # the references beside the merged store (the report shows them)
        seen: set[tuple[str, str]] = set()
        for cell, _ in keyed:
            if cell.reference and (cell.reference, cell.adapter) not in seen:
                seen.add((cell.reference, cell.adapter))
                engine.reference_for(cell)
    summary.add([result.stats])
    summary.unavailable_metrics = {m: r for m, (ok, r) in worker.store.metric_status().items()
                                   if not ok and m in spec.metrics}
    summary.seconds = time.perf_counter() - started
    echo(f"rank {env.rank}/{env.world_size}: {summary.done} cells done, {summary.failed} "
         f"failed ({claims} chunks, {stolen} taken from another rank's group)")
    return summary


def _rank_worker(spec: Any, queue: WorkQueue, env: DistEnv, meta: Mapping[str, Any]) -> Any:
    """A :class:`~adapterswap.sweep.worker.ChunkWorker` on this rank's device whose latency
    meter shares timing through the queue."""
    from adapterswap.sweep.worker import ChunkWorker
    from adapterswap.sweep.workqueue import SharedLatencyMeter

    class RankWorker(ChunkWorker):
        def _start(self) -> None:
            fresh = self._metrics is None
            super()._start()
            if fresh:
                self.meter = SharedLatencyMeter(
                    self.store, queue, env.rank, host=platform.node(),
                    repeats=self.meter.repeats, budget_s=self.meter.budget_s, log=self.log)

    return RankWorker(spec, meta=meta, workers=env.world_size, quiet=False,
                      name=f"rank {env.rank}", device=spec.device)


def _record_timers(merged: RunStore, out: str | Path) -> None:
    """Add who timed each latency row of this run (from the queue) to the merged store's meta
    ``latency_timed_by``: ``{row key: {rank, host, device}}``."""
    path = queue_path(out)
    if not path.is_file():
        return
    queue = WorkQueue(path)
    try:
        timers = queue.timers()
    finally:
        queue.close()
    if timers:
        merged.set_meta("latency_timed_by", {**merged.meta("latency_timed_by", {}), **timers})


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


def stored_latency_rows(out: str | Path) -> list[dict[str, Any]]:
    """The latency rows of the merged store and every shard (read-only), each once: what
    earlier runs timed is not timed again."""
    from adapterswap.sweep.latency_table import LATENCY_COLUMNS

    out = Path(out)
    rows: dict[str, dict[str, Any]] = {}
    names = ("key", *LATENCY_COLUMNS)
    columns = ", ".join(f'"{c}"' for c in names)
    for path in [out / "results.sqlite", *sorted((out / "shards").glob("rank-*/results.sqlite"))]:
        if not path.is_file():
            continue
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
            try:
                found = db.execute(f"SELECT {columns} FROM latency").fetchall()
            except sqlite3.OperationalError:
                continue
        for values in found:
            row = dict(zip(names, values))
            for name in ("samples_s", "fit"):
                row[name] = json.loads(row[name]) if row[name] else None
            rows.setdefault(row["key"], row)
    return list(rows.values())


TABLES = ("cells", "scores", "trajectory", "probes", "latency", "metric_status")


def _common_columns(db: sqlite3.Connection, table: str) -> str:
    """The columns ``table`` has in both the merged store and the attached shard (a shard
    written by an older version may lack newer ones), quoted, comma-separated."""
    main = [r[1] for r in db.execute(f"PRAGMA main.table_info({table})")]
    shard = {r[1] for r in db.execute(f"PRAGMA shard.table_info({table})")}
    return ", ".join(f'"{c}"' for c in main if c in shard)


def _join_meta(db: sqlite3.Connection) -> None:
    """Meta that every shard adds to rather than the first one sets: the metrics' notes (a
    list) and the image formats written (a mapping)."""
    for key in ("metric_notes", "image_formats"):
        found = db.execute("SELECT value FROM shard.meta WHERE key = ?", (key,)).fetchone()
        have = db.execute("SELECT value FROM main.meta WHERE key = ?", (key,)).fetchone()
        if found is None or have is None or found[0] == have[0]:
            continue
        theirs, ours = json.loads(found[0]), json.loads(have[0])
        joined = {**theirs, **ours} if isinstance(ours, dict) else \
            sorted(set(ours) | set(theirs))
        db.execute("UPDATE main.meta SET value = ? WHERE key = ?", (json.dumps(joined), key))


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
                    _join_meta(db)
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
