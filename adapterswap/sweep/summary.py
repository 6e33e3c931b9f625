"""What a sweep did (:class:`SweepSummary`), and how the summaries of parallel workers add up.

One process, torchrun ranks and Ray workers fill it the same way: each worker's totals
(:func:`step_totals` of its step loop and finisher) go in through :meth:`SweepSummary.add`.
Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapterswap.sweep.finish import CellFinisher
    from adapterswap.sweep.runner import ChunkRunner

__all__ = ["WORKER_TIMES", "SweepSummary", "step_totals"]

#: The summary's times that parallel workers spend side by side: they do not add up, so a
#: sweep's are its slowest worker's.
WORKER_TIMES = ("seconds", "load_seconds", "latency_seconds", "forward_seconds",
                "forward_span_seconds", "finish_seconds", "decode_seconds", "finish_overlapped")


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
    #: True when cells were finished on the background thread, beside the forwards: then
    #: ``finish_seconds`` is not part of the engine thread's wall time
    finish_overlapped: bool = False
    #: seconds loading models (backbones, adapters, fast path set-up) and metrics
    load_seconds: float = 0.0
    #: seconds of latency timing (warm-ups and timed single-image runs)
    latency_seconds: float = 0.0
    #: what the fast path did per backbone (attention, compiled parts, float8 layers, the
    #: compile profile that decided, block-cache counts)
    fast_path: dict[str, Any] = field(default_factory=dict)
    #: cells run with a confound, per flag (``schedule_starts_far_from_noise``,
    #: ``window_never_opens``): see :func:`adapterswap.denoise.schedule_confounds`
    confounds: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The summary as the run's row stores it (``runs.summary``): every field, plus
        ``other_seconds``."""
        from dataclasses import asdict

        return {**asdict(self), "other_seconds": self.other_seconds}

    @property
    def other_seconds(self) -> float:
        """The wall time outside the measured parts (planning, provenance, prompt and
        reference encoding, waiting for finishing jobs, unloading), so that load + latency +
        forwards + finishing (when inline) + other = :attr:`seconds`. On CUDA the forwards
        are device time, which can overlap host work, so this can dip below zero there."""
        finish = 0.0 if self.finish_overlapped else self.finish_seconds
        return (self.seconds - self.load_seconds - self.latency_seconds
                - self.forward_seconds - finish)

    def add(self, parts: Sequence[Mapping[str, Any]], *, slowest_by: str = "seconds") -> None:
        """Add up what workers did (each part: a worker's totals or a summary's fields; one
        process has one part): cells done and failed, forwards, shared first steps, fast paths,
        unavailable metrics and confounds; the times (:data:`WORKER_TIMES`) that a part has are
        the slowest part's, the one with the most ``slowest_by`` seconds."""
        for part in parts:
            self.done += part.get("done", 0)
            self.failed += part.get("failed", 0)
            self.forwards += part.get("forwards", 0)
            self.shared_first_steps += part.get("shared_first_steps", 0)
            self.fast_path.update(part.get("fast_path", {}))
            self.unavailable_metrics.update(part.get("unavailable_metrics", {}))
            for flag, count in part.get("confounds", {}).items():
                self.confounds[flag] = self.confounds.get(flag, 0) + count
        if parts:
            slowest = max(parts, key=lambda part: part.get(slowest_by, 0.0))
            for name in WORKER_TIMES:
                if name in slowest:
                    setattr(self, name, slowest[name])


def step_totals(runner: ChunkRunner, finisher: CellFinisher) -> dict[str, Any]:
    """A step loop's and its finisher's part of the summary: forwards, their seconds and
    span, first steps shared, finishing and decoding seconds, confounds."""
    timer = runner.forward_timer
    return {"forward_seconds": timer.total(), "forwards": timer.count,
            "forward_span_seconds": timer.span(),
            "shared_first_steps": runner.shared_first_steps, "finish_seconds": finisher.seconds,
            "decode_seconds": finisher.decode_seconds, "finish_overlapped": finisher.overlap,
            "confounds": dict(runner.confounds)}
