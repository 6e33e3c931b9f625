"""Finishing cells: decode, score and store, off the critical path where it can be.

A cell is finished once: its image is written (temp file + rename) before the one transaction
that records its row, scores, trajectory and probes commits, so ``kill -9`` loses at most the
cells in flight. With ``overlap`` the decode is queued on the device (its own CUDA stream) and
everything after it (copy to host, images, metrics, store) runs on one background thread while
the engine goes on with the next forwards; an error there stops the sweep at the next submit.

Metrics score the decoded images in memory, never the files: the image format (``png``,
lossless ``webp``, lossy ``jpeg``: :mod:`adapterswap.sweep.images_io`) changes no score. A
chunk's images (and their grid thumbnails) are encoded on a few threads while the chunk is
scored; each cell's file is then written before its transaction commits.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapterswap.fastpath import ForwardTimer
from adapterswap.metrics.base import MetricBatch
from adapterswap.sweep.images_io import IMAGE_FORMATS, ImageEncoder
from adapterswap.sweep.spec import Cell

Probes = list[tuple[int, str, str, float]]


@dataclass
class Sample:
    """One image of a chunk: its cell, key and step count, the latency ``timings`` of its
    setting and step count (``{}``: none), and ``extra`` per-cell columns the runner fills
    (run id, timesteps, sigmas, start noise, adapter active steps, confound flags)."""

    cell: Cell
    key: str
    steps: int
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def tensor_to_pil(images: Any) -> list[Any]:
    """``(B, 3, H, W)`` images in [0, 1] to PIL images, rounding as diffusers'
    ``output_type="pil"`` does (so overlapped finishing stores the same pixels)."""
    import numpy as np
    from PIL import Image

    array = images.permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


def record_cell(store: Any, cell: Cell, key: str, *, status: str,
                scores: Mapping[str, float | None], image: str | None,
                timings: Mapping[str, float] | None, extra: Mapping[str, Any] | None,
                error: str | None = None,
                trajectory: Mapping[int, Mapping[str, float | None]] | None = None,
                probes: Sequence[tuple[int, str, str, float]] | None = None) -> None:
    """The one place a cell's row is built and committed (one transaction)."""
    store.record_cell(key, cell.config(), status=status, scores=scores, image=image,
                      timings=timings, error=error, trajectory=trajectory, probes=probes,
                      **({"extra": dict(extra)} if extra else {}))


class FinishQueue:
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


