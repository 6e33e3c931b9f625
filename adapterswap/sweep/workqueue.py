"""The shared work queue of a torchrun sweep: a small SQLite file, ``<out>/shards/queue.sqlite``.

Rank 0 plans (:meth:`WorkQueue.create`): the unfinished cells are cut into groups and chunks by
the :class:`~adapterswap.sweep.scheduler.ChunkScheduler` (a chunk is one forward batch, as one
process makes it) and written here, longest group first. Then every rank, rank 0 included, takes
work until none is left (:meth:`WorkQueue.claim`, one ``BEGIN IMMEDIATE`` transaction each):

1. the next chunk of a group it holds (its prompt and reference encodings are reused);
2. a new group, longest first, among those of the backbone it has loaded (affinity: a backbone
   is loaded by as few ranks as the work allows), else overall;
3. when no group is left: the last not-yet-started chunk of the rank with the most work left
   (same backbone first): work stealing at chunk granularity, the scheduler's rule.

So a rank that finishes early (a faster GPU, cheaper groups, a slow start) takes what is left,
and no rank waits for another's model loading before its first group. Every claim carries the
rank and its time; a chunk is handed out once (the transaction), so a cell runs at most once.

Latency is timed once per configuration (:class:`SharedLatencyMeter`): the first rank that
needs a configuration's rows claims it here and times it; the others wait for its rows (a
configuration is timed in seconds, before any group of it runs) instead of timing it again. The
rows travel through this file, which also records who timed them (rank, host, device).

Why a file and not rank 0 as a coordinator over point-to-point messages: the control path then
needs no collective at all (with NCCL, object messages need GPU tensors and a serving thread on
rank 0 beside its own work, and a dead peer hangs them); every rank is equal, rank 0 included;
and the claims stay on disk, so one can see afterwards who ran what. The queue holds no results:
cells still go to each rank's shard store and rank 0 merges them (the one writer of the merged
store). It needs the output folder on a filesystem every rank shares, which the merge needs
anyway; it uses SQLite's rollback journal (WAL needs shared memory, so one host) and a few
short transactions per chunk, which network filesystems with working locks handle. A killed
rank loses only its running chunk: torchrun stops the job, and the re-run's rank 0 builds a new
queue from the cells stored in the merged store and every shard.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterswap.sweep.latency import LatencyMeter, TimingContext, latency_key
from adapterswap.sweep.scheduler import Chunk
from adapterswap.sweep.spec import Cell

__all__ = ["Claim", "SharedLatencyMeter", "WorkQueue", "queue_path", "timing_config"]

#: Seconds a rank waits for another rank's latency rows before timing them itself (timing is
#: bounded by the timing budget; a first compile can take minutes).
LATENCY_WAIT_S = 1800.0
#: Seconds between looks at the queue while waiting for another rank's latency rows.
LATENCY_POLL_S = 0.2

SCHEMA = """
CREATE TABLE plan (token TEXT NOT NULL, world_size INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE groups (
    id INTEGER PRIMARY KEY,  -- the order new groups are handed out: longest first
    backbone TEXT NOT NULL, cost REAL NOT NULL, owner INTEGER, claimed_at REAL
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY, grp INTEGER NOT NULL REFERENCES groups(id), part INTEGER NOT NULL,
    backbone TEXT NOT NULL, cost REAL NOT NULL, keys TEXT NOT NULL,
    -- open: its group has no owner; queued: its owner's, not started; running; done
    state TEXT NOT NULL DEFAULT 'open', owner INTEGER, stolen INTEGER NOT NULL DEFAULT 0,
    claimed_at REAL, done_at REAL
);
CREATE TABLE timing (
    config TEXT PRIMARY KEY, backbone TEXT NOT NULL, rank INTEGER NOT NULL, host TEXT,
    device TEXT, state TEXT NOT NULL, claimed_at REAL NOT NULL, done_at REAL
);
CREATE TABLE latency (key TEXT PRIMARY KEY, backbone TEXT NOT NULL, config TEXT,
                      row TEXT NOT NULL);
"""


def queue_path(out: str | Path) -> Path:
    return Path(out) / "shards" / "queue.sqlite"


@dataclass(frozen=True)
class Claim:
    """A chunk a rank took: its id in the queue, backbone, cell keys, and whether it was
    stolen from another rank's group."""

    id: int
    backbone: str
    keys: list[str]
    stolen: bool = False


class WorkQueue:
    """One rank's connection to the queue file (see the module docstring).

    :param token: the plan's token (rank 0's broadcast); a queue of another plan is refused.
    """

    def __init__(self, path: str | Path, *, token: str | None = None,
                 timeout_s: float = 120.0) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None,
                                  check_same_thread=False)
        found = self.db.execute("SELECT token FROM plan").fetchone()
        if token is not None and (found is None or found[0] != token):
            self.db.close()
            raise RuntimeError(f"{self.path} holds another plan than rank 0 broadcast (a "
                               "second sweep writing to the same output folder?)")
        self.token = found[0] if found else None

    @classmethod
    def create(cls, path: str | Path, groups: Sequence[Sequence[Chunk]], *, world_size: int,
               latency_rows: Sequence[Mapping[str, Any]] = ()) -> WorkQueue:
        """Write a new queue (replacing any earlier one, with its claims) of ``groups``, in
        the order given (longest first), with the latency rows already stored."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temp.unlink(missing_ok=True)
        token = uuid.uuid4().hex
        with sqlite3.connect(temp) as db:
            db.executescript(SCHEMA)
            db.execute("INSERT INTO plan VALUES (?, ?, ?)", (token, world_size, time.time()))
            next_chunk = 0
            for index, chunks in enumerate(groups):
                db.execute("INSERT INTO groups (id, backbone, cost) VALUES (?, ?, ?)",
                           (index, chunks[0].backbone, sum(c.cost for c in chunks)))
                for part, chunk in enumerate(chunks):
                    db.execute("INSERT INTO chunks (id, grp, part, backbone, cost, keys) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               (next_chunk, index, part, chunk.backbone, chunk.cost,
                                json.dumps(chunk.keys)))
                    next_chunk += 1
            db.executemany("INSERT OR IGNORE INTO latency VALUES (?, ?, NULL, ?)",
                           [(r["key"], r["backbone"], json.dumps(dict(r), default=str))
                            for r in latency_rows])
        db.close()
        # a hot journal left by a rank killed mid-claim would be applied to the new file
        for leftover in ("-journal", "-wal", "-shm"):
            path.with_name(path.name + leftover).unlink(missing_ok=True)
        os.replace(temp, path)
        return cls(path, token=token)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, taken before reading (``BEGIN IMMEDIATE``), so that
        two ranks never read the same state and claim the same thing."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ work
    def claim(self, rank: int, loaded: str | None = None) -> Claim | None:
        """The next chunk for ``rank`` (which has backbone ``loaded``), or ``None`` when no
        chunk is left to start."""
        now = time.time()
        with self._write() as db:
            stolen = False
            row = db.execute("SELECT id FROM chunks WHERE owner = ? AND state = 'queued' "
                             "ORDER BY grp, part LIMIT 1", (rank,)).fetchone()
            if row is None:
                group = db.execute("SELECT id FROM groups WHERE owner IS NULL "
                                   "ORDER BY backbone IS ? DESC, id LIMIT 1",
                                   (loaded,)).fetchone()
                if group is not None:
                    db.execute("UPDATE groups SET owner = ?, claimed_at = ? WHERE id = ?",
                               (rank, now, group[0]))
                    db.execute("UPDATE chunks SET state = 'queued', owner = ? WHERE grp = ?",
                               (rank, group[0]))
                    row = db.execute("SELECT id FROM chunks WHERE grp = ? ORDER BY part "
                                     "LIMIT 1", (group[0],)).fetchone()
            if row is None:
                row = self._victim_chunk(db, rank, loaded)
                stolen = row is not None
            if row is None:
                return None
            db.execute("UPDATE chunks SET state = 'running', owner = ?, stolen = ?, "
                       "claimed_at = ? WHERE id = ?", (rank, int(stolen), now, row[0]))
            backbone, keys = db.execute("SELECT backbone, keys FROM chunks WHERE id = ?",
                                        (row[0],)).fetchone()
        return Claim(row[0], backbone, json.loads(keys), stolen)

    @staticmethod
    def _victim_chunk(db: sqlite3.Connection, rank: int,
                      loaded: str | None) -> tuple[int] | None:
        """The last not-yet-started chunk of the rank with the most queued work (the last
        chunk on the backbone ``loaded`` first), as the scheduler steals."""
        victims = db.execute("SELECT owner, sum(cost) FROM chunks WHERE state = 'queued' "
                             "AND owner != ? GROUP BY owner", (rank,)).fetchall()
        best = None
        for owner, cost in victims:
            last = db.execute("SELECT id, backbone FROM chunks WHERE state = 'queued' AND "
                              "owner = ? ORDER BY grp DESC, part DESC LIMIT 1",
                              (owner,)).fetchone()
            score = (last[1] == loaded, cost, -owner)
            if best is None or score > best[0]:
                best = (score, last[0])
        return None if best is None else (best[1],)

    def finish(self, claim: Claim, rank: int) -> None:
        """``rank`` stored every cell of ``claim`` it could (into its shard)."""
        with self._write() as db:
            db.execute("UPDATE chunks SET state = 'done', done_at = ? WHERE id = ? AND "
                       "owner = ?", (time.time(), claim.id, rank))

    def keys(self) -> list[str]:
        """Every cell key of the plan (the cells that were unfinished when rank 0 planned)."""
        return [key for (keys,) in self.db.execute("SELECT keys FROM chunks ORDER BY id")
                for key in json.loads(keys)]

    def counts(self) -> dict[int, dict[str, int]]:
        """Per rank: groups claimed, chunks run (done or running) and chunks stolen."""
        out: dict[int, dict[str, int]] = {}
        for owner, groups in self.db.execute("SELECT owner, count(*) FROM groups WHERE owner "
                                             "IS NOT NULL GROUP BY owner"):
            out.setdefault(owner, {"groups": 0, "chunks": 0, "stolen": 0})["groups"] = groups
        for owner, chunks, stolen in self.db.execute(
                "SELECT owner, count(*), sum(stolen) FROM chunks WHERE state IN ('running', "
                "'done') GROUP BY owner"):
            counts = out.setdefault(owner, {"groups": 0, "chunks": 0, "stolen": 0})
            counts.update(chunks=chunks, stolen=stolen)
        return out

    # ------------------------------------------------------------------ latency
    def claim_timing(self, config: str, backbone: str, rank: int, *, host: str,
                     device: str) -> tuple[str, int]:
        """Ask to time ``config``: ``("mine", rank)`` when this rank times it (now or before),
        ``("done", timer)`` when its rows are here, ``("busy", timer)`` while another rank
        times it."""
        with self._write() as db:
            row = db.execute("SELECT rank, state FROM timing WHERE config = ?",
                             (config,)).fetchone()
            if row is None:
                db.execute("INSERT INTO timing (config, backbone, rank, host, device, state, "
                           "claimed_at) VALUES (?, ?, ?, ?, ?, 'timing', ?)",
                           (config, backbone, rank, host, device, time.time()))
                return "mine", rank
        timer, state = row
        if state == "done":
            return "done", timer
        return ("mine" if timer == rank else "busy"), timer

    def publish_timing(self, config: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """The rows of ``config``, timed: the waiting ranks take them."""
        with self._write() as db:
            db.executemany("INSERT OR REPLACE INTO latency VALUES (?, ?, ?, ?)",
                           [(r["key"], r["backbone"], config, json.dumps(dict(r), default=str))
                            for r in rows])
            db.execute("UPDATE timing SET state = 'done', done_at = ? WHERE config = ?",
                       (time.time(), config))

    def latency_rows(self, backbone: str) -> list[dict[str, Any]]:
        return [json.loads(row) for (row,) in self.db.execute(
            "SELECT row FROM latency WHERE backbone = ?", (backbone,))]

    def timers(self) -> dict[str, dict[str, Any]]:
        """Who timed each latency row of this plan: ``{row key: {rank, host, device}}``."""
        return {key: {"rank": rank, "host": host, "device": device}
                for key, rank, host, device in self.db.execute(
                    "SELECT l.key, t.rank, t.host, t.device FROM latency l "
                    "JOIN timing t ON l.config = t.config WHERE t.state = 'done'")}


def timing_config(cell: Cell, context: TimingContext) -> str:
    """The configuration a rank claims to time: a setting's latency key without the steps
    (one claim covers every step count of the setting, as one process times them)."""
    key = latency_key(cell, 0, context)
    del key["steps"]
    return json.dumps(key, sort_keys=True)


class SharedLatencyMeter(LatencyMeter):
    """A rank's :class:`~adapterswap.sweep.latency.LatencyMeter`: a configuration another rank
    times (or timed) is not timed again; its rows come through the queue."""

    def __init__(self, store: Any, queue: WorkQueue, rank: int, *, host: str, repeats: int,
                 budget_s: float, log: Callable[[str], None] | None = None,
                 wait_s: float = LATENCY_WAIT_S) -> None:
        super().__init__(store, repeats=repeats, budget_s=budget_s, log=log)
        self.queue = queue
        self.rank = rank
        self.host = host
        self.wait_s = wait_s

    def measure(self, backbone: Any, adapter: Any, cells: Sequence[Cell],
                context: TimingContext, conditioning: Callable[[], Any], *,
                accelerator: Any = None) -> None:
        if not self.missing(cells, context):
            return
        first = cells[0]
        config = timing_config(first, context)
        waited = 0.0
        while True:
            self.store.add_latency(self.queue.latency_rows(first.backbone))
            if not self.missing(cells, context):
                return
            state, timer = self.queue.claim_timing(config, first.backbone, self.rank,
                                                   host=self.host, device=context.device)
            if state == "mine":
                break
            if state == "done" or waited >= self.wait_s:  # rows missing, or a timer stuck
                if self.log is not None:
                    self.log(f"latency: rank {timer}'s rows for {first.backbone} "
                             f"{'lack some step counts' if state == 'done' else 'are late'}; "
                             "timing them here too")
                super().measure(backbone, adapter, cells, context, conditioning,
                                accelerator=accelerator)
                return
            time.sleep(LATENCY_POLL_S)
            waited += LATENCY_POLL_S
        steps = self.missing(cells, context)
        super().measure(backbone, adapter, cells, context, conditioning,
                        accelerator=accelerator)
        rows = [self.store.latency(latency_key(first, n, context)) for n in steps]
        self.queue.publish_timing(config, [row for row in rows if row is not None])
