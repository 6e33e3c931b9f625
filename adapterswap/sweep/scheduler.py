"""Dynamic scheduling of a sweep over workers that come and go: pure, no Ray, no torch.

The driver of a multi-worker sweep (:mod:`adapterswap.sweep.ray_backend`) plans once and asks
this scheduler, each time a worker has room, for its next chunk (torchrun's shared queue,
:mod:`adapterswap.sweep.workqueue`, starts from its groups and follows the same rules):

1. chunks of a worker that died, retried first (a chunk is dropped after ``max_attempts``
   workers died running it: :meth:`ChunkScheduler.lose` returns it as given up, so the driver
   can store its cells as failed instead of killing every worker in turn);
2. the next chunk of a group the worker already holds (its encodings are reused);
3. a new group, longest first (estimated cost: steps x pixels, :func:`~adapterswap.sweep.plan.
   cell_cost`), among the groups of the backbone the worker has loaded, else overall;
4. when no group is left: work stealing at chunk granularity, the last not-yet-started
   chunk of the worker with the most work left (same backbone first).

A group is cut into chunks exactly as one process batches it (:func:`~adapterswap.sweep.plan.
chunks`: at most ``max_batch`` images per forward), so a chunk is one forward batch and a
group that no one steals from runs in the same batches as in one process.

Results are accepted at most once (:meth:`ChunkScheduler.accept`): a cell is written when its
first result arrives; any later one (a retried chunk whose first worker was only slow) is
dropped. A cell is never lost: a chunk leaves the scheduler only when its worker reports it
finished, or when the worker is lost and the chunk is handed out again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from adapterswap.sweep.plan import Keyed, cell_cost, chunks, plan_sweep


@dataclass(frozen=True)
class Chunk:
    """Cells of one group that run as one forward batch, on one worker."""

    id: int
    group: int
    items: tuple[Keyed, ...]

    @property
    def backbone(self) -> str:
        return self.items[0][0].backbone

    @property
    def cost(self) -> float:
        return sum(cell_cost(cell) for cell, _ in self.items)

    @property
    def keys(self) -> list[str]:
        return [key for _, key in self.items]


@dataclass
class _Row:
    """A cell and its key, with the ``steps`` that :func:`chunks` orders by."""

    item: Keyed

    @property
    def steps(self) -> int:
        return self.item[0].steps


@dataclass
class _Worker:
    #: not yet handed out chunks of the groups this worker took
    queued: deque[Chunk] = field(default_factory=deque)
    in_flight: dict[int, Chunk] = field(default_factory=dict)


class ChunkScheduler:
    """Hands out the unfinished cells of ``keyed`` as chunks (see the module docstring).

    :param finished: keys already finished (resume): never handed out.
    :param step_parallel: cut groups as step-parallel batches (in order) or one step count at
        a time (:func:`~adapterswap.sweep.plan.chunks`).
    :param max_attempts: workers that may die running a chunk before it is given up.
    """

    def __init__(self, keyed: Sequence[Keyed], finished: set[str] | frozenset[str] = frozenset(),
                 *, max_batch: int, step_parallel: bool = True, max_attempts: int = 2) -> None:
        plan = plan_sweep(keyed, finished)
        self.total = plan.total
        self.skipped = plan.skipped
        self.max_attempts = max_attempts
        self._groups: dict[int, list[Chunk]] = {}
        next_id = 0
        for index, group in enumerate(g for b in plan.backbones for s in b.settings
                                      for g in s.groups):
            rows = [_Row(item) for item in group.items]
            parts = chunks(rows, step_parallel=step_parallel, max_batch=max_batch)
            self._groups[index] = [Chunk(next_id + i, index, tuple(r.item for r in part))
                                   for i, part in enumerate(parts)]
            next_id += len(parts)
        #: groups no worker has taken, longest first (ties: smallest key first)
        self._queue = sorted(self._groups, key=lambda g: (
            -sum(c.cost for c in self._groups[g]), min(k for c in self._groups[g]
                                                       for k in c.keys)))
        self._retry: deque[Chunk] = deque()
        self._workers: dict[object, _Worker] = {}
        self._attempts: dict[int, int] = {}
        self._recorded: set[str] = set()
        #: how many chunks were stolen (for the summary and the tests)
        self.stolen = 0
        self.retried = 0

    def groups(self) -> list[list[Chunk]]:
        """Every group's chunks, in the order new groups are handed out (longest first): the
        plan a shared queue (:mod:`adapterswap.sweep.workqueue`) starts from."""
        return [list(self._groups[g]) for g in self._queue]

    # ------------------------------------------------------------------ handing out
    def next_chunk(self, worker: object, loaded: str | None = None) -> Chunk | None:
        """The next chunk for ``worker`` (which has backbone ``loaded``), or ``None`` when
        nothing is left to hand out (chunks may still be in flight elsewhere)."""
        state = self._workers.setdefault(worker, _Worker())
        chunk = (self._take_retry(loaded) or self._take_own(state) or
                 self._take_group(state, loaded) or self._steal(worker, loaded))
        if chunk is not None:
            state.in_flight[chunk.id] = chunk
            self._attempts[chunk.id] = self._attempts.get(chunk.id, 0)
        return chunk

    def _take_retry(self, loaded: str | None) -> Chunk | None:
        if not self._retry:
            return None
        for chunk in self._retry:
            if chunk.backbone == loaded:
                self._retry.remove(chunk)
                return chunk
        return self._retry.popleft()

    @staticmethod
    def _take_own(state: _Worker) -> Chunk | None:
        return state.queued.popleft() if state.queued else None

    def _take_group(self, state: _Worker, loaded: str | None) -> Chunk | None:
        if not self._queue:
            return None
        same = [g for g in self._queue if self._groups[g][0].backbone == loaded]
        group = same[0] if same else self._queue[0]
        self._queue.remove(group)
        state.queued.extend(self._groups[group])
        return state.queued.popleft()

    def _steal(self, thief: object, loaded: str | None) -> Chunk | None:
        victims = [(w, s) for w, s in self._workers.items() if w != thief and s.queued]
        if not victims:
            return None
        _, state = max(victims, key=lambda v: (v[1].queued[-1].backbone == loaded,
                                               sum(c.cost for c in v[1].queued)))
        self.stolen += 1
        return state.queued.pop()

    # ------------------------------------------------------------------ results
    def accept(self, key: str) -> bool:
        """True the first time a result for ``key`` arrives (write it), False after."""
        if key in self._recorded:
            return False
        self._recorded.add(key)
        return True

    def complete(self, worker: object, chunk_id: int) -> list[str]:
        """``worker`` finished chunk ``chunk_id``; returns its keys without a result (a
        worker that returned without storing them: they stay unfinished until a re-run)."""
        chunk = self._workers[worker].in_flight.pop(chunk_id)
        return [key for key in chunk.keys if key not in self._recorded]

    def lose(self, worker: object) -> tuple[list[Chunk], list[Chunk]]:
        """``worker`` died: its in-flight chunks (cells without a result) are handed out again
        and its groups' queued chunks go back to the others. Returns ``(retried, given_up)``:
        chunks whose ``max_attempts`` workers all died are given up (the caller stores them
        as failed)."""
        state = self._workers.pop(worker, _Worker())
        retried, given_up = [], []
        for chunk in state.in_flight.values():
            rest = tuple(item for item in chunk.items if item[1] not in self._recorded)
            if not rest:
                continue
            self._attempts[chunk.id] += 1
            again = Chunk(chunk.id, chunk.group, rest)
            (given_up if self._attempts[chunk.id] >= self.max_attempts else retried).append(again)
        self._retry.extend(retried)
        self._retry.extend(state.queued)
        self.retried += len(retried)
        return retried, given_up

    # ------------------------------------------------------------------ state
    def in_flight(self, worker: object) -> list[Chunk]:
        state = self._workers.get(worker)
        return list(state.in_flight.values()) if state else []

    @property
    def todo(self) -> int:
        """Cells planned to run (the unfinished ones)."""
        return self.total - self.skipped

    @property
    def finished(self) -> bool:
        """Nothing left to hand out and nothing in flight."""
        return not (self._queue or self._retry or any(
            s.queued or s.in_flight for s in self._workers.values()))