class CellFinisher:
    """Decodes, scores and stores finished samples (one transaction per cell).

    :param metrics: the loaded metrics, by name.
    :param overlap: finish on the background thread (see the module docstring).
    :param image_format: ``png``, ``webp`` or ``jpeg`` (:data:`~adapterswap.sweep.images_io.
        IMAGE_FORMATS`), recorded in the store's meta ``image_formats``.
    :param on_cell: called with each stored cell and its status (``done``/``failed``).
    """

    def __init__(self, store: Any, metrics: Mapping[str, Any], *, overlap: bool,
                 save_images: bool = True, max_batch: int = 16,
                 on_cell: Callable[[Cell, str], None] | None = None,
                 log: Callable[[str], None] | None = None,
                 image_format: str = "png") -> None:
        self.store = store
        self.metrics = dict(metrics)
        self.save_images = save_images
        self.encoder = ImageEncoder(image_format)  # validates the name
        if save_images:
            formats = store.meta("image_formats", {})
            formats[image_format] = IMAGE_FORMATS[image_format].record()
            store.set_meta("image_formats", formats)
        self.max_batch = max_batch
        self.on_cell = on_cell or (lambda cell, status: None)
        self.log = log or (lambda message: None)
        self.queue = FinishQueue(overlap)
        #: host seconds finishing (decode, scoring, storing) and decoding
        self.seconds = 0.0
        self._decode_seconds = 0.0
        self._decode_timer = ForwardTimer()
        self._decode_streams: dict[str, Any] = {}

    @property
    def overlap(self) -> bool:
        return self.queue.overlap

    @property
    def decode_seconds(self) -> float:
        """Seconds decoding (device time from CUDA events for decodes on the side stream)."""
        return self._decode_seconds + self._decode_timer.total()

    def drain(self) -> None:
        self.queue.drain()

    def close(self) -> None:
        try:
            self.queue.close()
        finally:
            self.encoder.close()

    # ------------------------------------------------------------------ finishing
    def finish(self, backbone: Any, samples: list[Sample], latents: Any, reference: Any,
               trajectories: list[list[Any] | None], probes: list[Probes]) -> tuple[int, int]:
        """Decode, score and commit finished samples; returns ``(done, failed)`` counted here
        (overlapped jobs count theirs in :attr:`queue`). Trajectories (which decode every
        step) finish inline."""
        if self.overlap and not any(trajectories):
            start = time.perf_counter()
            job = self._finish_later(backbone, samples, latents, reference, probes)
            self.seconds += time.perf_counter() - start
            self.queue.submit(job)
            return 0, 0
        backbone.synchronize()  # the queued forwards are not finishing time
        start = time.perf_counter()
        try:
            return self._finish_now(backbone, samples, latents, reference, trajectories, probes)
        finally:
            self.seconds += time.perf_counter() - start

    def _finish_later(self, backbone: Any, samples: list[Sample], latents: Any,
                      reference: Any, probes: list[Probes]) -> Callable[[], tuple[int, int]]:
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

        def job() -> tuple[int, int]:
            begin = time.perf_counter()
            if ready is not None:
                ready.synchronize()
            flags = finite_host.tolist()
            pil = tensor_to_pil(host)
            try:
                return self._commit(samples, pil, flags, reference, [None] * len(samples),
                                    probes)
            finally:
                self.seconds += time.perf_counter() - begin

        return job

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

    def _finish_now(self, backbone: Any, samples: list[Sample], latents: Any, reference: Any,
                    trajectories: list[list[Any] | None], probes: list[Probes]) -> tuple[
                        int, int]:
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
        trajectory_rows = [self._trajectory(backbone, sample, trajectories[i], reference)
                           if trajectories[i] and finite[i] else None
                           for i, sample in enumerate(samples)]
        return self._commit(samples, images, finite, reference, trajectory_rows, probes)

    def _commit(self, samples: list[Sample], images: list[Any], finite: list[bool],
                reference: Any, trajectories: list[dict[int, dict[str, Any]] | None],
                probes: list[Probes]) -> tuple[int, int]:
        """Score the finite images and store every cell (failed ones with the reason); the
        images are encoded on the encoder's threads meanwhile."""
        ok = [i for i, good in enumerate(finite) if good]
        encoded = {i: self.encoder.submit(images[i]) for i in ok} if self.save_images else {}
        try:
            good_scores = self.score([images[i] for i in ok], [samples[i].cell for i in ok],
                                     reference, [samples[i].timings for i in ok])
            scores: list[dict[str, Any]] = [{} for _ in samples]
            for slot, value in zip(ok, good_scores):
                scores[slot] = value
            done = failed = 0
            for i, sample in enumerate(samples):
                if not finite[i]:
                    record_cell(self.store, sample.cell, sample.key, status="failed",
                                scores={}, image=None, timings=None, extra=sample.extra,
                                error="non-finite values (NaN/inf) in the final latents")
                    failed += 1
                    self.on_cell(sample.cell, "failed")
                    continue
                image_path = self.store.save_image(sample.key, encoded[i].result()) \
                    if self.save_images else None
                record_cell(self.store, sample.cell, sample.key, status="done",
                            scores=scores[i], image=image_path, timings=sample.timings,
                            extra=sample.extra, trajectory=trajectories[i], probes=probes[i])
                done += 1
                self.on_cell(sample.cell, "done")
            return done, failed
        finally:
            for future in encoded.values():
                future.cancel()  # after an error: the cells not stored need no file

    def record_failed(self, samples: Sequence[Sample], error: str) -> None:
        """Store cells that could not run (e.g. out of memory at batch 1)."""
        for sample in samples:
            record_cell(self.store, sample.cell, sample.key, status="failed", scores={},
                        image=None, timings=None, extra=sample.extra, error=error)
            self.on_cell(sample.cell, "failed")

    # ------------------------------------------------------------------ scoring
    def score(self, images: list[Any], cells: list[Cell], reference: Any,
              timings: list[dict[str, float]], metrics: Mapping[str, Any] | None = None,
              purpose: str = "final") -> list[dict[str, Any]]:
        """Scores of each image under every loaded metric that has what it needs."""
        metrics = self.metrics if metrics is None else metrics
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
                if any(c.reference for c in cells):  # an embedding: no image to compare
                    for slot in range(len(images)):
                        scores[slot][name] = None
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

    def _trajectory(self, backbone: Any, sample: Sample, x0s: list[Any],
                    reference: Any) -> dict[int, dict[str, Any]]:
        """Decode every step's predicted clean latent (batched) and score it."""
        import torch
        from PIL import Image

        cell = sample.cell
        previews: list[Any] = []
        device = backbone.device or "cpu"
        stacked = torch.cat(x0s)
        for i in range(0, len(stacked), self.max_batch):
            part = stacked[i:i + self.max_batch].to(device)
            previews += backbone.decode(part, height=cell.height, width=cell.width,
                                        output_type="pil")
        per_image = self.score(previews, [cell] * len(previews), reference,
                               [{} for _ in previews],
                               {n: m for n, m in self.metrics.items() if "timing" not in m.needs},
                               purpose="trajectory")
        thumb = min(128, cell.width)
        strip = Image.new("RGB", (thumb * len(previews), thumb), "white")
        for k, preview in enumerate(previews):
            strip.paste(preview.resize((thumb, thumb)), (k * thumb, 0))
        self.store.save_image(f"{sample.key}-trajectory", strip)
        return {step: values for step, values in enumerate(per_image)}
