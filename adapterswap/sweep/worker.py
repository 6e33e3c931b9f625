"""A worker of a multi-worker sweep: runs chunks as one process does, and journals its writes.

:class:`ChunkWorker` keeps its backbone, adapters, encodings and metrics loaded from chunk to
chunk and runs each chunk through the engine's own parts (model factory, latency meter, step
loop, cell finisher), so a cell comes out as it would in one process. It writes nothing:
everything the finisher would store goes into a :class:`RelayStore`, whose journal (cell rows,
scores, encoded images, metric status, latency rows) each chunk returns for the driver to
write into the one store (:mod:`adapterswap.sweep.ray_backend`), or a torchrun rank into its
shard (:mod:`adapterswap.sweep.distributed`), through :func:`replay_journal`. Nothing here
imports Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapterswap.sweep.engine import SweepEngine
from adapterswap.sweep.images_io import EncodedImage, encode_image
from adapterswap.sweep.latency_table import latency_key
from adapterswap.sweep.plan import GroupPlan, Keyed
from adapterswap.sweep.spec import Cell, SweepSpec
from adapterswap.sweep.summary import step_totals

#: Store writes a worker may journal (anything else is refused when the journal is replayed).
JOURNALED = ("set_meta", "set_metric_status", "record_latency")


@dataclasses.dataclass
class CellRecord:
    """One finished (or failed) cell as the finisher stored it: ``record_cell``'s arguments
    and the images saved for it (its own and its trajectory strip), encoded."""

    key: str
    config: dict[str, Any]
    kwargs: dict[str, Any]
    images: list[tuple[str, EncodedImage]]


class RelayStore:
    """What a worker's engine writes into instead of the store: reads are answered from what
    the driver sent (meta, latency rows) and what this worker wrote; writes are journaled
    (:meth:`take`) for the driver to replay on the one store. Thread-safe (the finisher's
    background thread writes too)."""

    def __init__(self, out: str | Path, meta: Mapping[str, Any] | None = None) -> None:
        self.out = Path(out)
        self.run_id: int | None = None
        self.mutex = threading.RLock()
        self._meta = dict(meta or {})
        self._latency: dict[str, dict[str, Any]] = {}
        self._metric_status: dict[str, tuple[bool, str | None]] = {}
        self._done: set[str] = set()
        self._images: list[tuple[str, EncodedImage]] = []
        self._journal: list[Any] = []

    def take(self) -> list[Any]:
        """The journal since the last call: :class:`CellRecord` and ``(method, args)``."""
        with self.mutex:
            journal, self._journal = self._journal, []
            return journal

    def meta(self, key: str, default: Any = None) -> Any:
        with self.mutex:
            return copy.deepcopy(self._meta.get(key, default))

    def set_meta(self, key: str, value: Any) -> None:
        with self.mutex:
            self._meta[key] = copy.deepcopy(value)
            self._journal.append(("set_meta", (key, value)))

    def finished_keys(self) -> set[str]:
        with self.mutex:
            return set(self._done)

    def save_image(self, key: str, image: Any) -> str:
        encoded = image if isinstance(image, EncodedImage) else encode_image(image)
        with self.mutex:
            self._images.append((key, encoded))
        return str(Path("images") / f"{key}{encoded.suffix}")  # RunStore.save_image's path

    def record_cell(self, key: str, config: Mapping[str, Any], **kwargs: Any) -> None:
        with self.mutex:
            mine, others = [], []
            for name, image in self._images:
                (mine if name == key or name.startswith(f"{key}-") else others).append(
                    (name, image))
            self._images = others
            self._journal.append(CellRecord(key, dict(config), kwargs, mine))
            if kwargs.get("status") == "done":
                self._done.add(key)

    def set_metric_status(self, metric: str, available: bool, reason: str | None) -> None:
        with self.mutex:
            self._metric_status[metric] = (available, reason)
            self._journal.append(("set_metric_status", (metric, available, reason)))

    def metric_status(self) -> dict[str, tuple[bool, str | None]]:
        with self.mutex:
            return dict(self._metric_status)

    def record_latency(self, row: Mapping[str, Any]) -> None:
        with self.mutex:
            self._latency[latency_key(row)] = {**row, "key": latency_key(row)}
            self._journal.append(("record_latency", (dict(row),)))

    def latency(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        with self.mutex:
            return self._latency.get(latency_key(key))

    def add_latency(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Latency rows of the store (timed by this or another worker, or an earlier run)."""
        with self.mutex:
            for row in rows:
                self._latency.setdefault(row["key"], dict(row))


