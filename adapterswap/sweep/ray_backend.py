"""Sweeps on a Ray cluster: ``adapterswap sweep --backend ray [--address auto] [--nproc N]``.

The driver (this process) plans once: it computes every cell's key, opens the one store
(``<out>/results.sqlite``, no shards, no merge), records the run and hands out chunks through
the :class:`~adapterswap.sweep.scheduler.ChunkScheduler` (longest group first, then work
stealing at chunk granularity). Each worker is a Ray actor, one per GPU (``num_gpus=1``; on a
cluster without GPUs, ``--nproc`` actors of one CPU each), that keeps its backbone, adapters,
encodings and metrics loaded from chunk to chunk and runs each chunk as one process does
(:class:`~adapterswap.sweep.worker.ChunkWorker`: the engine's own model factory, step
loop and cell finisher; Ray only wraps it).

Actors write nothing. What the finisher would store goes into a
:class:`~adapterswap.sweep.worker.RelayStore`; each chunk
returns its journal (cell rows, scores, encoded image bytes, metric status, latency rows) and
the driver writes it into the one store, a cell at the time its result arrives, its image
first (as one process does). Images travel as bytes rather than being written by the actors
into the output folder: that works on a cluster without a shared filesystem, and keeps one
writer, so a cell is written at most once (:meth:`ChunkScheduler.accept`).

On failure: a dead actor's in-flight chunks are handed to the others (a chunk whose second
worker dies too is stored as failed); killing the driver loses at most the chunks in flight
(``depth`` per actor) and re-running the command resumes from the store.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from adapterswap.errors import AdapterswapError, InvalidArgumentError, UsageError
from adapterswap.sweep.engine import SweepEngine, SweepSummary
from adapterswap.sweep.scheduler import Chunk, ChunkScheduler
from adapterswap.sweep.spec import Cell, SweepSpec
from adapterswap.sweep.store import RunStore
from adapterswap.sweep.worker import ChunkResult, ChunkWorker, replay_journal

__all__ = ["RAY_MISSING", "RaySweep", "direct_plugins", "require_ray", "run_ray"]

RAY_MISSING = "--backend ray needs Ray: pip install 'ray>=2.40'"
#: Variables of the driver's environment that reach the actors (plugin selection, offline).
FORWARDED_ENV = ("ADAPTERSWAP_", "HF_", "TRANSFORMERS_OFFLINE")
#: Seconds to wait for every actor to start (a cluster still adding nodes, a busy GPU).
START_TIMEOUT_S = 600.0


def require_ray() -> Any:
    """The ``ray`` module, or a one-line usage error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def direct_plugins() -> list[tuple[str, Any]]:
    """Plugins registered in this process by code (tests, notebooks), not by an entry point or
    as a built-in: the workers register them too (their modules must be importable there)."""
    from adapterswap import plugins

    plugins.load_plugins()
    return [(name, plugin) for name, plugin in plugins.pm.list_name_plugin()
            if name not in plugins._dists and name not in plugins.DEFAULT_PLUGINS]


