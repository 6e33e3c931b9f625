"""The step loop over a chunk: the engine owns the denoising loop, backbones expose the steps.

A chunk is at most ``max_batch`` images of one group (same backbone, adapter setting,
reference and prompt). Its rows advance together, one denoiser forward per tick with per-sample
timesteps (step-parallel: rows with fewer steps leave the batch as they finish); finished rows
go to the :class:`~adapterswap.sweep.finish.CellFinisher` at once. Rows whose first step has
the same inputs as another's (same seed, schedules that start alike) reuse its output
(:func:`adapterswap.sweep.plan.first_step_plan`). Probes and per-step predicted clean images
(trajectories) are recorded here, where they act. A chunk that runs out of memory is split in
two and retried; a single image that does is stored as failed. The fast path acts through the
backbone's accelerator (:class:`adapterswap.fastpath.Accelerator`), whose loop hooks the
runner calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from adapterswap.denoise import EAGER, StepContext, TensorBundle
from adapterswap.fastpath import ForwardTimer
from adapterswap.sweep.finish import CellFinisher, Probes, Sample
from adapterswap.sweep.plan import FirstStepPlan, chunks, first_step_key, first_step_plan
from adapterswap.sweep.spec import Cell
from adapterswap.tensors import device_tensor


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
class GroupInputs:
    """What every chunk of a group shares: the prompt encoding, the adapter's encoding of the
    reference, the reference image (for metrics) and the resolved guidance scale."""

    prompt: TensorBundle
    conditioning: TensorBundle | None
    reference: Any
    guidance: float | None
    #: the group's :class:`~adapterswap.enhancer.Enhancer` (``None``: none, or neutral)
    enhancer: Any = None


class ChunkRunner:
    """Runs groups of cells chunk by chunk on a loaded backbone.

    :param finisher: where finished rows go.
    :param max_batch: most images in one forward.
    """

    def __init__(self, store: Any, finisher: CellFinisher, *, max_batch: int,
                 log: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.finisher = finisher
        self.max_batch = max_batch
        self.log = log or (lambda message: None)
        self.forward_timer = ForwardTimer()
        #: first-step rows not computed (their output was another row's)
        self.shared_first_steps = 0
        self.oom_retries = 0
        #: cells run with a confound, per flag
        self.confounds: dict[str, int] = {}
        self._schedule_facts: dict[Any, dict[str, Any]] = {}
        #: denoiser forwards per image of the last computed step (rows whose first step was
        #: another row's count what it took)
        self._tick_forwards = 0

    def run_group(self, backbone: Any, adapter: Any, items: Sequence[tuple[Cell, str]],
                  inputs: GroupInputs, *, step_parallel: bool,
                  timings: dict[int, dict[str, float]] | None = None,
                  accelerator: Any = None) -> tuple[int, int]:
        """All seeds and step counts of one group; returns ``(done, failed)`` counted here.
        ``timings``: the latency of the group's setting per step count; ``accelerator``: the
        backbone's :class:`~adapterswap.fastpath.Accelerator` (``None``: plain eager)."""
        timings = timings or {}
        hooks = EAGER if accelerator is None else accelerator
        samples = [Sample(cell, key, cell.steps, dict(timings.get(cell.steps) or {}))
                   for cell, key in items]
        done = failed = 0
        first_outputs: dict[Any, Any] = {}  # first-step outputs shared by step counts
        pending = chunks(samples, step_parallel=step_parallel, max_batch=self.max_batch)
        while pending:
            chunk = pending.pop(0)
            try:
                d, f = self.run_chunk(backbone, adapter, chunk, inputs, first_outputs, hooks)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                free_device_memory()
                self.finisher.drain()
                finished = self.store.finished_keys()
                rest = [s for s in chunk if s.key not in finished]
                if not self.finisher.overlap:  # overlapped jobs count their own cells
                    done += len(chunk) - len(rest)
                if len(rest) > 1:
                    half = (len(rest) + 1) // 2
                    self.log(f"out of memory at batch {len(chunk)}; retrying as "
                             f"{half} + {len(rest) - half}")
                    self.oom_retries += 1
                    self.store.set_meta("oom_retries", self.oom_retries)
                    pending[:0] = [rest[:half], rest[half:]]
                    continue
                self.finisher.record_failed(rest, f"out of memory at batch 1: {exc}")
                failed += len(rest)
                continue
            done += d
            failed += f
        return done, failed

    def describe(self, sample: Sample, backbone: Any, adapter: Any, schedule: Any) -> None:
        """What the cell actually ran, into its ``extra`` columns: the timesteps and sigmas
        of its schedule, the noise share its first step assumes, how many steps the adapter
        acted, and confound flags (a schedule that starts far from noise; an adapter window
        that never opens: an adapter-off cell under an adapter label)."""
        from adapterswap.adapter import window_confounds
        from adapterswap.denoise import schedule_confounds

        if "confounds" in sample.extra:
            return  # described before (a chunk retried after running out of memory)
        key = (id(backbone), sample.steps, sample.cell.height, sample.cell.width)
        if key not in self._schedule_facts:  # one host copy per step count, before the loop
            sigmas = schedule.sigmas
            self._schedule_facts[key] = {
                "timesteps": [float(t) for t in schedule.timesteps.tolist()],
                "sigmas": None if sigmas is None else [float(v) for v in sigmas.tolist()],
                "start_noise": schedule.start_noise,
                "flags": schedule_confounds(schedule)}
        facts = self._schedule_facts[key]
        flags = list(facts["flags"])
        active = None
        if adapter is not None and sample.cell.adapter != "none":
            active = adapter.active_steps(sample.steps)
            flags += window_confounds(adapter, sample.steps)
        sample.extra.update(timesteps=facts["timesteps"], sigmas=facts["sigmas"],
                            start_noise=facts["start_noise"], adapter_active_steps=active,
                            confounds=flags, enhancer=sample.cell.enhancer, forwards=0)
        for flag in flags:
            self.confounds[flag] = self.confounds.get(flag, 0) + 1

    def run_chunk(self, backbone: Any, adapter: Any, chunk: list[Sample], inputs: GroupInputs,
                  first_outputs: dict[Any, Any], hooks: Any = EAGER) -> tuple[int, int]:
        """Denoise ``chunk`` from its seeds' noise to the end; finish rows as they end.
        Each row's generator first serves the adapter's own draws
        (:meth:`Adapter.draw_before_latents <adapterswap.adapter.Adapter.draw_before_latents>`),
        whose rows travel with the chunk's rows in their conditioning, then the backbone's
        starting noise. ``hooks``: the backbone's accelerator
        (:data:`adapterswap.denoise.EAGER`: none)."""
        import torch

        first = chunk[0].cell
        h, w = first.height, first.width
        generators = [torch.Generator(device=backbone.generator_device).manual_seed(s.cell.seed)
                      for s in chunk]
        # the adapter's own per-row draws (Adapter.draw_before_latents) come first; its rows
        # join the conditioning of each row (one row per chunk sample)
        conditioning = None
        if adapter is not None and inputs.conditioning is not None:
            drawn = adapter.draw_before_latents(generators, backbone, height=h, width=w)
            if drawn is not None:
                conditioning = inputs.conditioning.repeat(len(chunk)).merged(drawn)
        latents = backbone.prepare_latents(generators, height=h, width=w)
        schedules = {n: backbone.schedule(n, height=h, width=w) for n in {s.steps for s in chunk}}
        for sample in chunk:
            self.describe(sample, backbone, adapter, schedules[sample.steps])
        trajectories: dict[int, list[Any]] = {j: [] for j, s in enumerate(chunk)
                                              if s.cell.trajectory}
        probes: dict[int, Probes] = {j: [] for j in range(len(chunk))}
        recorder = self._install_probes(backbone, adapter) if first.probes else None
        # not with probes (they record every row), a block cache (its stored residuals
        # follow the batch) or an enhancer (its first step may depend on the step count)
        plan = None if recorder is not None or hooks.block_cache is not None \
            or inputs.enhancer is not None else \
            self._first_step_plan(backbone, adapter, chunk, schedules, first_outputs)
        if plan is not None:
            self.shared_first_steps += plan.shared
        active = list(range(len(chunk)))
        done = failed = 0
        tick = 0
        hooks.begin_run()
        enhancer = inputs.enhancer
        if enhancer is not None:
            enhancer.attach(backbone, adapter)
        with hooks.step_context(), _detaching(enhancer):
            while active:
                steps_of = [chunk[j].steps for j in active]
                # rows the forward computes: at step 0 only those whose output is not known yet
                rows = plan.compute if tick == 0 and plan else list(range(len(active)))
                index = device_tensor(active, latents.device)
                current = latents.index_select(0, index)
                output = None
                if rows:
                    row_conditioning = None if conditioning is None else \
                        conditioning.select([active[r] for r in rows])
                    output, forwards = self._forward(backbone, adapter, current, rows,
                                                     steps_of, tick, schedules, inputs, h, w,
                                                     hooks, row_conditioning)
                    self._tick_forwards = forwards
                for j in active:  # what each image needed (also where a row's was shared)
                    chunk[j].extra["forwards"] += self._tick_forwards
                if tick == 0 and plan:
                    output = self._first_step_outputs(output, plan, first_outputs)
                if recorder is not None:
                    self._collect_probes(recorder, active, probes, tick)
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
                    d, f = self.finisher.finish(backbone, [chunk[j] for j in finishing],
                                                latents.index_select(0, sel), inputs.reference,
                                                [trajectories.get(j) for j in finishing],
                                                [probes[j] for j in finishing])
                    done += d
                    failed += f
                going_on = [r for r, j in enumerate(active) if chunk[j].steps > tick]
                if len(going_on) < len(active) and going_on:
                    hooks.keep_rows(going_on)
                active = [active[r] for r in going_on]
        if recorder is not None:
            self._remove_probes(backbone, adapter)
        return done, failed

    def _forward(self, backbone: Any, adapter: Any, current: Any, rows: list[int],
                 steps_of: list[int], tick: int, schedules: dict[int, Any],
                 inputs: GroupInputs, h: int, w: int, hooks: Any = EAGER,
                 conditioning: TensorBundle | None = None) -> tuple[Any, int]:
        """One timed step prediction of ``rows`` of the active batch ``current`` (the adapter,
        the denoiser, and the group's enhancer's extra forwards), and the denoiser forwards
        per image it took; ``conditioning``: these rows' own conditioning (with the adapter's
        per-row draws), else the group's, repeated."""
        import torch

        from adapterswap.enhancer import predict_step

        forward_steps = [steps_of[r] for r in rows]
        timesteps = torch.stack([schedules[n].timesteps[tick] for n in forward_steps])
        sigmas = None
        if all(schedules[n].sigmas is not None for n in forward_steps):
            sigmas = torch.stack([schedules[n].sigmas[tick] for n in forward_steps])
        ctx = StepContext(timesteps=timesteps, step_indices=(tick,) * len(rows),
                          num_steps=tuple(forward_steps), height=h, width=w, sigmas=sigmas)
        batch = current if len(rows) == len(steps_of) else \
            current.index_select(0, device_tensor(rows, current.device))
        batch_prompt = inputs.prompt.repeat(len(rows))
        timer = self.forward_timer.start()
        hooks.begin_step()
        if adapter is not None and inputs.conditioning is not None and conditioning is None:
            conditioning = inputs.conditioning.repeat(len(rows))
        output, forwards = predict_step(
            backbone, adapter, conditioning if adapter is not None else None, batch, ctx,
            batch_prompt, inputs.guidance, inputs.enhancer)
        self.forward_timer.stop(timer)
        return output, forwards

    # ------------------------------------------------------------------ shared first step
    def _first_step_plan(self, backbone: Any, adapter: Any, chunk: list[Sample],
                         schedules: dict[int, Any],
                         known: dict[Any, Any]) -> FirstStepPlan | None:
        """Which rows of a chunk's first step need a forward. A row's first-step output is
        the same as another's when the inputs are: same seed (so the same latents and the
        same adapter draws, :meth:`Adapter.draw_before_latents`; a group shares prompt,
        reference and adapter setting), equal :attr:`Schedule.first_step_key`
        and equal :meth:`Adapter.first_step_key`. Such outputs are kept for the whole group
        (``known``), so step counts run one after another (compiled sweeps) share them too.
        Not called with probes (they record every row) or a block cache (its stored residuals
        follow the batch)."""
        keys = [first_step_key(sample.cell.seed, schedules[sample.steps].first_step_key,
                               None if adapter is None else adapter.first_step_key(sample.steps),
                               adapter is not None)
                for sample in chunk]
        return first_step_plan(keys, known)

    @staticmethod
    def _first_step_outputs(output: Any, plan: FirstStepPlan, known: dict[Any, Any]) -> Any:
        """The first step's output of every row: computed rows from ``output`` (remembered in
        ``known`` under their key, copied: CUDA-graph outputs are overwritten by the next
        replay), the others from ``known``."""
        import torch

        position = {j: k for k, j in enumerate(plan.compute)}
        for j, k in position.items():
            if plan.keys[j] is not None and plan.keys[j] not in known:
                known[plan.keys[j]] = output[k:k + 1].clone()
        if len(plan.compute) == len(plan.keys):
            return output
        return torch.cat([output[position[j]:position[j] + 1] if j in position
                          else known[key] for j, key in enumerate(plan.keys)])

    # ------------------------------------------------------------------ probes
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

    def _collect_probes(self, recorder: Any, active: list[int], probes: dict[int, Probes],
                        tick: int) -> None:
        for block, quantity, values in recorder.drain():
            if len(values) != len(active):
                self.log(f"probe {block}/{quantity} gave {len(values)} values for a "
                         f"batch of {len(active)}; ignored")
                continue
            for r, value in enumerate(values):
                probes[active[r]].append((tick, block, quantity, value))

    @staticmethod
    def _remove_probes(backbone: Any, adapter: Any) -> None:
        for part in (backbone, adapter):
            if part is not None and part.supports_probes:
                part.set_probe(None)


@contextlib.contextmanager
def _detaching(enhancer: Any) -> Iterator[None]:
    """Detach ``enhancer`` (if any) when a chunk's steps end, also on an error."""
    try:
        yield
    finally:
        if enhancer is not None:
            enhancer.detach()