def replay_journal(store: Any, journal: Sequence[Any], summary: Any, *,
                   accept: Callable[[str], bool] | None = None,
                   on_cell: Callable[[str, str], None] | None = None,
                   on_notes: Callable[[list[str]], None] | None = None,
                   writer: str = "a worker") -> int:
    """Write a worker's journal (:meth:`RelayStore.take`) into ``store``: each cell with its
    images first (as one process does), counted in ``summary``'s done or failed; the metric
    status, meta and latency rows as they came. Returns how many cells were refused.

    A configuration is timed once: where two workers timed the same one (two Ray actors that
    started on one setting together), the row stored first stands, and the later worker's
    cells get its times and ``latency`` score, so every cell's latency is its stored row.

    :param accept: whether to write a cell's result (the Ray driver writes each cell once:
        :meth:`~adapterswap.sweep.scheduler.ChunkScheduler.accept`); default: every cell.
    :param on_cell: called with each written cell's key and status.
    :param on_notes: given the metrics' notes instead of the store's meta (the Ray driver joins
        every worker's at the end).
    :param writer: who journaled, for the error on a write that is not :data:`JOURNALED`.
    """
    refused = 0
    for entry in journal:
        if isinstance(entry, CellRecord):
            if accept is not None and not accept(entry.key):
                refused += 1
                continue
            _use_stored_latency(store, entry.kwargs)
            for name, image in entry.images:
                path = store.save_image(name, image)
                if name == entry.key and path != entry.kwargs.get("image"):
                    raise RuntimeError(f"image of {name} stored at {path}, recorded as "
                                       f"{entry.kwargs.get('image')}")
            store.record_cell(entry.key, entry.config, **entry.kwargs)
            status = entry.kwargs.get("status", "done")
            if status == "done":
                summary.done += 1
            else:
                summary.failed += 1
            if on_cell is not None:
                on_cell(entry.key, status)
            continue
        method, args = entry
        if method not in JOURNALED:
            raise RuntimeError(f"{writer} journaled an unknown write {method!r}")
        if on_notes is not None and method == "set_meta" and args[0] == "metric_notes":
            on_notes(list(args[1]))
            continue
        if method == "record_latency" and store.latency(args[0]) is not None:
            continue  # timed by another worker first: its row stands
        getattr(store, method)(*args)
    return refused


def _use_stored_latency(store: Any, kwargs: dict[str, Any]) -> None:
    """A cell's times and ``latency`` score from its configuration's stored row where they
    came from another timing of it (see :func:`replay_journal`)."""
    timings = kwargs.get("timings") or {}
    key = timings.get("latency_key")  # the row's LATENCY_KEY fields, as JSON
    row = store.latency(json.loads(key)) if key else None
    if row is None or row["total_s"] == timings.get("total_s"):
        return
    kwargs["timings"] = {**timings, "total_s": row["total_s"], "denoise_s": row["denoise_s"]}
    if "latency" in (kwargs.get("scores") or {}):
        kwargs["scores"] = {**kwargs["scores"], "latency": row["total_s"]}


@dataclasses.dataclass
class ChunkResult:
    """What a worker returns for a chunk: the journal and its running totals."""

    journal: list[Any]
    stats: dict[str, Any]


