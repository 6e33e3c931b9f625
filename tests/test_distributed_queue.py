"""torchrun's shared work queue (SQLite, no torch.distributed): every chunk handed out once, also
to processes claiming at the same time; affinity, longest group first, work stealing; latency
timed once per configuration, the other ranks wait for its rows."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time

import cell_grid
import pytest

from adapterswap.sweep import workqueue
from adapterswap.sweep.latency import LatencyMeter, TimingContext, latency_key
from adapterswap.sweep.scheduler import ChunkScheduler
from adapterswap.sweep.worker import RelayStore
from adapterswap.sweep.workqueue import SharedLatencyMeter, WorkQueue, timing_config


def make_cell(*args, **kwargs):
    return cell_grid.make_cell(*args, **{"adapter": "none", **kwargs})


def grid(*args, **kwargs):
    return cell_grid.grid(*args, **{"adapter": "none", **kwargs})


def new_queue(tmp_path, keyed, finished=frozenset(), max_batch=16, rows=()):
    scheduler = ChunkScheduler(keyed, finished, max_batch=max_batch)
    return WorkQueue.create(tmp_path / "shards" / "queue.sqlite", scheduler.groups(),
                            world_size=2, latency_rows=rows)


def drain(queue, rank, loaded=None):
    claims = []
    while (claim := queue.claim(rank, loaded)) is not None:
        queue.finish(claim, rank)
        claims.append(claim)
        loaded = claim.backbone
    return claims


def test_every_unfinished_cell_is_claimed_once_and_the_new_plan_replaces_old_claims(tmp_path):
    keyed = grid()
    finished = {keyed[0][1]}
    queue = new_queue(tmp_path, keyed, finished, max_batch=4)
    assert sorted(queue.keys()) == sorted(k for _, k in keyed if k not in finished)
    claims = drain(queue, 0)
    assert sorted(k for c in claims for k in c.keys) == sorted(queue.keys())
    assert queue.counts() == {0: {"groups": 4, "chunks": len(claims), "stolen": 0}}
    # a re-run's plan (rank 0 builds a new queue) drops every claim of the last one
    again = new_queue(tmp_path, keyed, finished, max_batch=4)
    assert again.token != queue.token and again.counts() == {}
    with pytest.raises(RuntimeError, match="another plan"):
        WorkQueue(again.path, token=queue.token)


def test_a_rank_takes_its_loaded_backbones_groups_first_longest_first(tmp_path):
    keyed = (grid(backbones=("toy-dev",), references=("small",), steps=(1,)) +
             grid(backbones=("toy-dev",), references=("big",), steps=(8,), size=32) +
             grid(backbones=("toy-fast",), references=("mid",), steps=(4,)))
    queue = new_queue(tmp_path, keyed)
    cells = dict((k, c) for c, k in keyed)
    assert cells[queue.claim(0).keys[0]].reference == "big"  # cost: steps x pixels
    assert cells[queue.claim(1, loaded="toy-dev").keys[0]].reference == "small"
    assert cells[queue.claim(1, loaded="toy-dev").keys[0]].reference == "mid"


def test_a_rank_out_of_groups_steals_the_last_unstarted_chunk_of_the_busiest(tmp_path):
    keyed = grid(backbones=("toy-dev",), references=("r0",), seeds=tuple(range(8)), steps=(2,))
    queue = new_queue(tmp_path, keyed, max_batch=2)  # one group, four chunks
    a1 = queue.claim(0)
    a2 = queue.claim(0)
    assert a2.id == a1.id + 1 and not a2.stolen
    stolen = queue.claim(1, loaded="toy-dev")
    assert stolen.stolen and stolen.id == a1.id + 3  # the tail, not the next one
    assert queue.claim(0).id == a1.id + 2
    assert queue.claim(1) is None and queue.claim(0) is None
    assert queue.counts() == {0: {"groups": 1, "chunks": 3, "stolen": 0},
                              1: {"groups": 0, "chunks": 1, "stolen": 1}}


def _claim_all(path, token, rank, sink):
    queue = WorkQueue(path, token=token)
    taken = []
    while (claim := queue.claim(rank)) is not None:
        taken += claim.keys
        queue.finish(claim, rank)
    sink.put((rank, taken))


def test_processes_claiming_at_once_never_get_the_same_chunk(tmp_path):
    keyed = grid(references=tuple(f"r{i}" for i in range(6)), seeds=(0, 1, 2, 3))
    queue = new_queue(tmp_path, keyed, max_batch=2)
    context = multiprocessing.get_context("spawn")
    sink = context.Queue()
    procs = [context.Process(target=_claim_all, args=(queue.path, queue.token, r, sink))
             for r in range(3)]
    for proc in procs:
        proc.start()
    results = dict(sink.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(60)
    everything = [key for keys in results.values() for key in keys]
    assert len(everything) == len(set(everything)) == len(keyed)


CONTEXT = TimingContext(device="cpu", dtype="float32", fast_path="eager+attn=auto",
                        cache="none")


@pytest.fixture()
def fake_timing(monkeypatch):
    """LatencyMeter.measure without a model: a row per missing step count, counted."""
    timed = []

    def measure(self, backbone, adapter, cells, context, conditioning, *, accelerator=None):
        for n in self.missing(cells, context):
            time.sleep(0.2)  # another rank can ask meanwhile
            self.store.record_latency({**latency_key(cells[0], n, context), "steps": n,
                                       "total_s": float(n), "denoise_s": float(n),
                                       "repeats": 1, "samples_s": [float(n)],
                                       "method": "measured", "fit": None,
                                       "device": context.device})
            timed.append((backbone, n))

    monkeypatch.setattr(LatencyMeter, "measure", measure)
    monkeypatch.setattr(workqueue, "LATENCY_POLL_S", 0.02)
    return timed


def test_a_configuration_is_timed_by_one_rank_and_the_other_waits_for_its_rows(
        tmp_path, fake_timing):
    cells = [c for c, _ in grid(backbones=("toy-dev",), references=("r0",), seeds=(0,))]
    queue = new_queue(tmp_path, [(c, str(i)) for i, c in enumerate(cells)])
    stores = [RelayStore(tmp_path), RelayStore(tmp_path)]
    meters = [SharedLatencyMeter(stores[r], WorkQueue(queue.path), r, host="h", repeats=1,
                                 budget_s=5.0) for r in (0, 1)]
    threads = [threading.Thread(target=meters[r].measure,
                                args=(f"backbone-{r}", None, cells, CONTEXT, lambda: None))
               for r in (0, 1)]
    threads[0].start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # rank 0 claims first (its timing takes 0.6 s)
        if queue.db.execute("SELECT COUNT(*) FROM timing").fetchone()[0]:
            break
        time.sleep(0.01)
    threads[1].start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    assert fake_timing == [("backbone-0", 1), ("backbone-0", 2), ("backbone-0", 4)]
    for store in stores:  # both ranks have the rows; only rank 0 journaled (stores) them
        assert all(store.latency(latency_key(cells[0], n, CONTEXT)) for n in (1, 2, 4))
    assert [len(store.take()) for store in stores] == [3, 0]
    timers = queue.timers()
    assert len(timers) == 3 and {t["rank"] for t in timers.values()} == {0}
    # a later run's queue starts with the stored rows: nobody times them again
    rows = [stores[0].latency(latency_key(cells[0], n, CONTEXT)) for n in (1, 2, 4)]
    later = new_queue(tmp_path, [(c, str(i)) for i, c in enumerate(cells)], rows=rows)
    SharedLatencyMeter(RelayStore(tmp_path), later, 1, host="h", repeats=1,
                       budget_s=5.0).measure("b", None, cells, CONTEXT, lambda: None)
    assert len(fake_timing) == 3 and later.timers() == {}
    assert json.loads(timing_config(cells[0], CONTEXT))["backbone"] == "toy-dev"
