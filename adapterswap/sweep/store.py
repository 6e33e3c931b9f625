"""The run store: ``<out>/results.sqlite``, one transaction per finished cell.

A cell's image is written (to a temporary name, then renamed) before the transaction that
records it commits, so a crash or ``kill -9`` at any moment loses at most the cell in flight;
re-running the same sweep skips every committed key. SQLite runs in WAL mode, and a lock file
stops a second sweep from writing the same store at the same time.

Provenance: every invocation adds a row to ``runs`` (the resolved spec, package versions, the
hash of the code, the identity of every model's weights, the references' content hashes, device,
dtype, and each metric's direction and kind); every cell row points at the run that produced
it. Readers show the cells of the newest run's spec (:meth:`RunStore.current_keys`) unless
asked for every run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from adapterswap.errors import StoreWriteError, UsageError
from adapterswap.sweep.images_io import save_image_files
from adapterswap.sweep.latency_table import (  # noqa: F401 - LATENCY_KEY is re-exported
    LATENCY_COLUMNS,
    LATENCY_KEY,
    LATENCY_SCHEMA,
    finite_or_none,
    latency_key,
    legacy_latency,
    migrate_latency,
)

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
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, started_at REAL NOT NULL, finished_at REAL,
    status TEXT NOT NULL, spec TEXT NOT NULL, versions TEXT NOT NULL, code_hash TEXT NOT NULL,
    weights TEXT NOT NULL, reference_hashes TEXT NOT NULL, device TEXT NOT NULL,
    dtype TEXT NOT NULL, metrics TEXT NOT NULL, adapters TEXT NOT NULL,
    cell_keys TEXT NOT NULL, argv TEXT, host TEXT, invocation TEXT, summary TEXT
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

#: Runs begun inside :func:`one_invocation` share an invocation id: readers show them as one
#: (probe-guided exit runs its sweep in two passes).
_INVOCATION: ContextVar[str | None] = ContextVar("adapterswap_invocation", default=None)


@contextmanager
def one_invocation() -> Iterator[str]:
    """Runs begun inside this block are one invocation for readers (:meth:`current_keys`)."""
    current = _INVOCATION.get()
    if current is not None:
        yield current
        return
    token = _INVOCATION.set(uuid.uuid4().hex)
    try:
        yield _INVOCATION.get()  # type: ignore[misc]
    finally:
        _INVOCATION.reset(token)


#: Columns added to ``cells`` since the first schema (old stores gain them on open).
CELL_EXTRA_COLUMNS = {"run_id": "INTEGER", "timesteps": "TEXT", "sigmas": "TEXT",
                      "start_noise": "REAL", "adapter_active_steps": "INTEGER",
                      "confounds": "TEXT", "enhancer": "TEXT", "forwards": "INTEGER"}
#: ``extra`` values stored as JSON text.
_JSON_EXTRA = ("timesteps", "sigmas", "confounds")

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
        #: the ``runs`` row cells are recorded under (:meth:`begin_run`)
        self.run_id: int | None = None
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
            self._migrate()
        except sqlite3.DatabaseError as exc:
            if self._lock_handle is not None:
                self._lock_handle.close()
            raise UsageError(f"invalid --out={str(self.out)!r}: cannot open the run store "
                             f"{str(self.path)!r} ({exc})") from None

    def _migrate(self) -> None:
        """Bring a store written by an older version up to this schema (columns are only ever
        added; an old latency table, keyed on less than today's, is kept aside unread)."""
        have = {r[1] for r in self.db.execute("PRAGMA table_info(cells)")}
        for column, kind in CELL_EXTRA_COLUMNS.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE cells ADD COLUMN {column} {kind}")
        runs = {r[1] for r in self.db.execute("PRAGMA table_info(runs)")}
        for column in ("invocation", "summary"):
            if column not in runs:
                self.db.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
        migrate_latency(self.db)

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
        if self.db.in_transaction:  # never BEGIN inside a transaction left open
            self._rollback()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._write_error(exc) from None
        try:
            yield self.db
        except sqlite3.OperationalError as exc:
            self._rollback()
            raise self._write_error(exc) from None
        except BaseException:
            self._rollback()
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            # a failed COMMIT (disk full, I/O error) leaves the transaction open: roll it back
            # so the store stays usable and the next BEGIN does not hide this error
            self._rollback()
            raise self._write_error(exc) from None

    def _rollback(self) -> None:
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.DatabaseError:
            pass  # nothing open (SQLite may already have rolled back on the error)

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

    def image_path(self, key: str, suffix: str = ".png") -> Path:
        return self.out / "images" / f"{key}{suffix}"

    def save_image(self, key: str, image: Any) -> str:
        """Write a cell's image atomically (temp file + rename): a PIL image as PNG, or an
        :class:`~adapterswap.sweep.images_io.EncodedImage` (any format, with its grid
        thumbnail); return its path relative to out (readers open that path)."""
        try:
            return save_image_files(self.out, key, image)
        except OSError as exc:
            raise self._write_error(exc) from None

    def record_cell(self, key: str, config: Mapping[str, Any], *, status: str,
                    scores: Mapping[str, float | None], image: str | None = None,
                    timings: Mapping[str, float] | None = None,
                    error: str | None = None,
                    trajectory: Mapping[int, Mapping[str, float | None]] | None = None,
                    probes: Sequence[tuple[int, str, str, float]] | None = None,
                    extra: Mapping[str, Any] | None = None) -> None:
        """Commit a finished (or failed) cell, its scores and its per-step trajectory scores
        in one transaction.

        :param extra: more columns of the cell (:data:`CELL_EXTRA_COLUMNS`): ``run_id``,
            ``timesteps``/``sigmas`` (lists), ``start_noise``, ``adapter_active_steps``,
            ``confounds`` (list of flags). Unknown names are refused.
        """
        values = [config[c] for c in CELL_COLUMNS]
        extra = dict(extra or {})
        if self.run_id is not None:
            extra.setdefault("run_id", self.run_id)
        unknown = set(extra) - set(CELL_EXTRA_COLUMNS)
        if unknown:
            raise ValueError(f"unknown cell columns: {', '.join(sorted(unknown))}")
        names = list(extra)
        stored = [json.dumps(extra[n]) if n in _JSON_EXTRA and extra[n] is not None
                  else extra[n] for n in names]
        columns = ", ".join(("key", *(f'"{c}"' for c in CELL_COLUMNS), "status", "error",
                             "image", "timings", "config", "finished_at", *names))
        marks = ", ".join("?" * (len(CELL_COLUMNS) + 7 + len(names)))
        with self.transaction() as db:
            db.execute("DELETE FROM scores WHERE cell = ?", (key,))
            db.execute(
                f"INSERT OR REPLACE INTO cells ({columns}) VALUES ({marks})",
                (key, *values, status, error, image, json.dumps(dict(timings or {})),
                 json.dumps(dict(config), sort_keys=True), time.time(), *stored),
            )
            db.executemany("INSERT INTO scores VALUES (?, ?, ?)",
                           [(key, m, finite_or_none(v)) for m, v in scores.items()])
            db.execute("DELETE FROM trajectory WHERE cell = ?", (key,))
            db.executemany("INSERT INTO trajectory VALUES (?, ?, ?, ?)",
                           [(key, step, m, finite_or_none(v))
                            for step, values in (trajectory or {}).items()
                            for m, v in values.items()])
            db.execute("DELETE FROM probes WHERE cell = ?", (key,))
            db.executemany("INSERT OR REPLACE INTO probes VALUES (?, ?, ?, ?, ?)",
                           [(key, step, block, quantity, finite_or_none(v))
                            for step, block, quantity, v in (probes or [])])

    def set_metric_status(self, metric: str, available: bool, reason: str | None) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO metric_status VALUES (?, ?, ?)",
                       (metric, int(available), reason))

    def record_latency(self, row: Mapping[str, Any] | str, *legacy: Any,
                       **legacy_kw: Any) -> None:
        """Store one timed configuration (see :data:`LATENCY_COLUMNS`): ``total_s`` is the
        median of ``samples_s`` with its quartiles, or a fitted prediction (``method``
        ``"fitted"``, ``fit`` with the model and its residuals)."""
        if not isinstance(row, Mapping):  # the first signature, positional
            row = legacy_latency(row, *legacy, **legacy_kw)
        record = {c: row.get(c) for c in LATENCY_COLUMNS}
        record["batch"] = record["batch"] or 1
        for name in ("dtype", "fast_path", "cache"):
            record[name] = record[name] or ""
        record["method"] = record["method"] or "measured"
        record["repeats"] = int(record["repeats"] or 0)
        record["run_id"] = record["run_id"] if record["run_id"] is not None else self.run_id
        record["measured_at"] = record["measured_at"] or time.time()
        for name in ("samples_s", "fit"):
            if record[name] is not None:
                record[name] = json.dumps(record[name])
        names = ", ".join(f'"{n}"' for n in ("key", *LATENCY_COLUMNS))
        marks = ", ".join("?" * (len(LATENCY_COLUMNS) + 1))
        with self.transaction() as db:
            db.execute(f"INSERT OR REPLACE INTO latency ({names}) VALUES ({marks})",
                       (latency_key(record), *(record[c] for c in LATENCY_COLUMNS)))

    def latency(self, key: Mapping[str, Any] | str, *legacy: Any,
                **legacy_kw: Any) -> dict[str, Any] | None:
        """The stored row of a configuration (:data:`LATENCY_KEY` fields), or ``None``."""
        if not isinstance(key, Mapping):  # the first signature: (backbone, adapter, steps,
            # height, width, start, end)
            names = ("adapter", "steps", "height", "width", "start", "end")
            key = legacy_latency(key, **dict(zip(names, legacy)), **legacy_kw)
        rows = self._latency_select("WHERE key = ?", (latency_key(key),))
        return rows[0] if rows else None

    def latency_rows(self, cells: Sequence[Mapping[str, Any]] | None = None
                     ) -> list[dict[str, Any]]:
        """Every latency row, or those the given cell rows used (their ``timings`` name the
        row's key; cells written before keys were recorded keep every row)."""
        rows = self._latency_select("ORDER BY backbone, adapter, steps", ())
        if cells is None:
            return rows
        used = {(c.get("timings") or {}).get("latency_key") for c in cells} - {None}
        return [r for r in rows if r["key"] in used] if used else rows

    def _latency_select(self, where: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        names = ("key", *LATENCY_COLUMNS)
        columns = ", ".join(f'"{c}"' for c in names)
        with self.mutex:
            found = self.db.execute(f"SELECT {columns} FROM latency {where}", args).fetchall()
        out = []
        for values in found:
            row = dict(zip(names, values))
            for name in ("samples_s", "fit"):
                row[name] = json.loads(row[name]) if row[name] else None
            out.append(row)
        return out

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
            for name in _JSON_EXTRA:
                cell[name] = json.loads(cell[name]) if cell.get(name) else None
            cell["confounds"] = cell["confounds"] or []
            out.append(cell)
        return out

    # ------------------------------------------------------------------ runs (provenance)
    def begin_run(self, *, spec: Mapping[str, Any], versions: Mapping[str, str],
                  code_hash: str, weights: Mapping[str, Any],
                  reference_hashes: Mapping[str, str], device: str, dtype: str,
                  metrics: Mapping[str, Mapping[str, Any]], adapters: Mapping[str, Any],
                  cell_keys: Sequence[str], argv: Sequence[str] | None = None) -> int:
        """Add this invocation's ``runs`` row; cells recorded from now on point at it."""
        import platform
        import sys

        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (started_at, status, spec, versions, code_hash, weights, "
                "reference_hashes, device, dtype, metrics, adapters, cell_keys, argv, host, "
                "invocation) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), json.dumps(dict(spec), sort_keys=True, default=str),
                 json.dumps(dict(versions), sort_keys=True), code_hash,
                 json.dumps(dict(weights), sort_keys=True),
                 json.dumps(dict(reference_hashes), sort_keys=True), device, dtype,
                 json.dumps({k: dict(v) for k, v in metrics.items()}, sort_keys=True),
                 json.dumps(dict(adapters), sort_keys=True), json.dumps(list(cell_keys)),
                 json.dumps(list(argv if argv is not None else sys.argv)), platform.node(),
                 _INVOCATION.get() or uuid.uuid4().hex))
            self.run_id = int(cursor.lastrowid)
        return self.run_id

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Update a run's ``metrics`` (after loading them) or ``weights``."""
        allowed = {"metrics", "weights", "adapters"}
        for name, value in fields.items():
            if name not in allowed:
                raise ValueError(f"cannot update run field {name!r}")
            with self.transaction() as db:
                db.execute(f"UPDATE runs SET {name} = ? WHERE id = ?",
                           (json.dumps(value, sort_keys=True), run_id))

    def end_run(self, run_id: int, status: str,
                summary: Mapping[str, Any] | None = None) -> None:
        """Mark a run ``done``, ``failed`` or ``interrupted``; ``summary``: what it did and
        where its time went (:class:`~adapterswap.sweep.engine.SweepSummary` as a dict)."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET status = ?, finished_at = ?, summary = ? WHERE id = ?",
                       (status, time.time(),
                        json.dumps(summary, sort_keys=True, default=str)
                        if summary is not None else None, run_id))

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, with its JSON fields decoded."""
        columns = ("id", "started_at", "finished_at", "status", "spec", "versions", "code_hash",
                   "weights", "reference_hashes", "device", "dtype", "metrics", "adapters",
                   "cell_keys", "argv", "host", "invocation", "summary")
        with self.mutex:
            found = self.db.execute(f"SELECT {', '.join(columns)} FROM runs ORDER BY id")\
                .fetchall()
        out = []
        for values in found:
            run = dict(zip(columns, values))
            for name in ("spec", "versions", "weights", "reference_hashes", "metrics",
                         "adapters", "cell_keys", "argv", "summary"):
                run[name] = json.loads(run[name]) if run[name] else None
            out.append(run)
        return out

    def latest_run(self) -> dict[str, Any] | None:
        runs = self.runs()
        return runs[-1] if runs else None

    def current_runs(self) -> list[dict[str, Any]]:
        """The runs of the newest invocation (one, or the passes of a probe-guided exit)."""
        runs = self.runs()
        if not runs:
            return []
        newest = runs[-1]["invocation"]
        return [r for r in runs if r["invocation"] == newest] if newest else runs[-1:]

    def current_keys(self) -> set[str] | None:
        """The cell keys of the newest invocation's spec: what readers show by default
        (``None`` for a store written before runs were recorded: then every cell)."""
        runs = self.current_runs()
        if not runs:
            legacy = self.meta("cell_keys")
            return set(legacy) if legacy is not None else None
        return {key for run in runs for key in run["cell_keys"] or []}

    def metric_info(self, run: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Per metric: ``higher_is_better``, ``kind``, ``worst``, ``available``, ``reason``,
        as recorded by the runs (the newest run's record wins), never guessed."""
        info: dict[str, dict[str, Any]] = {}
        for past in ([run] if run is not None else self.runs()):
            for name, record in (past.get("metrics") or {}).items():
                info[name] = dict(record)
        return info

    def adapter_kinds(self) -> dict[str, str | None]:
        """Adapter name -> kind as recorded by the runs (``none`` -> ``None``)."""
        kinds: dict[str, str | None] = {"none": None}
        for run in self.runs():
            kinds.update(run.get("adapters") or {})
        return kinds

    def metric_status(self) -> dict[str, tuple[bool, str | None]]:
        return {m: (bool(a), r) for m, a, r in
                self.db.execute("SELECT metric, available, reason FROM metric_status")}
