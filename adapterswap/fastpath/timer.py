"""Timing the denoiser forwards of a sweep without synchronising inside the loop."""

from __future__ import annotations

from typing import Any


class ForwardTimer:
    """Sums the time of the denoiser forwards of a run without synchronising inside the loop:
    on CUDA each forward is bracketed by a pair of events, read once at the end (:meth:`total`);
    elsewhere the wall clock is used (CPU work is synchronous)."""

    def __init__(self) -> None:
        self._events: list[tuple[Any, Any]] = []
        self._seconds = 0.0
        self.count = 0
        self._first: Any = None  # the first forward's start, the last one's end
        self._last: Any = None

    def start(self) -> Any:
        import time

        import torch

        self.count += 1
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        else:
            begin = time.perf_counter()
        if self._first is None:
            self._first = begin
        return begin

    def stop(self, begin: Any) -> None:
        import time

        import torch

        if isinstance(begin, float):
            self._last = time.perf_counter()
            self._seconds += self._last - begin
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((begin, end))
        self._last = end

    def total(self) -> float:
        """Seconds spent in forwards so far (synchronises once on CUDA)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(b.elapsed_time(e) for b, e in self._events) / 1000
            self._events = []
        return self._seconds

    def span(self) -> float:
        """Seconds from the first forward's start to the last one's end (0 before any): the
        sweep's wall time outside it went to work before the first forward and after the
        last; inside it, less the forwards, to work between them."""
        if self._first is None or self._last is None:
            return 0.0
        if isinstance(self._first, float):
            return self._last - self._first
        self._last.synchronize()
        return self._first.elapsed_time(self._last) / 1000
