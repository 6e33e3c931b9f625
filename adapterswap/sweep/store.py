"""The run store: ``<out>/results.sqlite``, one transaction per finished cell.

A cell's image is written (to a temporary name, then renamed) before the transaction that
records it commits, so a crash or ``kill -9`` at any moment loses at most the cell in flight;
re-running the same sweep skips every committed key. SQLite runs in WAL mode, and a lock file
stops a second sweep from writing the same store at the same time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapterswap.errors import StoreWriteError, UsageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    backbone TEXT NOT NULL, adapter TEXT NOT NULL, scale REAL, start REAL, "end" REAL,
    reference TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    steps INTEGER NOT NULL, height INTEGER NOT NULL, width INTEGER NOT NULL,
    guidance_scale REAL, status TEXT NOT NULL, error TEXT, image TEXT,
    timings TEXT, config TEXT NOT NULL, finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS scores (
    cell TEXT NOT NULL REFERENCES cells(key), metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (cell, metric)
);
CREATE TABLE IF NOT EXISTS metric_status (
    metric TEXT PRIMARY KEY, available INTEGER NOT NULL, reason TEXT
);
CREATE TABLE IF NOT EXISTS latency (
    backbone TEXT NOT NULL, adapter TEXT NOT NULL, steps INTEGER NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL, total_s REAL NOT NULL,
    denoise_s REAL NOT NULL, repeats INTEGER NOT NULL, device TEXT,
    start REAL NOT NULL DEFAULT 0, "end" REAL NOT NULL DEFAULT 1,
    PRIMARY KEY (backbone, adapter, steps, height, width, start, "end")
);
CREATE TABLE IF NOT EXISTS probes (
    cell TEXT NOT NULL REFERENCES cells(key), step INTEGER NOT NULL, block TEXT NOT NULL,
    quantity TEXT NOT NULL, value REAL, PRIMARY KEY (cell, step, block, quantity)
);
CREATE TABLE IF NOT EXISTS trajectory (
    cell TEXT NOT NULL REFERENCES cells(key), step INTEGER NOT NULL, metric TEXT NOT NULL,
    value REAL, PRIMARY KEY (cell, step, metric)
);
"""

CELL_COLUMNS = ("backbone", "adapter", "scale", "start", "end", "reference", "prompt", "seed",
                "steps", "height", "width", "guidance_scale")


