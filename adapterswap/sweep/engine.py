"""The sweep engine: it owns the denoising loop.

For each backbone it loads the model once, builds the adapter once (the same object moves
between backbones of its family: the training-free swap), encodes every prompt and reference
once, and advances the runs of a (reference, prompt) group together: seeds are batched and, with
``step_parallel``, runs with different step counts share each denoiser forward through
per-sample timesteps. Runs that finish are decoded, scored and committed at once, one
transaction per cell, so an interruption loses at most the cells in flight.

Latency is measured apart from the batched runs, per (backbone, step count): one image, batch 1,
synchronised, encode + denoise + decode (reference encoding such as face detection excluded),
because the wall time of a shared batch says nothing about the latency of one image.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from adapterswap.denoise import StepContext, TensorBundle, denoise
from adapterswap.errors import MetricUnavailableError
from adapterswap.fastpath import ForwardTimer, device_tensor
from adapterswap.metrics.base import MetricBatch
from adapterswap.sweep.spec import Cell, SweepSpec
from adapterswap.sweep.store import RunStore


def software_versions(plugin_names: Sequence[str] = ()) -> dict[str, str]:
    """Versions that enter every cell key: a new version means new cells, never mixed ones."""
    versions = {}
    for dist in ("adapterswap", "torch", "diffusers", "transformers", *plugin_names):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not-installed"
    return versions


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or other accelerator) out-of-memory errors, which a smaller batch may avoid."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


@dataclass
class SweepSummary:
    """What a run did: counts, where things are, and unavailable metrics."""

    total: int
    skipped: int
    done: int = 0
    failed: int = 0
    unavailable_metrics: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: seconds inside denoiser forwards (adapter + denoiser), timed without host syncs
    forward_seconds: float = 0.0
    forwards: int = 0
    #: seconds from the first forward's start to the last one's end (device time on CUDA)
    forward_span_seconds: float = 0.0
    #: image rows whose first step was not computed: it had the same inputs as another row's
    #: (same seed, schedules that start alike: flow matching), so its output was reused
    shared_first_steps: int = 0
    #: seconds finishing cells (decode, scoring, storing) on the host, and seconds decoding
    #: (device time from CUDA events when the decode is queued on the side stream)
    finish_seconds: float = 0.0
    decode_seconds: float = 0.0
    #: what the fast path did per backbone (attention, compiled parts, float8 layers)
    fast_path: dict[str, Any] = field(default_factory=dict)


def tensor_to_pil(images: Any) -> list[Any]:
    """``(B, 3, H, W)`` images in [0, 1] to PIL images, rounding as diffusers'
    ``output_type="pil"`` does (so overlapped finishing stores the same pixels)."""
    import numpy as np
    from PIL import Image

    array = images.permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


class _Finisher:
    """Runs cell-finishing jobs on one background thread (``overlap``) or inline.

    Jobs return ``(done, failed)``; the counts add up in :attr:`done` / :attr:`failed`. The
    first error of a job is raised again on the engine's thread at the next :meth:`submit` or
    :meth:`drain`, so a failing store or metric stops the sweep as it would inline."""

    def __init__(self, overlap: bool) -> None:
        self.overlap = overlap
        self.done = self.failed = 0
        self._pool: Any = None
        self._pending: list[Any] = []

    def submit(self, job: Callable[[], tuple[int, int]]) -> None:
        self._collect(block=False)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapterswap-finish")
        self._pending.append(self._pool.submit(job))

    def drain(self) -> None:
        """Wait for every queued job (their cells are stored); raise the first error."""
        self._collect(block=True)

    def _collect(self, block: bool) -> None:
        error = None
        keep = []
        for future in self._pending:
            if not block and not future.done():
                keep.append(future)
                continue
            try:
                done, failed = future.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the rest
                error = error or exc
                continue
            self.done += done
            self.failed += failed
        self._pending = keep
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


@dataclass
class _Sample:
    cell: Cell
    key: str
    steps: int


class SweepEngine:
    """Runs a validated :class:`SweepSpec` into a :class:`RunStore`."""

    def __init__(self, spec: SweepSpec, store: RunStore, *,
                 on_cell: Callable[[Cell, str], None] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.store = store
        self.on_cell = on_cell or (lambda cell, status: None)
        self.log = log or (lambda message: None)
        self._adapters: dict[str, Any] = {}
        self._references: dict[str, Any] = {}
        self._oom_retries = 0
        self._conditionings: dict[tuple[Any, ...], Any] = {}
        self._timed: set[int] = set()
        self._forward_timer = ForwardTimer()
        self._shared_forwards = 0  # first-step rows not computed (shared with another row)
        self._finish_seconds = 0.0
        self._decode_seconds = 0.0
        self._decode_timer = ForwardTimer()
        self._decode_streams: dict[Any, Any] = {}
        self._finisher = _Finisher(False)

    # ------------------------------------------------------------------ setup
    def versions(self) -> dict[str, str]:
        """Software versions in every cell key; approximations of the fast path (float8, block
        cache) are added so their cells never mix with exact ones."""
        from adapterswap.plugins import _dists, adapters, backbones

        plugins = set()
        for name in self.spec.backbones:
            plugins.add(backbones().entry(name).plugin)
        if self.spec.adapter not in (None, "none"):
            plugins.add(adapters().entry(self.spec.adapter).plugin)
        dists = [_dists[p][0] for p in sorted(plugins) if p in _dists]
        versions = software_versions(dists)
        approximations = self.spec.fast_path("cpu").approximations()
        if approximations:
            versions["approximation"] = "+".join(approximations)
        return versions

    def load_metrics(self) -> dict[str, Any]:
        """Instantiate and load every requested metric; record the unavailable ones."""
        from adapterswap.plugins import get_metric

        loaded = {}
        for name in self.spec.metrics:
            metric = get_metric(name)(device=self.spec.device,
                                      **self.spec.metric_options.get(name, {}))
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

    def load_backbone(self, name: str) -> Any:
        from adapterswap.plugins import get_backbone

        cls = get_backbone(name)
        if self.spec.preset == "tiny":  # built on the CPU; moved where the spec asks
            backbone = cls.tiny(seed=0)
            return backbone.to(self.spec.device) if self.spec.device else backbone
        if self.spec.preset == "random":
            return cls.random(device=self.spec.device, dtype=self.spec.dtype)
        backbone = cls(self.spec.sources.get(name), device=self.spec.device,
                       dtype=self.spec.dtype)
        return backbone.load()

    def adapter_for(self, name: str, backbone: Any) -> Any:
        """One adapter object per name, shared by every backbone (attach moves it)."""
        from adapterswap.plugins import get_adapter

        if name not in self._adapters:
            cls = get_adapter(name)
            kwargs = {"scale": self.spec.scale, "start": self.spec.start, "end": self.spec.end,
                      **self.spec.adapter_options}
            if self.spec.preset == "tiny":
                adapter = cls.tiny(backbone, seed=0, **kwargs)
            elif self.spec.preset == "random":
                adapter = cls.random(backbone, seed=0, **kwargs)
            else:
                adapter = cls(self.spec.adapter_source, **kwargs)
            self._adapters[name] = adapter
        return self._adapters[name]

    def apply_setting(self, backbone: Any, cell: Cell) -> Any:
        """Attach (or detach) the adapter and set its scale and window for ``cell``."""
        if cell.adapter == "none":
            for adapter in self._adapters.values():
                if adapter.attached_to is backbone:
                    adapter.detach()
            return None
        adapter = self.adapter_for(cell.adapter, backbone)
        adapter.attach(backbone)
        adapter.set_scale(type(adapter).default_scale if cell.scale is None else cell.scale)
        adapter.set_window(cell.start, cell.end)
        return adapter

    def reference_image(self, ref: str, adapter_name: str) -> Any:
        from adapterswap.adapter import load_image
        from adapterswap.plugins import get_adapter

        cache_key = f"{adapter_name}|{ref}"
        if cache_key not in self._references:
            if ref.startswith("synthetic:"):
                image = get_adapter(adapter_name).tiny_reference(seed=int(ref.split(":")[1]))
            else:
                image = load_image(ref, argument="references")
            self._references[cache_key] = image
            self._save_reference(ref, image)
        return self._references[cache_key]

    def _reference_for(self, cell: Cell) -> Any:
        """The reference image of a cell (also for adapter-off cells, which keep theirs so
        that ablations pair by reference)."""
        if not cell.reference:
            return None
        from adapterswap.plugins import get_backbone

        name = cell.adapter if cell.adapter != "none" else \
            self.spec.adapter_for(get_backbone(cell.backbone))
        return self.reference_image(cell.reference, name) if name else None

    def _conditioning(self, adapter: Any, backbone: Any, cell: Cell) -> Any:
        """The adapter's encoding of the cell's reference, computed once per loaded backbone
        and reference (it does not depend on scale, window, prompt, seed or steps)."""
        if adapter is None:
            return None
        key = (id(backbone), adapter.name, cell.reference)
        if key not in self._conditionings:
            image = self._reference_input(cell, self._reference_for(cell))
            self._conditionings[key] = adapter.encode_reference(image, backbone)
        return self._conditionings[key]

    @staticmethod
    def _reference_input(cell: Cell, image: Any) -> Any:
        """What the adapter encodes: the file path for real references (so its errors name
        the file), the image for synthetic ones."""
        return image if cell.reference.startswith("synthetic:") else cell.reference

    def _save_reference(self, ref: str, image: Any) -> None:
        import hashlib

        folder = self.store.out / "references"
        folder.mkdir(exist_ok=True)
        name = hashlib.sha256(ref.encode()).hexdigest()[:16] + ".png"
        if not (folder / name).exists():
            image.save(folder / name)

    # ------------------------------------------------------------------ run
    def keyed_cells(self, versions: dict[str, str] | None = None) -> list[tuple[Cell, str]]:
        """Every cell of the spec with its key."""
        versions = self.versions() if versions is None else versions
        return [(cell, cell.key(versions)) for cell in self.spec.cells()]

    def run(self, *, only_keys: set[str] | None = None,
            finished_elsewhere: set[str] | None = None) -> SweepSummary:
        """Run every unfinished cell (or, for a distributed shard, those in ``only_keys``);
        cells in ``finished_elsewhere`` (other shards, the merged store) are skipped too."""
        start = time.perf_counter()
        versions = self.versions()
        keyed = self.keyed_cells(versions)
        finished = self.store.finished_keys() | (finished_elsewhere or set())
        mine = [(c, k) for c, k in keyed if only_keys is None or k in only_keys]
        todo = [(c, k) for c, k in mine if k not in finished]
        summary = SweepSummary(total=len(mine), skipped=len(mine) - len(todo))
        self.store.set_meta("spec", self.spec.to_dict())
        self.store.set_meta("versions", versions)
        self.store.set_meta("cell_keys", [k for _, k in keyed])
        metrics = self.load_metrics()
        summary.unavailable_metrics = {m: r for m, (ok, r) in self.store.metric_status().items()
                                       if not ok and m in self.spec.metrics}
        by_backbone: dict[str, list[tuple[Cell, str]]] = {}
        for cell, key in todo:
            by_backbone.setdefault(cell.backbone, []).append((cell, key))
        self._finisher = _Finisher(self.spec.use_overlap())
        try:
            for backbone_name, items in by_backbone.items():
                backbone = self.load_backbone(backbone_name)
                summary.fast_path[backbone_name] = self.enable_fast_path(backbone, items)
                prompt_cache: dict[str, TensorBundle] = {}
                by_setting: dict[tuple[Any, ...], list[tuple[Cell, str]]] = {}
                for cell, key in items:
                    by_setting.setdefault(cell.setting(), []).append((cell, key))
                for setting_items in by_setting.values():
                    adapter = self.apply_setting(backbone, setting_items[0][0])
                    if "latency" in metrics and self.spec.timing_repeats > 0:
                        self.measure_latency(backbone, adapter, setting_items)
                    groups: dict[tuple[Any, ...], list[tuple[Cell, str]]] = {}
                    for cell, key in setting_items:
                        groups.setdefault(cell.group(), []).append((cell, key))
                    for group_items in groups.values():
                        done, failed = self.run_group(backbone, adapter, group_items, metrics,
                                                      prompt_cache)
                        summary.done += done
                        summary.failed += failed
                self._finisher.drain()  # every cell of this backbone stored before unloading
                if backbone.block_cache is not None:
                    stats = backbone.block_cache.stats()
                    summary.fast_path[backbone_name]["block_cache"] = stats
                    self.store.set_meta(f"block_cache:{backbone_name}", stats)
                    self.log(f"{backbone_name}: block cache computed {stats['computed_steps']} "
                             f"steps, reused {stats['cached_steps']}")
                for adapter in self._adapters.values():
                    if adapter.attached_to is backbone:
                        adapter.detach()
                backbone.unload()
                self._conditionings.clear()
                self._timed.clear()
        except BaseException:
            # also on errors and Ctrl-C: cells already decoded are stored, never dropped
            try:
                self._finisher.close()
            except Exception as exc:  # the first error is the one to report
                self.log(f"while stopping, a finishing job failed too: {exc}")
            raise
        self._finisher.close()
        summary.done += self._finisher.done
        summary.failed += self._finisher.failed
        self._store_notes(metrics)
        summary.forward_seconds = self._forward_timer.total()
        summary.forwards = self._forward_timer.count
        summary.forward_span_seconds = self._forward_timer.span()
        summary.shared_first_steps = self._shared_forwards
        if self._shared_forwards:
            self.log(f"first step shared: {self._shared_forwards} image rows reused the output "
                     "of a row with the same seed and starting timestep")
        summary.finish_seconds = self._finish_seconds
        summary.decode_seconds = self._decode_seconds + self._decode_timer.total()
        summary.seconds = time.perf_counter() - start
        return summary

    def enable_fast_path(self, backbone: Any, items: Sequence[tuple[Cell, str]]) -> dict[
            str, Any]:
        """The spec's fast path on ``backbone`` and the adapters its cells use (loaded and
        attached first, so their modules are compiled or cast along)."""
        per_forward = max(1, min(self.spec.max_batch, len(self.spec.seeds)))
        forwards = sum(cell.steps for cell, _ in items) // per_forward
        fast = self.spec.fast_path(str(backbone.device), forwards,
                                   backbone.compile_repays(forwards, per_forward))
        adapters = []
        for name in sorted({cell.adapter for cell, _ in items} - {"none"}):
            adapter = self.adapter_for(name, backbone)
            adapter.attach(backbone)
            adapters.append(adapter)
        report = backbone.enable_fast_path(fast, adapters=adapters)
        if report.get("compiled"):
            self.log(f"{backbone.name}: compiling {'; '.join(report['compiled'])} "
                     f"(~{forwards} forwards planned; the first call per batch shape is slow)")
        if report.get("fp8_layers"):
            self.log(f"{backbone.name}: {report['fp8_layers']} linear layers in float8 "
                     "(approximation)")
        if report.get("cache"):
            self.log(f"{backbone.name}: block cache {report['cache']} (approximation)")
        return report

    def _store_notes(self, metrics: dict[str, Any]) -> None:
        """Metrics' caveats (e.g. how many images had no face), after scoring."""
        notes = [f"{name}: {note}" for name, metric in metrics.items()
                 for note in metric.notes()]
        self.store.set_meta("metric_notes", notes)

    def measure_latency(self, backbone: Any, adapter: Any,
                        items: Sequence[tuple[Cell, str]]) -> None:
        """Time one image per step count (batch 1, synchronised), once per store."""
        first = items[0][0]
        for steps in sorted({c.steps for c, _ in items}):
            if self.store.latency(first.backbone, first.adapter, steps, first.height,
                                  first.width, first.start, first.end) is not None:
                continue
            conditioning = self._conditioning(adapter, backbone, first)
            runs = []
            warmups = 0 if id(backbone) in self._timed else 1  # one warm-up per backbone
            self._timed.add(id(backbone))
            for i in range(warmups + max(1, self.spec.timing_repeats)):
                result = denoise(backbone, first.prompt, num_inference_steps=steps,
                                 seeds=[first.seed], height=first.height, width=first.width,
                                 guidance_scale=first.guidance_scale, adapter=adapter,
                                 conditioning=conditioning, output_type="pil")
                if i >= warmups:
                    runs.append(result.timings)
            total = sorted(r["total_s"] for r in runs)[len(runs) // 2]
            denoise_s = sorted(r["denoise_s"] for r in runs)[len(runs) // 2]
            self.store.record_latency(first.backbone, first.adapter, steps, first.height,
                                      first.width, total, denoise_s, len(runs),
                                      str(backbone.device), first.start, first.end)

    def run_group(self, backbone: Any, adapter: Any, items: Sequence[tuple[Cell, str]],
                  metrics: dict[str, Any], prompt_cache: dict[str, TensorBundle]) -> tuple[
                      int, int]:
        """All seeds and step counts of one (adapter setting, reference, prompt)."""
        first = items[0][0]
        guidance = backbone.resolve_guidance_scale(first.guidance_scale)
        backbone.check_inputs(num_inference_steps=max(c.steps for c, _ in items),
                              height=first.height, width=first.width, guidance_scale=guidance)
        if first.prompt not in prompt_cache:
            prompt_cache[first.prompt] = backbone.encode_prompt([first.prompt],
                                                                guidance_scale=guidance)
        prompt = prompt_cache[first.prompt]
        reference = self._reference_for(first)
        conditioning = self._conditioning(adapter, backbone, first)
        samples = [_Sample(cell, key, cell.steps) for cell, key in items]
        fast = backbone.fast_path
        parallel = self.spec.use_step_parallel(bool(fast is not None and fast.compile))
        if not parallel:
            samples.sort(key=lambda s: s.steps)
        done = failed = 0
        first_outputs: dict[Any, Any] = {}  # first-step outputs shared by step counts
        pending = self._chunks(samples, parallel)
        while pending:
            chunk = pending.pop(0)
            try:
                d, f = self._run_chunk(backbone, adapter, chunk, prompt, conditioning,
                                       reference, guidance, metrics, first_outputs)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                free_device_memory()
                self._finisher.drain()
                finished = self.store.finished_keys()
                rest = [s for s in chunk if s.key not in finished]
                if not self._finisher.overlap:  # overlapped jobs count their own cells
                    done += len(chunk) - len(rest)
                if len(rest) > 1:
                    half = (len(rest) + 1) // 2
                    self.log(f"out of memory at batch {len(chunk)}; retrying as "
                             f"{half} + {len(rest) - half}")
                    self._oom_retries += 1
                    self.store.set_meta("oom_retries", self._oom_retries)
                    pending[:0] = [rest[:half], rest[half:]]
                    continue
                for sample in rest:
                    self.store.record_cell(sample.key, sample.cell.config(), status="failed",
                                           scores={}, error=f"out of memory at batch 1: {exc}")
                    self.on_cell(sample.cell, "failed")
                failed += len(rest)
                continue
            done += d
            failed += f
        return done, failed

    def _chunks(self, samples: list[_Sample], parallel: bool) -> list[list[_Sample]]:
        size = self.spec.max_batch
        if parallel:
            return [samples[i:i + size] for i in range(0, len(samples), size)]
        chunks: list[list[_Sample]] = []
        by_steps: dict[int, list[_Sample]] = {}
        for sample in samples:
            by_steps.setdefault(sample.steps, []).append(sample)
        for group in by_steps.values():
            chunks += [group[i:i + size] for i in range(0, len(group), size)]
        return chunks

    def _run_chunk(self, backbone: Any, adapter: Any, chunk: list[_Sample],
                   prompt: TensorBundle, conditioning: TensorBundle | None, reference: Any,
                   guidance: float | None, metrics: dict[str, Any],
                   first_outputs: dict[Any, Any]) -> tuple[int, int]:
        import torch

        first = chunk[0].cell
        h, w = first.height, first.width
        generators = [torch.Generator(device=backbone.generator_device).manual_seed(s.cell.seed)
                      for s in chunk]
        latents = backbone.prepare_latents(generators, height=h, width=w)
        schedules = {n: backbone.schedule(n, height=h, width=w) for n in {s.steps for s in chunk}}
        trajectories: dict[int, list[Any]] = {j: [] for j, s in enumerate(chunk)
                                              if s.cell.trajectory}
        probes: dict[int, list[tuple[int, str, str, float]]] = {j: [] for j in
                                                                range(len(chunk))}
        recorder = self._install_probes(backbone, adapter) if first.probes else None
        plan = None if recorder is not None else \
            self._first_step_plan(backbone, adapter, chunk, schedules, first_outputs)
        active = list(range(len(chunk)))
        done = failed = 0
        tick = 0
        backbone.begin_run()
        with backbone.step_context():
            while active:
                steps_of = [chunk[j].steps for j in active]
                # rows the forward computes: at step 0 only those whose output is not known yet
                rows = plan[0] if tick == 0 and plan else list(range(len(active)))
                index = device_tensor(active, latents.device)
                current = latents.index_select(0, index)
                output = None
                if rows:
                    output = self._forward(backbone, adapter, current, rows, steps_of, tick,
                                           schedules, prompt, conditioning, guidance, h, w)
                if tick == 0 and plan:
                    output = self._first_step_outputs(output, plan, first_outputs)
                if recorder is not None:
                    for block, quantity, values in recorder.drain():
                        if len(values) != len(active):
                            self.log(f"probe {block}/{quantity} gave {len(values)} values for a "
                                     f"batch of {len(active)}; ignored")
                            continue
                        for r, value in enumerate(values):
                            probes[active[r]].append((tick, block, quantity, value))
                updated = torch.empty_like(current)
                for n in sorted(set(steps_of)):
                    rows = [r for r, s in enumerate(steps_of) if s == n]
                    sel = device_tensor(rows, current.device)
                    if any(active[r] in trajectories for r in rows):
                        x0 = backbone.predict_x0(output.index_select(0, sel),
                                                 current.index_select(0, sel), schedules[n], tick)
                        for k, r in enumerate(rows):
                            if active[r] in trajectories:
                                trajectories[active[r]].append(x0[k:k + 1].detach().cpu())
                    updated[sel] = backbone.step(output.index_select(0, sel),
                                                 current.index_select(0, sel), schedules[n], tick)
                latents[index] = updated
                tick += 1
                finishing = [j for j in active if chunk[j].steps == tick]
                if finishing:
                    sel = device_tensor(finishing, latents.device)
                    d, f = self._finish(backbone, [chunk[j] for j in finishing],
                                        latents.index_select(0, sel), reference, metrics,
                                        [trajectories.get(j) for j in finishing],
                                        [probes[j] for j in finishing])
                    done += d
                    failed += f
                going_on = [r for r, j in enumerate(active) if chunk[j].steps > tick]
                if len(going_on) < len(active) and going_on:
                    backbone.keep_rows(going_on)
                active = [active[r] for r in going_on]
        if recorder is not None:
            self._remove_probes(backbone, adapter)
        return done, failed

    def _forward(self, backbone: Any, adapter: Any, current: Any, rows: list[int],
                 steps_of: list[int], tick: int, schedules: dict[int, Any], prompt: TensorBundle,
                 conditioning: TensorBundle | None, guidance: float | None, h: int,
                 w: int) -> Any:
        """One timed adapter + denoiser forward of ``rows`` of the active batch ``current``."""
        import torch

        forward_steps = [steps_of[r] for r in rows]
        timesteps = torch.stack([schedules[n].timesteps[tick] for n in forward_steps])
        sigmas = None
        if all(schedules[n].sigmas is not None for n in forward_steps):
            sigmas = torch.stack([schedules[n].sigmas[tick] for n in forward_steps])
        ctx = StepContext(timesteps=timesteps, step_indices=(tick,) * len(rows),
                          num_steps=tuple(forward_steps), height=h, width=w, sigmas=sigmas)
        inputs = current if len(rows) == len(steps_of) else \
            current.index_select(0, device_tensor(rows, current.device))
        batch_prompt = prompt.repeat(len(rows))
        adapter_inputs = None
        timer = self._forward_timer.start()
        backbone.begin_step()
        if adapter is not None and conditioning is not None:
            adapter_inputs = adapter.denoiser_inputs(
                backbone, conditioning.repeat(len(rows)), inputs, ctx, batch_prompt)
        output = backbone.predict(inputs, ctx, batch_prompt, guidance_scale=guidance,
                                  adapter_inputs=adapter_inputs)
        self._forward_timer.stop(timer)
        return output

    def _first_step_plan(self, backbone: Any, adapter: Any, chunk: list[_Sample],
                         schedules: dict[int, Any],
                         known: dict[Any, Any]) -> tuple[list[int], list[Any]] | None:
        """Which rows of a chunk's first step need a forward. A row's first-step output is
        the same as another's when the inputs are: same seed (so the same latents; a group
        shares prompt, reference and adapter setting), equal :attr:`Schedule.first_step_key`
        and equal :meth:`Adapter.first_step_key`. Such outputs are kept for the whole group
        (``known``), so step counts run one after another (compiled sweeps) share them too.
        Returns the rows to compute and every row's key (``None``: never shared), or ``None``
        when nothing is shared. Off with a block cache (its stored residuals follow the
        batch); with probes this is not called (they record every row)."""
        if backbone.block_cache is not None:
            return None
        keys: list[Any] = []
        for sample in chunk:
            step_key = schedules[sample.steps].first_step_key
            adapter_key = None if adapter is None else adapter.first_step_key(sample.steps)
            shareable = step_key is not None and (adapter is None or adapter_key is not None)
            keys.append((sample.cell.seed, step_key, adapter_key) if shareable else None)
        compute: list[int] = []
        seen: set[Any] = set()
        for j, key in enumerate(keys):
            if key is None or (key not in known and key not in seen):
                compute.append(j)
                seen.add(key)
        if len(compute) == len(chunk):
            return None if all(k is None for k in keys) else (compute, keys)
        self._shared_forwards += len(chunk) - len(compute)
        return compute, keys

    @staticmethod
    def _first_step_outputs(output: Any, plan: tuple[list[int], list[Any]],
                            known: dict[Any, Any]) -> Any:
        """The first step's output of every row: computed rows from ``output`` (remembered in
        ``known`` under their key, copied: CUDA-graph outputs are overwritten by the next
        replay), the others from ``known``."""
        import torch

        compute, keys = plan
        position = {j: k for k, j in enumerate(compute)}
        for j, k in position.items():
            if keys[j] is not None and keys[j] not in known:
                known[keys[j]] = output[k:k + 1].clone()
        if len(compute) == len(keys):
            return output
        return torch.cat([output[position[j]:position[j] + 1] if j in position
                          else known[key] for j, key in enumerate(keys)])

    def _install_probes(self, backbone: Any, adapter: Any) -> Any:
        from adapterswap.probes import ProbeRecorder

        recorder = ProbeRecorder()
        installed = False
        for part in (backbone, adapter):
            if part is not None and part.supports_probes:
                part.set_probe(recorder)
                installed = True
        if not installed:
            self.log(f"no probes: neither {backbone.name!r} nor the adapter supports them")
            return None
        return recorder

    @staticmethod
    def _remove_probes(backbone: Any, adapter: Any) -> None:
        for part in (backbone, adapter):
            if part is not None and part.supports_probes:
                part.set_probe(None)

    def _score(self, images: list[Any], cells: list[Cell], reference: Any,
               timings: list[dict[str, float]], metrics: dict[str, Any],
               purpose: str = "final") -> list[dict[str, Any]]:
        """Scores of each image under every loaded metric that has what it needs."""
        scores: list[dict[str, float | None]] = [{} for _ in images]
        if not images:
            return scores
        batch = MetricBatch(images=images, references=[reference for _ in images],
                            prompts=[c.prompt for c in cells], baselines=None, timings=timings,
                            purpose=purpose)
        for name, metric in metrics.items():
            if "baseline" in metric.needs:
                continue  # baselines are compared in the analysis (ablations, swap)
            if "timing" in metric.needs and not all(timings):
                continue
            if "reference" in metric.needs and reference is None:
                continue
            try:
                values = metric.score(batch)
            except Exception as exc:
                self.store.set_metric_status(
                    name, False, f"failed while scoring: {type(exc).__name__}: {exc}")
                self.log(f"metric {name!r} failed: {exc}\n{traceback.format_exc()}")
                continue
            for slot, value in enumerate(values):
                scores[slot][name] = value
        return scores

    def _finish(self, backbone: Any, samples: list[_Sample], latents: Any, reference: Any,
                metrics: dict[str, Any], trajectories: list[list[Any] | None],
                probes: list[list[tuple[int, str, str, float]]]) -> tuple[int, int]:
        """Decode, score and commit finished samples (one transaction per cell).

        When finishing overlaps (:attr:`SweepSpec.overlap`), the decode is queued on the
        device here and everything after it (copy to host, images, metrics, store) runs on the
        finishing thread while this thread goes on with the next forwards; the counts then
        come from the finisher. Trajectories (which decode every step) finish inline."""
        if self._finisher.overlap and not any(trajectories):
            start = time.perf_counter()
            job = self._finish_later(backbone, samples, latents, reference, metrics, probes)
            self._finish_seconds += time.perf_counter() - start
            self._finisher.submit(job)
            return 0, 0
        backbone.synchronize()  # the queued forwards are not finishing time
        start = time.perf_counter()
        try:
            return self._finish_cells(backbone, samples, latents, reference, metrics,
                                      trajectories, probes)
        finally:
            self._finish_seconds += time.perf_counter() - start

    def _finish_later(self, backbone: Any, samples: list[_Sample], latents: Any,
                      reference: Any, metrics: dict[str, Any],
                      probes: list[list[tuple[int, str, str, float]]]) -> Callable[
                          [], tuple[int, int]]:
        """Queue the decode and the copies to the host; return the job that finishes the
        cells once they have arrived (no synchronisation on this thread)."""
        import contextlib

        import torch

        first = samples[0].cell
        stream = self._decode_stream(latents.device)
        context: Any = contextlib.nullcontext()
        if stream is not None:  # decode beside the next forwards, after this step's
            stream.wait_stream(torch.cuda.current_stream(latents.device))
            latents.record_stream(stream)  # its memory is not reused before the decode reads it
            context = torch.cuda.stream(stream)
        with context:
            timer = self._decode_timer.start()
            finite = torch.isfinite(latents.flatten(1)).all(dim=1)
            images = backbone.decode(latents, height=first.height, width=first.width,
                                     output_type="pt")  # non-finite rows are dropped later
            self._decode_timer.stop(timer)
            on_cuda = images.is_cuda
            host = torch.empty(images.shape, dtype=images.dtype, device="cpu",
                               pin_memory=on_cuda)
            host.copy_(images, non_blocking=on_cuda)
            finite_host = finite.to("cpu", non_blocking=on_cuda)
            ready = None
            if on_cuda:
                ready = torch.cuda.Event()
                ready.record()
        timings = self._timings(samples)

        def job() -> tuple[int, int]:
            begin = time.perf_counter()
            if ready is not None:
                ready.synchronize()
            flags = finite_host.tolist()
            pil = tensor_to_pil(host)
            try:
                return self._commit(samples, pil, flags, timings, reference, metrics,
                                    [None] * len(samples), probes)
            finally:
                self._finish_seconds += time.perf_counter() - begin

        return job

    def _timings(self, samples: list[_Sample]) -> list[dict[str, float]]:
        """The measured latency of each sample's setting and step count (``{}`` if none)."""
        return [self.store.latency(s.cell.backbone, s.cell.adapter, s.steps, s.cell.height,
                                   s.cell.width, s.cell.start, s.cell.end) or {}
                for s in samples]

    def _decode_stream(self, device: Any) -> Any:
        """The CUDA stream overlapped decodes run on (one per device), so a finished group's
        VAE decode shares the GPU with the next forwards instead of waiting in line before
        them; ``None`` off CUDA."""
        import torch

        if getattr(device, "type", str(device)) != "cuda":
            return None
        key = str(device)
        if key not in self._decode_streams:
            self._decode_streams[key] = torch.cuda.Stream(device)
        return self._decode_streams[key]

    def _finish_cells(self, backbone: Any, samples: list[_Sample], latents: Any,
                      reference: Any, metrics: dict[str, Any],
                      trajectories: list[list[Any] | None],
                      probes: list[list[tuple[int, str, str, float]]]) -> tuple[int, int]:
        import torch

        finite = torch.isfinite(latents.flatten(1)).all(dim=1).tolist()
        first = samples[0].cell
        ok = [i for i, good in enumerate(finite) if good]
        images: list[Any] = [None] * len(samples)
        if ok:
            sel = torch.as_tensor(ok, device=latents.device)
            begin = time.perf_counter()
            decoded = backbone.decode(latents.index_select(0, sel), height=first.height,
                                      width=first.width, output_type="pil")
            self._decode_seconds += time.perf_counter() - begin
            for slot, image in zip(ok, decoded):
                images[slot] = image
        timings = self._timings(samples)
        trajectory_rows = [self._trajectory(backbone, sample, trajectories[i], reference,
                                            metrics) if trajectories[i] and finite[i] else None
                           for i, sample in enumerate(samples)]
        return self._commit(samples, images, finite, timings, reference, metrics,
                            trajectory_rows, probes)

    def _commit(self, samples: list[_Sample], images: list[Any], finite: list[bool],
                timings: list[dict[str, float]], reference: Any, metrics: dict[str, Any],
                trajectories: list[dict[int, dict[str, Any]] | None],
                probes: list[list[tuple[int, str, str, float]]]) -> tuple[int, int]:
        """Score the finite images and store every cell (failed ones with the reason)."""
        ok = [i for i, good in enumerate(finite) if good]
        good_scores = self._score([images[i] for i in ok], [samples[i].cell for i in ok],
                                  reference, [timings[i] for i in ok], metrics)
        scores: list[dict[str, Any]] = [{} for _ in samples]
        for slot, value in zip(ok, good_scores):
            scores[slot] = value
        done = failed = 0
        for i, sample in enumerate(samples):
            config = sample.cell.config()
            if not finite[i]:
                self.store.record_cell(sample.key, config, status="failed", scores={},
                                       error="non-finite values (NaN/inf) in the final latents")
                failed += 1
                self.on_cell(sample.cell, "failed")
                continue
            image_path = self.store.save_image(sample.key, images[i]) \
                if self.spec.save_images else None
            self.store.record_cell(sample.key, config, status="done", scores=scores[i],
                                   image=image_path, timings=timings[i],
                                   trajectory=trajectories[i], probes=probes[i])
            done += 1
            self.on_cell(sample.cell, "done")
        return done, failed

    def _trajectory(self, backbone: Any, sample: _Sample, x0s: list[Any], reference: Any,
                    metrics: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Decode every step's predicted clean latent (batched) and score it."""
        import torch
        from PIL import Image

        cell = sample.cell
        previews: list[Any] = []
        device = backbone.device or "cpu"
        stacked = torch.cat(x0s)
        for i in range(0, len(stacked), self.spec.max_batch):
            part = stacked[i:i + self.spec.max_batch].to(device)
            previews += backbone.decode(part, height=cell.height, width=cell.width,
                                        output_type="pil")
        per_image = self._score(previews, [cell] * len(previews), reference,
                                [{} for _ in previews],
                                {n: m for n, m in metrics.items() if "timing" not in m.needs},
                                purpose="trajectory")
        thumb = min(128, cell.width)
        strip = Image.new("RGB", (thumb * len(previews), thumb), "white")
        for k, preview in enumerate(previews):
            strip.paste(preview.resize((thumb, thumb)), (k * thumb, 0))
        self.store.save_image(f"{sample.key}-trajectory", strip)
        return {step: values for step, values in enumerate(per_image)}


def run_sweep(spec: SweepSpec, *, on_cell: Callable[[Cell, str], None] | None = None,
              log: Callable[[str], None] | None = None) -> SweepSummary:
    """Validate, open the store under ``spec.out`` and run (resuming finished cells)."""
    spec.validate()
    with RunStore(spec.out) as store:
        return SweepEngine(spec, store, on_cell=on_cell, log=log).run()