class RaySweep:
    """The driver of a sweep on Ray (see the module docstring).

    :param address: the cluster's address (``auto``: the one this machine joined with
        ``ray start``); ``None``: Ray's own rule (``RAY_ADDRESS``, the cluster this machine
        joined, else a new local instance). When this process already called ``ray.init``,
        that connection is used.
    :param workers: actors (default: the cluster's GPUs, one each; without GPUs, 2).
    :param depth: chunks queued per actor, so that the next one is there when one ends.
    :param on_cell: called with each stored cell and its status.
    :param on_chunk: called with (this driver, worker index, chunk) after a chunk's cells are
        stored (the tests kill an actor there).
    """

    def __init__(self, spec: SweepSpec, *, address: str | None = None,
                 workers: int | None = None, depth: int = 2,
                 echo: Callable[[str], None] | None = None,
                 on_cell: Callable[[Cell, str], None] | None = None,
                 on_chunk: Callable[[RaySweep, int, Chunk], None] | None = None) -> None:
        if workers is not None and workers < 1:
            raise InvalidArgumentError("--nproc", workers, "must be >= 1")
        self.spec = spec
        self.address = address
        self.workers = workers
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise InvalidArgumentError("depth", depth, "must be an integer >= 1")
        self.depth = depth
        self.echo = echo or (lambda message: print(message, file=sys.stderr, flush=True))
        self.on_cell = on_cell or (lambda cell, status: None)
        self.on_chunk = on_chunk or (lambda sweep, worker, chunk: None)
        self.actors: list[Any] = []
        #: every key written, in order (a key appears once: :meth:`ChunkScheduler.accept`)
        self.written: list[str] = []
        #: results that arrived for cells already written, and were dropped
        self.duplicates = 0
        self.lost_workers: list[int] = []
        self.scheduler: ChunkScheduler | None = None
        self._stats: dict[int, dict[str, Any]] = {}
        self._notes: dict[int, list[str]] = {}
        self._last_death = ""

    # ------------------------------------------------------------------ cluster
    def run(self) -> SweepSummary:
        """Run every unfinished cell of the spec on the cluster; return the summary."""
        ray = require_ray()
        self.spec.validate()
        started = time.perf_counter()
        own = not ray.is_initialized()
        if own:
            env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
            options: dict[str, Any] = {"logging_level": "WARNING",
                                       "runtime_env": {"env_vars": env} if env else None}
            if self.address is None:
                options["include_dashboard"] = False
            ray.init(address=self.address, **options)
        try:
            with RunStore(self.spec.out) as store:
                return self._run(ray, store, started)
        finally:
            for actor in self.actors:
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            if own:
                ray.shutdown()

    def _start_actors(self, ray: Any, meta: dict[str, Any]) -> list[dict[str, Any]]:
        """One actor per GPU (or ``workers`` of one CPU each); returns their identities."""
        from adapterswap.quiet import is_quiet

        # nodes may still be joining a cluster given by address: wait for what --nproc asks
        deadline = time.monotonic() + (START_TIMEOUT_S if self.address is not None else 0.0)
        while True:
            resources = ray.cluster_resources()
            gpus = int(resources.get("GPU", 0))
            count = self.workers or gpus or 2
            have = gpus or int(resources.get("CPU", 0))
            if count <= have:
                break
            if time.monotonic() > deadline:
                kind = "GPUs" if gpus else "CPUs"
                waited = f" after {START_TIMEOUT_S:.0f} s" if self.address is not None else ""
                raise UsageError(f"--nproc {count}: the Ray cluster has {have} {kind}{waited}")
            time.sleep(2.0)
        claim = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        actor = ray.remote(ChunkWorker).options(max_restarts=0, max_concurrency=1, **claim)
        plugins = direct_plugins()
        self.actors = [actor.remote(self.spec, meta=meta, plugins=plugins, workers=count,
                                    quiet=is_quiet(), name=f"worker {i}")
                       for i in range(count)]
        self.echo(f"ray: {count} workers ({'one GPU' if gpus else 'one CPU'} each) on "
                  f"{len(ray.nodes())} node(s)")
        try:
            return ray.get([a.identity.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        except ray.exceptions.RayActorError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise AdapterswapError(f"a Ray worker could not start: {lines[-1] if lines else exc}"
                                   " (every node needs adapterswap, the plugins and their "
                                   "modules at the driver's paths)") from None

    # ------------------------------------------------------------------ the sweep
    def _run(self, ray: Any, store: RunStore, started: float) -> SweepSummary:
        spec = self.spec
        engine = SweepEngine(spec, store, log=self.echo)
        meta = {key: store.meta(key) for key in ("image_formats",) if store.meta(key)}
        identities = self._start_actors(ray, meta)
        kinds = {(i["device"], i["dtype"]) for i in identities}
        if len(kinds) > 1:
            raise UsageError("the Ray workers run on different devices or dtypes "
                             f"({sorted(kinds)}); cell keys name one: give every worker the "
                             "same kind of GPU")
        device, dtype = kinds.pop()
        # the cells run where the workers are: their device and dtype enter the keys
        engine._provenance = dataclasses.replace(engine.provenance(), device=device,
                                                 dtype=dtype)
        versions = engine.versions()
        keyed = engine.keyed_cells(versions)
        cells = {key: cell for cell, key in keyed}
        finished = store.finished_keys()
        self.scheduler = scheduler = ChunkScheduler(
            keyed, finished, max_batch=spec.max_batch,
            step_parallel=spec.use_step_parallel(compiled=bool(spec.compile)))
        run_id = engine.record_run(keyed, versions)
        summary = SweepSummary(total=scheduler.total, skipped=scheduler.skipped)
        setting_cells: dict[tuple[Any, ...], list[Cell]] = {}
        references = set()
        for cell, key in keyed:
            if key not in finished:
                setting_cells.setdefault((cell.backbone, cell.setting()), []).append(cell)
                if (cell.reference, cell.adapter) not in references:
                    references.add((cell.reference, cell.adapter))
                    engine.reference_for(cell)  # saved beside the store, as in one process
        for actor in self.actors:
            actor.prepare.remote(setting_cells)
        status = "failed"
        try:
            self._loop(ray, store, scheduler, cells, summary)
            status = "done" if not summary.failed else "done-with-failures"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:  # after an error the actors are killed, not closed (they may be mid-chunk)
            self._finish(ray, store, engine, summary, close=status.startswith("done"))
            summary.seconds = time.perf_counter() - started
            store.end_run(run_id, status, summary=summary.record())
        return summary

    def _loop(self, ray: Any, store: RunStore, scheduler: ChunkScheduler,
              cells: dict[str, Cell], summary: SweepSummary) -> None:
        """Keep ``depth`` chunks queued on every live actor; store results as they come."""
        live = set(range(len(self.actors)))
        loaded: dict[int, str | None] = dict.fromkeys(live)
        pending: dict[Any, tuple[int, Chunk]] = {}
        sent: dict[int, set[str]] = {w: set() for w in live}  # latency rows each actor has

        def fill(worker: int) -> None:
            while sum(1 for w, _ in pending.values() if w == worker) < self.depth:
                chunk = scheduler.next_chunk(worker, loaded[worker])
                if chunk is None:
                    return
                rows = [r for r in store.latency_rows() if r["backbone"] == chunk.backbone
                        and r["key"] not in sent[worker]]
                sent[worker].update(r["key"] for r in rows)
                ref = self.actors[worker].run_chunk.remote(list(chunk.items), rows)
                pending[ref] = (worker, chunk)
                loaded[worker] = chunk.backbone

        for worker in sorted(live):
            fill(worker)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            worker, chunk = pending.pop(ready[0])
            try:
                result: ChunkResult = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                self._lose(worker, exc, live, pending, store, cells, summary)
                for other in sorted(live):
                    fill(other)
                continue
            except ray.exceptions.RayTaskError as exc:  # the chunk failed: as in one process
                if isinstance(exc.cause, AdapterswapError):  # its one line
                    raise exc.cause from None
                raise exc.as_instanceof_cause() from None
            self._stats[worker] = result.stats
            self._write(store, worker, result.journal, cells, summary)
            missing = scheduler.complete(worker, chunk.id)
            if missing:
                self.echo(f"worker {worker} returned {len(missing)} cells without a result; "
                          "they stay unfinished (re-run to run them)")
            self.on_chunk(self, worker, chunk)
            for other in sorted(live):
                fill(other)
        if not scheduler.finished:
            raise RuntimeError(f"every Ray worker died (last: {self._last_death}); the cells "
                               "finished so far are stored: re-run the same command to resume")

    def _lose(self, worker: int, exc: BaseException, live: set[int],
              pending: dict[Any, tuple[int, Chunk]], store: RunStore,
              cells: dict[str, Cell], summary: SweepSummary) -> None:
        """A worker died: hand its chunks to the others (or store them as failed when their
        second worker died too)."""
        from adapterswap.sweep.finish import record_cell

        assert self.scheduler is not None
        live.discard(worker)
        self.lost_workers.append(worker)
        for ref in [r for r, (w, _) in pending.items() if w == worker]:
            del pending[ref]
        retried, given_up = self.scheduler.lose(worker)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._last_death = reason
        self.echo(f"worker {worker} died ({reason}); {sum(len(c.items) for c in retried)} "
                  f"cells in flight go to the {len(live)} other worker(s)")
        for chunk in given_up:
            for cell, key in chunk.items:
                if self.scheduler.accept(key):
                    record_cell(store, cell, key, status="failed", scores={}, image=None,
                                timings=None, extra=None,
                                error=f"{self.scheduler.max_attempts} workers died running it "
                                      f"(last: {reason})")
                    summary.failed += 1
                    self._written(key, "failed", cells)

    def _write(self, store: RunStore, worker: int, journal: list[Any], cells: dict[str, Cell],
               summary: SweepSummary) -> None:
        """Replay a worker's journal on the one store: each cell at most once, its images
        first; the metrics' notes are kept, every worker's joined at the end."""
        assert self.scheduler is not None
        self.duplicates += replay_journal(
            store, journal, summary, accept=self.scheduler.accept,
            on_cell=lambda key, status: self._written(key, status, cells),
            on_notes=lambda notes: self._notes.update({worker: notes}),
            writer=f"worker {worker}")

    def _written(self, key: str, status: str, cells: dict[str, Cell]) -> None:
        self.written.append(key)
        if key in cells:
            self.on_cell(cells[key], status)

    def _finish(self, ray: Any, store: RunStore, engine: SweepEngine, summary: SweepSummary,
                close: bool) -> None:
        """Close the live workers (``close``: compile caches saved), then the run's metric
        records, notes and the summary's totals (times from the busiest worker)."""
        closing = {i: a.close.remote() for i, a in enumerate(self.actors)
                   if close and i not in self.lost_workers}
        for worker, ref in closing.items():
            try:
                result = ray.get(ref, timeout=120)
            except Exception:  # noqa: BLE001 - a worker that died at the end
                continue
            self._stats[worker] = result.stats
            self._write(store, worker, result.journal, {}, summary)
        notes = sorted({note for worker_notes in self._notes.values() for note in worker_notes})
        if notes:
            store.set_meta("metric_notes", notes)
        status = store.metric_status()
        store.update_run(store.run_id, metrics=engine.metric_records(status))
        summary.unavailable_metrics = {m: r for m, (ok, r) in status.items()
                                       if not ok and m in self.spec.metrics}
        summary.add(list(self._stats.values()), slowest_by="busy_seconds")


def run_ray(spec: SweepSpec, *, address: str | None = None, workers: int | None = None,
            echo: Callable[[str], None] | None = None,
            on_cell: Callable[[Cell, str], None] | None = None) -> SweepSummary:
    """Run ``spec`` on Ray (see :class:`RaySweep`); returns the summary."""
    return RaySweep(spec, address=address, workers=workers, echo=echo, on_cell=on_cell).run()
