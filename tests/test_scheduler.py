"""The dynamic chunk scheduler of multi-worker sweeps (no Ray): longest group first, chunks as
one process batches them, work stealing, a lost worker's chunks handed out again, every cell
accepted at most once and none lost."""

from __future__ import annotations

import random

import pytest
from cell_grid import grid

from adapterswap.sweep.plan import chunks
from adapterswap.sweep.scheduler import ChunkScheduler


def drain(scheduler, worker="w0", loaded=None):
    """Run everything on one worker, in the order handed out."""
    order = []
    while (chunk := scheduler.next_chunk(worker, loaded)) is not None:
        for key in chunk.keys:
            assert scheduler.accept(key)
        assert scheduler.complete(worker, chunk.id) == []
        order.append(chunk)
    return order


def test_every_unfinished_cell_is_handed_out_once_in_chunks_of_one_group():
    keyed = grid()
    finished = {keyed[0][1], keyed[5][1]}
    scheduler = ChunkScheduler(keyed, finished, max_batch=4)
    assert (scheduler.total, scheduler.skipped, scheduler.todo) == (36, 2, 34)
    order = drain(scheduler)
    keys = [key for chunk in order for key in chunk.keys]
    assert sorted(keys) == sorted(k for _, k in keyed if k not in finished)
    for chunk in order:
        assert 1 <= len(chunk.items) <= 4
        assert len({cell.group() for cell, _ in chunk.items}) == 1
    assert scheduler.finished


@pytest.mark.parametrize("step_parallel", [True, False])
def test_a_group_is_cut_into_the_batches_one_process_makes(step_parallel):
    keyed = grid(backbones=("toy-dev",), references=("r0",), seeds=(0, 1, 2, 3),
                 steps=(1, 2, 4))
    scheduler = ChunkScheduler(keyed, max_batch=5, step_parallel=step_parallel)
    handed = [[k for k in chunk.keys] for chunk in drain(scheduler)]

    class Row:  # what the step runner batches: samples with a step count
        def __init__(self, item):
            self.key, self.steps = item[1], item[0].steps

    one_process = [[row.key for row in part] for part in
                   chunks([Row(item) for item in keyed], step_parallel=step_parallel,
                          max_batch=5)]
    assert handed == one_process


def test_the_longest_group_goes_first_then_groups_of_the_loaded_backbone():
    keyed = (grid(backbones=("toy-dev",), references=("small",), steps=(1,)) +
             grid(backbones=("toy-dev",), references=("big",), steps=(8,), size=32) +
             grid(backbones=("toy-fast",), references=("mid",), steps=(4,)))
    scheduler = ChunkScheduler(keyed, max_batch=16)
    first = scheduler.next_chunk("w0")
    assert first.items[0][0].reference == "big"  # cost: steps x pixels
    # a worker holding toy-dev takes the cheaper toy-dev group before the toy-fast one
    second = scheduler.next_chunk("w1", loaded="toy-dev")
    assert second.items[0][0].reference == "small"
    third = scheduler.next_chunk("w1", loaded="toy-dev")
    assert third.items[0][0].reference == "mid"


def test_an_idle_worker_steals_the_last_queued_chunk_of_the_busiest_worker():
    keyed = grid(backbones=("toy-dev",), references=("r0",), seeds=tuple(range(8)),
                 steps=(2,))
    scheduler = ChunkScheduler(keyed, max_batch=2)  # one group, four chunks
    a1 = scheduler.next_chunk("a")
    a2 = scheduler.next_chunk("a")  # the next chunk of its own group
    assert a2.group == a1.group and a2.id == a1.id + 1
    stolen = scheduler.next_chunk("b", loaded="toy-dev")
    assert stolen is not None and stolen.group == a1.group
    assert stolen.id == a1.id + 3 and scheduler.stolen == 1  # the tail, not the next one
    assert scheduler.next_chunk("a").id == a1.id + 2  # "a" keeps its order
    assert scheduler.next_chunk("b") is None and scheduler.next_chunk("a") is None
    assert not scheduler.finished  # four chunks still in flight


def test_a_lost_workers_chunks_are_handed_out_again_and_given_up_after_two_deaths():
    keyed = grid(backbones=("toy-dev",), references=("r0", "r1"), seeds=(0, 1), steps=(1, 2))
    scheduler = ChunkScheduler(keyed, max_batch=2)
    mine = [scheduler.next_chunk("dies"), scheduler.next_chunk("dies")]
    first_key = mine[0].keys[0]
    assert scheduler.accept(first_key)  # one cell of the first chunk arrived before death
    retried, given_up = scheduler.lose("dies")
    assert given_up == [] and scheduler.retried == 2
    assert [c.id for c in retried] == [c.id for c in mine]
    assert first_key not in retried[0].keys  # a stored cell does not run again
    again = scheduler.next_chunk("dies-too")
    assert again.id == mine[0].id  # retried chunks first
    retried, given_up = scheduler.lose("dies-too")
    assert retried == [] and [c.id for c in given_up] == [mine[0].id]
    rest = drain(scheduler, "survivor")
    handed = {k for c in rest for k in c.keys} | {k for c in given_up for k in c.keys}
    assert handed | {first_key} == {k for _, k in keyed}
    assert scheduler.finished


def test_results_are_accepted_at_most_once():
    scheduler = ChunkScheduler(grid(), max_batch=16)
    assert scheduler.accept("k") is True
    assert scheduler.accept("k") is False


@pytest.mark.parametrize("seed", range(20))
def test_random_deaths_and_finishes_never_lose_or_repeat_a_cell(seed):
    """Workers finish chunks in random order, some die with chunks in flight, a new worker
    may join; in the end every cell was accepted exactly once or given up."""
    rng = random.Random(seed)
    keyed = grid(seeds=(0, 1, 2, 3), steps=(1, 2, 4, 8))
    scheduler = ChunkScheduler(keyed, {keyed[3][1]}, max_batch=rng.choice([1, 2, 3, 16]),
                               step_parallel=rng.random() < 0.5)
    workers = ["w0", "w1", "w2"]
    loaded: dict[str, str | None] = dict.fromkeys(workers)
    accepted: list[str] = []
    given_up: list[str] = []
    flight: list[tuple[str, object]] = []
    joined = 0
    while True:
        for w in workers:
            while sum(1 for x, _ in flight if x == w) < 2:
                chunk = scheduler.next_chunk(w, loaded[w])
                if chunk is None:
                    break
                loaded[w] = chunk.backbone
                flight.append((w, chunk))
        if not flight:
            break
        w, chunk = flight.pop(rng.randrange(len(flight)))
        if len(workers) > 1 and rng.random() < 0.08:  # w dies with everything it holds
            flight = [(x, c) for x, c in flight if x != w]
            _, gave = scheduler.lose(w)
            given_up += [k for c in gave for k in c.keys]
            workers.remove(w)
            if joined < 2 and rng.random() < 0.5:
                joined += 1
                workers.append(f"new{joined}")
                loaded[f"new{joined}"] = None
            continue
        accepted += [k for k in chunk.keys if scheduler.accept(k)]
        assert scheduler.complete(w, chunk.id) == []
    assert scheduler.finished
    assert len(accepted) == len(set(accepted))
    assert not set(accepted) & set(given_up)
    assert set(accepted) | set(given_up) == {k for _, k in keyed} - {keyed[3][1]}