class ChunkWorker(SweepEngine):
    """One worker of a multi-worker sweep (the object inside a Ray actor; it needs no Ray).

    It keeps one backbone loaded (with its adapters, encodings and fast path) while chunks of
    that backbone come, and its metrics for its whole life; each chunk runs through the engine's
    own parts (:meth:`apply_setting`, latency, :meth:`_group_inputs`,
    :meth:`ChunkRunner.run_group <adapterswap.sweep.runner.ChunkRunner.run_group>`,
    :class:`~adapterswap.sweep.finish.CellFinisher`) into a :class:`RelayStore`.

    :param plugins: plugins the driver registered by code (not entry points), registered here
        too so that the worker knows the same backbones, adapters and metrics.
    :param workers: how many workers share the sweep: this one expects that share of each
        backbone's cells when the fast path decides whether compiling repays itself.
    :param device: the device to run on (a torchrun rank's ``cuda:LOCAL_RANK``); default: the
        spec's, and ``cuda:0`` on CUDA (Ray shows each actor its own GPU as device 0).
    """

    def __init__(self, spec: SweepSpec, *, meta: Mapping[str, Any] | None = None,
                 plugins: Sequence[tuple[str, Any]] = (), workers: int = 1,
                 quiet: bool = True, name: str = "worker", device: str | None = None) -> None:
        from adapterswap import plugins as registry
        from adapterswap.sweep.models import ModelFactory

        if quiet:
            import contextlib

            from adapterswap.quiet import silenced

            self._quiet = contextlib.ExitStack()
            self._quiet.enter_context(silenced())
        for plugin_name, plugin in plugins:
            if registry.pm.get_plugin(plugin_name) is None:
                registry.register_plugin(plugin, name=plugin_name)
        spec = copy.deepcopy(spec)
        if device is not None:
            spec.device = device
        elif _cuda_available() and (spec.device is None or str(spec.device).startswith("cuda")):
            spec.device = "cuda:0"  # Ray shows each actor its own GPU as device 0
        super().__init__(spec, RelayStore(spec.out, meta), models=ModelFactory.from_spec(spec),
                         log=lambda message: print(f"{name}: {message}", file=sys.stderr,
                                                   flush=True))
        if workers < 1:
            from adapterswap.errors import InvalidArgumentError

            raise InvalidArgumentError("workers", workers, "must be >= 1")
        self.workers = workers
        self.setting_cells: dict[tuple[Any, ...], list[Cell]] = {}
        self.stats: dict[str, Any] = {"load_seconds": 0.0, "latency_seconds": 0.0,
                                      "busy_seconds": 0.0, "fast_path": {}, "chunks": 0,
                                      "pid": os.getpid()}
        self._backbone: Any = None
        self._metrics: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """The device kind and dtype this worker's cells run with (they enter the cell keys),
        and where it runs."""
        import platform

        from adapterswap.sweep.provenance import device_kind, resolved_dtype

        return {"device": device_kind(self.spec.device),
                "dtype": resolved_dtype(self.spec.preset, self.spec.dtype, self.spec.device),
                "host": platform.node(), "pid": os.getpid()}

    def prepare(self, setting_cells: Mapping[tuple[Any, ...], list[Cell]]) -> None:
        """The unfinished cells of each (backbone, adapter setting), as one process plans them:
        latency is timed per setting, the fast path decided per backbone."""
        self.setting_cells = dict(setting_cells)

    def run_chunk(self, items: Sequence[Keyed], latency_rows: Sequence[Mapping[str, Any]] = ()
                  ) -> ChunkResult:
        """Run one chunk (cells of one group) and return what to store."""
        started = time.perf_counter()
        items = list(items)
        first = items[0][0]
        self.store.add_latency(latency_rows)
        backbone = self._load(first.backbone)
        self._start()
        adapter = self.apply_setting(backbone, first)
        cells = self.setting_cells.get((first.backbone, first.setting())) or [c for c, _ in items]
        if self._timed:
            begin = time.perf_counter()
            self.meter.measure(backbone, adapter, cells, self._context, functools.partial(
                self.models.conditioning, adapter, backbone, first.reference),
                accelerator=self._accelerator)
            self.stats["latency_seconds"] += time.perf_counter() - begin
        inputs = self._group_inputs(backbone, adapter, GroupPlan(items), self._prompts)
        self.runner.run_group(backbone, adapter, items, inputs, step_parallel=self._parallel,
                              timings=self.meter.timings(cells, self._context),
                              accelerator=self._accelerator)
        self.finisher.drain()  # every cell of the chunk is in the journal
        self._store_notes(self._metrics or {})
        self.stats["chunks"] += 1
        self.stats["busy_seconds"] += time.perf_counter() - started
        return ChunkResult(self.store.take(), self._totals())

    def close(self) -> ChunkResult:
        """Unload the backbone (saving its compile cache), stop the finisher; the rest of the
        journal."""
        if self._backbone is not None:
            self._release()
        if self._metrics is not None:
            self.finisher.close()
        return ChunkResult(self.store.take(), self._totals())

    # ------------------------------------------------------------------ internals
    def _start(self) -> None:
        """Metrics, finisher, step runner and latency meter, once (after the first backbone
        loads: missing weights fail before the metrics' models load, as in one process)."""
        if self._metrics is not None:
            return
        from adapterswap.sweep.finish import CellFinisher
        from adapterswap.sweep.latency import DEFAULT_BUDGET_S, TINY_BUDGET_S, LatencyMeter
        from adapterswap.sweep.runner import ChunkRunner

        begin = time.perf_counter()
        self._metrics = self.load_metrics()
        self.stats["load_seconds"] += time.perf_counter() - begin
        spec = self.spec
        self.finisher = CellFinisher(self.store, self._metrics, overlap=spec.use_overlap(),
                                     save_images=spec.save_images,
                                     image_format=spec.image_format, max_batch=spec.max_batch,
                                     log=self.log)
        self.runner = ChunkRunner(self.store, self.finisher, max_batch=spec.max_batch,
                                  log=self.log)
        budget = spec.timing_budget_s or (TINY_BUDGET_S if spec.preset == "tiny"
                                          else DEFAULT_BUDGET_S)
        self.meter = LatencyMeter(self.store, repeats=spec.timing_repeats, budget_s=budget,
                                  log=self.log)
        self._timed = "latency" in self._metrics and spec.timing_repeats > 0

    def _load(self, name: str) -> Any:
        """The loaded backbone ``name``: the one already loaded, or another after unloading
        it (one backbone at a time, as in one process)."""
        if self._backbone is not None and self._backbone.name == name:
            return self._backbone
        if self._backbone is not None:
            self._release()
        from adapterswap.sweep.latency import timing_context

        begin = time.perf_counter()
        backbone = self.models.backbone(name)
        cells = [c for (b, _), group in self.setting_cells.items() if b == name for c in group]
        self.stats["fast_path"][name] = self.enable_fast_path(backbone,
                                                              cells[::self.workers])
        self.stats["load_seconds"] += time.perf_counter() - begin
        self._backbone = backbone
        self._accelerator = self.models.accelerator(backbone)
        self._context = timing_context(backbone, self._accelerator)
        fast = self._accelerator.fast_path
        self._parallel = self.spec.use_step_parallel(bool(fast is not None and fast.compile))
        self._prompts: dict[str, Any] = {}
        return backbone

    def _release(self) -> None:
        """Store the backbone's cells, save its compile cache, unload it (as one process does
        after a backbone's cells)."""
        backbone, self._backbone = self._backbone, None
        if self._metrics is not None:
            self.finisher.drain()
        self.backbone_done(backbone, self._accelerator, self.stats["fast_path"][backbone.name],
                           self.meter if self._metrics is not None else None)

    def _totals(self) -> dict[str, Any]:
        totals = dict(self.stats)
        if self._metrics is not None:
            totals.update(step_totals(self.runner, self.finisher))
        return totals


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