class RunStore:
    """The SQLite store of one sweep output directory."""

    def __init__(self, out: str | Path, *, lock: bool = True) -> None:
        self.out = Path(out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "images").mkdir(exist_ok=True)
        except OSError as exc:
            raise UsageError(f"invalid --out={str(self.out)!r}: cannot create the output "
                             f"directory ({exc.strerror or exc})") from None
        self.path = self.out / "results.sqlite"
        self.mutex = threading.RLock()
        self._lock_handle: Any = None
        if lock:
            self._acquire_lock()
        try:
            # one connection shared by the engine and its finishing thread, serialised by
            # self.mutex (a transaction holds it from BEGIN to COMMIT)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            if self._lock_handle is not None:
                self._lock_handle.close()
            raise UsageError(f"invalid --out={str(self.out)!r}: cannot open the run store "
                             f"{str(self.path)!r} ({exc})") from None

    # ------------------------------------------------------------------ locking
    def _acquire_lock(self) -> None:
        import fcntl

        handle = open(self.out / ".lock", "a+")  # noqa: SIM115 - held for the store's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(
                f"another sweep ({owner}) is writing {str(self.out)!r}; wait for it to finish "
                "or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock_handle = handle

    def close(self) -> None:
        self.db.close()
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.mutex:
            yield from self._transaction()

    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._write_error(exc) from None
        try:
            yield self.db
        except sqlite3.OperationalError as exc:
            self.db.execute("ROLLBACK")
            raise self._write_error(exc) from None
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise self._write_error(exc) from None

    def _write_error(self, exc: BaseException) -> StoreWriteError:
        reason = getattr(exc, "strerror", None) or str(exc)
        return StoreWriteError(
            f"cannot write results to {str(self.out)!r}: {reason}. Cells finished before are "
            "kept; fix the problem (free space, permissions) and re-run to resume")

    # ------------------------------------------------------------------ meta
    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default: Any = None) -> Any:
        with self.mutex:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # ------------------------------------------------------------------ cells
    def finished_keys(self) -> set[str]:
        with self.mutex:
            return {r[0] for r in
                    self.db.execute("SELECT key FROM cells WHERE status = 'done'")}

    def image_path(self, key: str) -> Path:
        return self.out / "images" / f"{key}.png"

    def save_image(self, key: str, image: Any) -> str:
        """Write the image atomically (temp file + rename); return its path relative to out."""
        final = self.image_path(key)
        tmp = final.with_suffix(".tmp.png")
        try:
            image.save(tmp)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._write_error(exc) from None
        return str(final.relative_to(self.out))

    def record_cell(self, key: str, config: Mapping[str, Any], *, status: str,
                    scores: Mapping[str, float | None], image: str | None = None,
                    timings: Mapping[str, float] | None = None,
                    error: str | None = None,
                    trajectory: Mapping[int, Mapping[str, float | None]] | None = None,
                    probes: Sequence[tuple[int, str, str, float]] | None = None) -> None:
        """Commit a finished (or failed) cell, its scores and its per-step trajectory scores
        in one transaction."""
        values = [config[c] for c in CELL_COLUMNS]
        with self.transaction() as db:
            db.execute("DELETE FROM scores WHERE cell = ?", (key,))
            db.execute(
                "INSERT OR REPLACE INTO cells (key, backbone, adapter, scale, start, \"end\", "
                "reference, prompt, seed, steps, height, width, guidance_scale, status, error, "
                "image, timings, config, finished_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, *values, status, error, image, json.dumps(dict(timings or {})),
                 json.dumps(dict(config), sort_keys=True), time.time()),
            )
            db.executemany("INSERT INTO scores VALUES (?, ?, ?)",
                           [(key, m, _finite_or_none(v)) for m, v in scores.items()])
            db.execute("DELETE FROM trajectory WHERE cell = ?", (key,))
            db.executemany("INSERT INTO trajectory VALUES (?, ?, ?, ?)",
                           [(key, step, m, _finite_or_none(v))
                            for step, values in (trajectory or {}).items()
                            for m, v in values.items()])
            db.execute("DELETE FROM probes WHERE cell = ?", (key,))
            db.executemany("INSERT OR REPLACE INTO probes VALUES (?, ?, ?, ?, ?)",
                           [(key, step, block, quantity, _finite_or_none(v))
                            for step, block, quantity, v in (probes or [])])

    def set_metric_status(self, metric: str, available: bool, reason: str | None) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO metric_status VALUES (?, ?, ?)",
                       (metric, int(available), reason))

    def record_latency(self, backbone: str, adapter: str, steps: int, height: int, width: int,
                       total_s: float, denoise_s: float, repeats: int, device: str,
                       start: float = 0.0, end: float = 1.0) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO latency VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (backbone, adapter, steps, height, width, total_s, denoise_s, repeats,
                        device, start, end))

    def latency(self, backbone: str, adapter: str, steps: int, height: int, width: int,
                start: float = 0.0, end: float = 1.0) -> dict[str, float] | None:
        with self.mutex:
            row = self.db.execute(
                "SELECT total_s, denoise_s FROM latency WHERE backbone=? AND adapter=? AND "
                "steps=? AND height=? AND width=? AND start=? AND \"end\"=?",
                (backbone, adapter, steps, height, width, start, end)).fetchone()
        return None if row is None else {"total_s": row[0], "denoise_s": row[1]}

    def latency_rows(self) -> list[dict[str, Any]]:
        columns = ("backbone", "adapter", "steps", "height", "width", "total_s", "denoise_s",
                   "repeats", "device", "start", "end")
        return [dict(zip(columns, r)) for r in self.db.execute(
            "SELECT backbone, adapter, steps, height, width, total_s, denoise_s, repeats, "
            "device, start, \"end\" FROM latency")]

    def probe_rows(self) -> list[dict[str, Any]]:
        return [{"cell": c, "step": s, "block": b, "quantity": q, "value": v}
                for c, s, b, q, v in self.db.execute(
                    "SELECT cell, step, block, quantity, value FROM probes ORDER BY cell, step")]

    def trajectory_rows(self) -> list[dict[str, Any]]:
        return [{"cell": c, "step": s, "metric": m, "value": v} for c, s, m, v in
                self.db.execute("SELECT cell, step, metric, value FROM trajectory "
                                "ORDER BY cell, step")]

    # ------------------------------------------------------------------ reading
    def rows(self, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One dict per cell: its columns plus one entry per metric."""
        with self.mutex:
            self.db.row_factory = sqlite3.Row
            try:
                cells = [dict(r) for r in self.db.execute("SELECT * FROM cells ORDER BY rowid")]
                scores: dict[str, dict[str, float | None]] = {}
                for cell, metric, value in self.db.execute(
                        "SELECT cell, metric, value FROM scores"):
                    scores.setdefault(cell, {})[metric] = value
            finally:
                self.db.row_factory = None
        wanted = set(keys) if keys is not None else None
        out = []
        for cell in cells:
            if wanted is not None and cell["key"] not in wanted:
                continue
            cell["scores"] = scores.get(cell["key"], {})
            cell["timings"] = json.loads(cell["timings"] or "{}")
            out.append(cell)
        return out

    def metric_status(self) -> dict[str, tuple[bool, str | None]]:
        return {m: (bool(a), r) for m, a, r in
                self.db.execute("SELECT metric, available, reason FROM metric_status")}


def _finite_or_none(value: float | None) -> float | None:
    import math

    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
