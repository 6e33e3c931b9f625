"""The sweep engine: plans a sweep, loads each model once, and runs it; it owns the loop.

:meth:`SweepEngine.run` plans the unfinished cells (:mod:`~adapterswap.sweep.plan`: by
backbone, adapter setting and group), loads each backbone once through the model factory
(:mod:`~adapterswap.sweep.models`: the same adapter object moves between backbones of its
family, the training-free swap; prompts and references are encoded once), measures latency
apart (:mod:`~adapterswap.sweep.latency`), runs each group through the step loop
(:mod:`~adapterswap.sweep.runner`: seeds batched, step counts advancing together with
per-sample timesteps) and finishes cells as they end (:mod:`~adapterswap.sweep.finish`: one
transaction per cell, so an interruption loses at most the cells in flight). Each backbone's
fast path is its :class:`~adapterswap.fastpath.Accelerator`, which the model factory keeps and
the engine enables, deciding compilation from the backbone's compile profile for the card.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from adapterswap.errors import MetricUnavailableError
from adapterswap.sweep.checks import make_enhancer
from adapterswap.sweep.finish import CellFinisher, Sample, tensor_to_pil
from adapterswap.sweep.latency import (
    DEFAULT_BUDGET_S,
    TINY_BUDGET_S,
    LatencyMeter,
    timing_context,
)
from adapterswap.sweep.models import ModelFactory
from adapterswap.sweep.plan import BackbonePlan, GroupPlan, plan_sweep
from adapterswap.sweep.provenance import (
    Provenance,
    adapter_kinds,
    metric_record,
    resolve_provenance,
)
from adapterswap.sweep.runner import (
    ChunkRunner,
    GroupInputs,
    free_device_memory,
    is_out_of_memory,
)
from adapterswap.sweep.spec import Cell, SweepSpec
from adapterswap.sweep.store import RunStore
from adapterswap.sweep.summary import SweepSummary, step_totals

__all__ = ["SweepEngine", "SweepSummary", "run_sweep", "software_versions", "tensor_to_pil",
           "is_out_of_memory", "free_device_memory", "Sample"]


def software_versions(plugin_names: Sequence[str] = ()) -> dict[str, str]:
    """Versions that enter every cell key: a new version means new cells, never mixed ones."""
    versions = {}
    for dist in ("adapterswap", "torch", "diffusers", "transformers", *plugin_names):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not-installed"
    return versions


class SweepEngine:
    """Runs a validated :class:`SweepSpec` into a :class:`RunStore`.

    :param models: the model factory (default: one built from the spec, saving references
        next to the store); benchmarks pass one that hands out models already loaded.
    """

    def __init__(self, spec: SweepSpec, store: RunStore, *,
                 on_cell: Callable[[Cell, str], None] | None = None,
                 log: Callable[[str], None] | None = None,
                 models: ModelFactory | None = None) -> None:
        self.spec = spec
        self.store = store
        self.on_cell = on_cell or (lambda cell, status: None)
        self.log = log or (lambda message: None)
        self.models = models or ModelFactory.from_spec(
            spec, reference_folder=store.out / "references")
        self._provenance: Provenance | None = None
        #: the compile-cache key of each backbone compiled in this run (saved after its cells)
        self._compile_keys: dict[int, Any] = {}

    # ------------------------------------------------------------------ setup
    def _plugins(self) -> set[str]:
        """The plugins whose code makes this sweep's cells: backbones, adapters, metrics."""
        from adapterswap.plugins import adapters, backbones, get_backbone, metrics

        plugins = set()
        for name in self.spec.backbones:
            plugins.add(backbones().entry(name).plugin)
            adapter = self.spec.adapter_for(get_backbone(name))
            if adapter is not None:
                plugins.add(adapters().entry(adapter).plugin)
        for name in self.spec.metrics:
            plugins.add(metrics().entry(name).plugin)
        return plugins

    def provenance(self) -> Provenance:
        """What produces this sweep's cells (code hash, weights identity, reference content,
        device kind, dtype, options); resolved once (hashes files, loads no model)."""
        if self._provenance is None:
            from adapterswap.plugins import pm

            modules = []
            for name in sorted(self._plugins()):
                plugin = pm.get_plugin(name)
                if plugin is not None:
                    modules.append(getattr(plugin, "__name__", None)
                                   or type(plugin).__module__)
            self._provenance = resolve_provenance(self.spec, modules)
        return self._provenance

    def versions(self) -> dict[str, str]:
        """Software versions in every cell key; approximations of the fast path (float8, block
        cache) are added so their cells never mix with exact ones."""
        from adapterswap.plugins import _dists, get_backbone

        plugins = self._plugins()
        dists = [_dists[p][0] for p in sorted(plugins) if p in _dists]
        versions = software_versions(dists)
        approximations = self.spec.fast_path("cpu").approximations()
        for name in self.spec.backbones:  # loading options that approximate (memory_budget)
            from_options = getattr(get_backbone(name), "option_approximations", None)
            if from_options is not None:
                approximations += [f"{name}:{a}" for a in
                                   from_options(self.spec.options_for(name)) or ()]
        if approximations:
            versions["approximation"] = "+".join(approximations)
        return versions

    def keyed_cells(self, versions: dict[str, str] | None = None) -> list[tuple[Cell, str]]:
        """Every cell of the spec with its key: its fields, the software versions and its
        provenance (:meth:`provenance`), so a cell made by other code, weights, reference
        content, device kind, dtype or options never resumes as this one."""
        versions = self.versions() if versions is None else versions
        provenance = self.provenance()
        return [(cell, cell.key(versions, provenance.cell_identity(cell)))
                for cell in self.spec.cells()]

    def metric_records(self, status: dict[str, tuple[bool, str | None]] | None = None
                       ) -> dict[str, dict[str, Any]]:
        """Each metric's direction, kind and availability, for the run's row."""
        from adapterswap.plugins import get_metric

        status = status or {}
        records = {}
        for name in self.spec.metrics:
            available, reason = status.get(name, (True, None))
            records[name] = metric_record(get_metric(name), available=available, reason=reason,
                                          options=self.spec.metric_options.get(name, {}))
        return records

    def record_run(self, keyed: Sequence[tuple[Cell, str]], versions: dict[str, str], *,
                   store: RunStore | None = None) -> int:
        """Record the sweep in this engine's store, or in ``store`` (the merged store of a
        distributed sweep): its spec, versions and cell keys in the meta, and this invocation
        in ``runs`` (:meth:`RunStore.begin_run`). Returns the run's id."""
        store = store or self.store
        store.set_meta("spec", self.spec.to_dict())
        store.set_meta("versions", versions)
        store.set_meta("cell_keys", [k for _, k in keyed])
        provenance = self.provenance()
        return store.begin_run(
            spec=self.spec.to_dict(), versions=versions, code_hash=provenance.code_hash,
            weights=provenance.weights, reference_hashes=provenance.references,
            device=provenance.device, dtype=provenance.dtype, metrics=self.metric_records(),
            adapters=adapter_kinds(self.spec), cell_keys=[k for _, k in keyed])

    def load_metrics(self) -> dict[str, Any]:
        """Instantiate and load every requested metric; record the unavailable ones."""
        from adapterswap.plugins import get_metric

        loaded = {}
        for name in self.spec.metrics:
            options = {"device": self.spec.device, **self.spec.metric_options.get(name, {})}
            metric = get_metric(name)(**options)
            try:
                metric.load()
            except MetricUnavailableError as exc:
                self.store.set_metric_status(name, False, str(exc))
                self.log(f"metric {name!r} unavailable: {exc}")
                continue
            except Exception as exc:  # a metric that fails to load must not stop the sweep
                reason = f"failed to load: {type(exc).__name__}: {exc}"
                self.store.set_metric_status(name, False, reason)
                self.log(f"metric {name!r} unavailable: {reason}")
                continue
            self.store.set_metric_status(name, True, None)
            loaded[name] = metric
        self._store_notes(loaded)
        return loaded

    def _store_notes(self, metrics: dict[str, Any]) -> None:
        """Metrics' caveats (e.g. how many images had no face), after scoring."""
        notes = [f"{name}: {note}" for name, metric in metrics.items()
                 for note in metric.notes()]
        self.store.set_meta("metric_notes", notes)

    def enable_fast_path(self, backbone: Any, cells: Sequence[Cell]) -> dict[str, Any]:
        """The spec's fast path on ``backbone`` and the adapters its cells use (loaded and
        attached first, so their modules are compiled or cast along), through the backbone's
        accelerator. With ``compile=None`` it compiles on CUDA where the cells' planned
        forwards reach the break-even of the backbone's compile profile for this card
        (:mod:`adapterswap.fastpath.profile`); the report names that profile."""
        from adapterswap.fastpath import compile_cache

        accelerator = self.models.accelerator(backbone)
        per_forward = max(1, min(self.spec.max_batch, len(self.spec.seeds)))
        forwards = sum(cell.steps for cell in cells) // per_forward
        profile = accelerator.profile
        key = compile_cache.cache_key(
            backbone=backbone.name, device=backbone.execution_device, dtype=backbone.dtype,
            mode=profile.compile_mode, scope=profile.compile_scope,
            sizes={(c.height, c.width) for c in cells})
        warm = compile_cache.is_warm(key)
        # a warm cache costs a share of a cold compile: it repays itself that much sooner
        repays = accelerator.compile_repays(forwards, per_forward) or (warm and (
            accelerator.compile_repays(int(forwards / compile_cache.WARM_COMPILE_SHARE),
                                       per_forward)))
        fast = self.spec.fast_path(str(backbone.device), forwards, repays)
        if fast.compile:
            if compile_cache.load(key, self.log):
                self.log(f"{backbone.name}: compiled code loaded from this machine's compile "
                         "cache (the first calls trace but do not generate kernels)")
            else:
                self.log(f"{backbone.name}: compiling for the first time for this card, torch, "
                         "dtype and size: the first call at each batch shape takes tens of "
                         "seconds to minutes; the result is saved for the next run")
            self._compile_keys[id(backbone)] = key
        adapters = []
        for name in sorted({cell.adapter for cell in cells} - {"none"}):
            adapter = self.models.adapter(name, backbone)
            adapter.attach(backbone)
            adapters.append(adapter)
        report = accelerator.enable(fast, adapters=adapters)
        report["compile_profile"] = profile.report()
        report["compile_cache"] = "warm" if warm else "cold"
        if report.get("compiled"):
            self.log(f"{backbone.name}: compiling {'; '.join(report['compiled'])} "
                     f"(~{forwards} forwards planned; the first call per batch shape is slow)")
            if fast.compile and profile.note:
                self.log(f"{backbone.name}: compile profile {profile.note}")
        if report.get("fp8_layers"):
            self.log(f"{backbone.name}: {report['fp8_layers']} linear layers in float8 "
                     "(approximation)")
        if report.get("cache"):
            self.log(f"{backbone.name}: block cache {report['cache']} (approximation)")
        return report

    def apply_setting(self, backbone: Any, cell: Cell) -> Any:
        """Attach (or detach) the adapter and set its scale and window for ``cell``."""
        if cell.adapter == "none":
            self.models.detach_all(backbone)
            return None
        adapter = self.models.adapter(cell.adapter, backbone)
        adapter.attach(backbone)
        adapter.set_scale(type(adapter).default_scale if cell.scale is None else cell.scale)
        adapter.set_window(cell.start, cell.end)
        return adapter

    def reference_for(self, cell: Cell) -> Any:
        """The reference image of a cell (also for adapter-off cells, which keep theirs so
        that ablations pair by reference)."""
        if not cell.reference:
            return None
        from adapterswap.plugins import get_backbone

        name = cell.adapter if cell.adapter != "none" else \
            self.spec.adapter_for(get_backbone(cell.backbone))
        return self.models.reference_image(cell.reference, name) if name else None

    # ------------------------------------------------------------------ run
    def run(self) -> SweepSummary:
        """Run every unfinished cell, recorded as a new run of this engine's store."""
        start = time.perf_counter()
        versions = self.versions()
        keyed = self.keyed_cells(versions)
        plan = plan_sweep(keyed, self.store.finished_keys())
        summary = SweepSummary(total=plan.total, skipped=plan.skipped)
        run_id = self.store.run_id = self.record_run(keyed, versions)
        status = "failed"
        try:
            self._run(plan, summary)
            status = "done" if not summary.failed else "done-with-failures"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            summary.seconds = time.perf_counter() - start
            self.store.end_run(run_id, status, summary=summary.record())
        return summary

    def _run(self, plan: Any, summary: SweepSummary) -> None:
        started = time.perf_counter()  # loading, for the summary's load_seconds
        # the first backbone loads before the metrics: missing weights fail in seconds with
        # their one-line error, not after the metrics' models were loaded (or fetched)
        first = self.models.backbone(plan.backbones[0].backbone) if plan.backbones else None
        metrics = self.load_metrics()
        summary.load_seconds += time.perf_counter() - started
        status = self.store.metric_status()
        self.store.update_run(self.store.run_id, metrics=self.metric_records(status))
        summary.unavailable_metrics = {m: r for m, (ok, r) in status.items()
                                       if not ok and m in self.spec.metrics}
        finisher = CellFinisher(self.store, metrics, overlap=self.spec.use_overlap(),
                                save_images=self.spec.save_images,
                                image_format=self.spec.image_format,
                                max_batch=self.spec.max_batch,
                                on_cell=lambda cell, status: self.on_cell(cell, status),
                                log=self.log)
        runner = ChunkRunner(self.store, finisher, max_batch=self.spec.max_batch, log=self.log)
        budget = self.spec.timing_budget_s or (
            TINY_BUDGET_S if self.spec.preset == "tiny" else DEFAULT_BUDGET_S)
        meter = LatencyMeter(self.store, repeats=self.spec.timing_repeats, budget_s=budget,
                             log=self.log)
        timed = "latency" in metrics and self.spec.timing_repeats > 0
        try:
            for index, part in enumerate(plan.backbones):
                self._run_backbone(part, runner, finisher, meter, summary, timed=timed,
                                   loaded=first if index == 0 else None)
        except BaseException:
            # also on errors and Ctrl-C: cells already decoded are stored, never dropped
            try:
                finisher.close()
            except Exception as exc:  # the first error is the one to report
                self.log(f"while stopping, a finishing job failed too: {exc}")
            try:  # the run's stored summary keeps the forwards and finishing done so far
                summary.add([step_totals(runner, finisher)])
            except Exception:  # noqa: BLE001 - a broken device: the first error is reported
                pass
            raise
        finisher.close()
        self._store_notes(metrics)
        summary.add([{"done": finisher.queue.done, "failed": finisher.queue.failed,
                      **step_totals(runner, finisher)}])
        if runner.shared_first_steps:
            self.log(f"first step shared: {runner.shared_first_steps} image rows reused the "
                     "output of a row with the same seed and starting timestep")

    def _run_backbone(self, part: BackbonePlan, runner: ChunkRunner, finisher: CellFinisher,
                      meter: LatencyMeter, summary: SweepSummary, *, timed: bool,
                      loaded: Any = None) -> None:
        """Load one backbone, run its settings and groups, store every cell, unload it;
        ``timed``: measure the latency of each setting first; ``loaded``: the backbone, already
        loaded (the first one loads before the metrics)."""
        started = time.perf_counter()
        backbone = loaded if loaded is not None else self.models.backbone(part.backbone)
        summary.fast_path[part.backbone] = self.enable_fast_path(backbone, part.cells)
        summary.load_seconds += time.perf_counter() - started
        accelerator = self.models.accelerator(backbone)
        context = timing_context(backbone, accelerator)
        fast = accelerator.fast_path
        parallel = self.spec.use_step_parallel(bool(fast is not None and fast.compile))
        prompts = self._encode_prompts(backbone, part.cells)
        for setting in part.settings:
            adapter = self.apply_setting(backbone, setting.first)
            first = setting.first
            if timed:
                started = time.perf_counter()
                meter.measure(backbone, adapter, setting.cells, context, functools.partial(
                    self.models.conditioning, adapter, backbone, first.reference),
                    accelerator=accelerator)
                summary.latency_seconds += time.perf_counter() - started
            timings = meter.timings(setting.cells, context)
            for group in setting.groups:
                inputs = self._group_inputs(backbone, adapter, group, prompts)
                done, failed = runner.run_group(backbone, adapter, group.items, inputs,
                                                step_parallel=parallel, timings=timings,
                                                accelerator=accelerator)
                summary.done += done
                summary.failed += failed
        finisher.drain()  # every cell of this backbone stored before unloading
        self.backbone_done(backbone, accelerator, summary.fast_path[part.backbone], meter,
                           forwards_s=runner.forward_timer.total())

    def backbone_done(self, backbone: Any, accelerator: Any, fast_path: dict[str, Any],
                      meter: Any, forwards_s: float | None = None) -> None:
        """After a backbone's cells are stored: save its compile cache, record what its block
        cache and memory budget did (in ``fast_path``, the summary's entry, and the store's
        meta), then unload it. One process and a multi-worker sweep's workers alike."""
        name = backbone.name
        key = self._compile_keys.pop(id(backbone), None)
        if key is not None:
            from adapterswap.fastpath import compile_cache

            if forwards_s is not None:
                self.log(f"{name}: compiled run's forwards took {forwards_s:.1f} s in all "
                         "(the first call per shape compiles)")
            compile_cache.save(key, self.log)
        memory = getattr(backbone, "memory_record", None)
        memory = memory() if memory is not None else None
        if memory is not None:  # a memory budget's plan, enforcement and peak
            fast_path["memory"] = memory
            self.store.set_meta(f"memory:{name}", memory)
            self.log(f"{name}: memory budget {memory.get('budget_gib')} GiB, peak "
                     f"{memory.get('peak_gib')} GiB")
        if accelerator.block_cache is not None:
            stats = accelerator.block_cache.stats()
            fast_path["block_cache"] = stats
            self.store.set_meta(f"block_cache:{name}", stats)
            self.log(f"{name}: block cache computed {stats['computed_steps']} "
                     f"steps, reused {stats['cached_steps']}")
        self.models.detach_all(backbone)
        self.models.forget(backbone)
        if meter is not None:
            meter.forget(backbone)
        backbone.unload()

    @staticmethod
    def _encode_prompts(backbone: Any, cells: Sequence[Cell]) -> dict[str, Any]:
        """Every distinct prompt of a backbone's cells, encoded once, before its first group,
        inside the backbone's ``encoding_session`` where it has one (under a memory budget the
        text encoders then visit the GPU once for all prompts, not once per prompt)."""
        import contextlib

        session = getattr(backbone, "encoding_session", None)
        prompts: dict[str, Any] = {}
        with session() if session is not None else contextlib.nullcontext():
            for cell in cells:
                if cell.prompt not in prompts:
                    prompts[cell.prompt] = backbone.encode_prompt(
                        [cell.prompt],
                        guidance_scale=backbone.resolve_guidance_scale(cell.guidance_scale))
        return prompts

    def _group_inputs(self, backbone: Any, adapter: Any, group: GroupPlan,
                      prompts: dict[str, Any]) -> GroupInputs:
        """Check a group's inputs and encode its prompt (once per backbone) and reference
        (once per backbone and reference)."""
        first = group.first
        guidance = backbone.resolve_guidance_scale(first.guidance_scale)
        backbone.check_inputs(num_inference_steps=max(c.steps for c, _ in group.items),
                              height=first.height, width=first.width, guidance_scale=guidance)
        if first.prompt not in prompts:
            prompts[first.prompt] = backbone.encode_prompt([first.prompt],
                                                           guidance_scale=guidance)
        reference = self.reference_for(first)
        conditioning = self.models.conditioning(adapter, backbone, first.reference)
        return GroupInputs(prompts[first.prompt], conditioning, reference, guidance,
                           make_enhancer(first.enhancer))


def run_sweep(spec: SweepSpec, *, on_cell: Callable[[Cell, str], None] | None = None,
              log: Callable[[str], None] | None = None) -> SweepSummary:
    """Validate, open the store under ``spec.out`` and run (resuming finished cells)."""
    spec.validate()
    with RunStore(spec.out) as store:
        return SweepEngine(spec, store, on_cell=on_cell, log=log).run()
