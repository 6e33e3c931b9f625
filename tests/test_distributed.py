"""Distributed sweeps: 2 gloo processes under torchrun on CPU take work from the shared queue
and equal one process; a slowed rank takes fewer groups; latency is timed once per
configuration; a rank killed mid-chunk loses no stored cell and the re-run finishes the rest;
rank 0 alone plans."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from adapterswap.sweep.distributed import merge
from adapterswap.sweep.store import RunStore
from adapterswap.sweep.workqueue import WorkQueue, queue_path

HERE = Path(__file__).parent
ARGS = ["sweep", "--backbone", "toy-dev", "--backbone", "toy-fast", "--preset", "tiny",
        "--seeds", "0,1,2", "--steps", "1,2,4", "--ref", "synthetic:0", "--ref", "synthetic:1",
        "--metrics", "sharpness,contrast,toy-colour-match"]
TOTAL = 2 * 2 * 3 * 3


def environment(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", ADAPTERSWAP_LOAD_PLUGINS="",
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def torchrun(out, nproc=2, script=HERE / "toy_cli.py", args=ARGS, **env):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", str(script), *args, "--out", str(out)],
        env=environment(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)


def single(out, args=ARGS):
    return subprocess.run([sys.executable, str(HERE / "toy_cli.py"), *args, "--out", str(out)],
                          env=environment(), capture_output=True, text=True, timeout=300)


def scores(out):
    with RunStore(out, lock=False) as store:
        return {(r["backbone"], r["reference"], r["seed"], r["steps"]):
                r["scores"] for r in store.rows()}


def keys(out):
    with sqlite3.connect(out / "results.sqlite") as db:
        return [r[0] for r in db.execute("SELECT key FROM cells WHERE status='done'")]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = single(out)
    assert result.returncode == 0, result.stderr
    return out


#: Test hooks in the ranks (by environment): ``SLOW`` ({rank: seconds} added to each denoiser
#: call), ``DIE_RANK``/``DIE_AT`` (that rank SIGKILLs itself once its DIE_AT-th chunk is
#: computed, before it is stored), ``STALE_RANK`` (that rank sees nothing finished anywhere),
#: ``PLAN_DUMP`` (a folder: who planned, and the plan each rank received).
HOOKS = """
import json, os, runpy, signal, sys, time
from pathlib import Path

sys.path.insert(0, os.environ["TESTS_DIR"])
from toy_plugin import ToyBackbone
from adapterswap.sweep import distributed
from adapterswap.sweep.worker import ChunkWorker

rank = int(os.environ["RANK"])
slow = json.loads(os.environ.get("SLOW", "{}"))
if str(rank) in slow:
    predict = ToyBackbone.predict

    def slow_predict(self, *args, **kwargs):
        time.sleep(slow[str(rank)])
        return predict(self, *args, **kwargs)

    ToyBackbone.predict = slow_predict
if os.environ.get("DIE_RANK") == str(rank):
    run_chunk, calls = ChunkWorker.run_chunk, []

    def dying_run_chunk(self, *args, **kwargs):
        result = run_chunk(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == int(os.environ["DIE_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    ChunkWorker.run_chunk = dying_run_chunk
if os.environ.get("STALE_RANK") == str(rank):
    distributed.finished_everywhere = lambda out: set()
if os.environ.get("PLAN_DUMP"):
    dump = Path(os.environ["PLAN_DUMP"])
    plan_queue, broadcast = distributed.plan_queue, distributed.broadcast_plan

    def recording_plan_queue(*args, **kwargs):
        (dump / f"planned-by-{rank}").touch()
        return plan_queue(*args, **kwargs)

    def recording_broadcast(plan, r):
        received = broadcast(plan, r)
        (dump / f"plan-{r}.json").write_text(json.dumps(
            {"sent": plan is not None, "token": received.token, "total": received.total,
             "skipped": received.skipped, "planned_by": received.planned_by}))
        return received

    distributed.plan_queue = recording_plan_queue
    distributed.broadcast_plan = recording_broadcast
runpy.run_path(os.environ["TOY_CLI"], run_name="__main__")
"""


def hooked(tmp_path, out, args=ARGS, **hooks):
    script = tmp_path / "hooks.py"
    script.write_text(HOOKS)
    return torchrun(out, script=script, args=args, TESTS_DIR=str(HERE),
                    TOY_CLI=str(HERE / "toy_cli.py"), **hooks)


def claims(out):
    queue = WorkQueue(queue_path(out))
    try:
        return queue.counts()
    finally:
        queue.close()


def shard_cells(out):
    """Every shard's cells: {rank folder: {key: finished_at}}."""
    found = {}
    for path in sorted((out / "shards").glob("rank-*/results.sqlite")):
        with sqlite3.connect(path) as db:
            found[path.parent.name] = dict(db.execute("SELECT key, finished_at FROM cells"))
    return found


def assert_same_as_single(out, single_run):
    done = keys(out)
    assert len(done) == len(set(done)) == TOTAL
    assert set(done) == set(keys(single_run))
    mine, theirs = scores(out), scores(single_run)
    for key, values in theirs.items():
        assert mine[key] == pytest.approx(values, rel=1e-6), key


def test_two_gloo_ranks_on_the_queue_equal_a_single_process_run(tmp_path, single_run):
    out = tmp_path / "dist"
    proc = torchrun(out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"{TOTAL} cells done" in stdout
    assert_same_as_single(out, single_run)
    counts = claims(out)
    assert sum(c["groups"] for c in counts.values()) == 4  # 2 backbones x 2 references
    ran = shard_cells(out)
    everything = [key for cells in ran.values() for key in cells]
    assert len(everything) == len(set(everything)) == TOTAL  # each cell in one shard
    report = (out / "report.html").read_text()
    assert f"{TOTAL} cells ({TOTAL} done" in report


def test_a_slowed_rank_takes_fewer_groups_and_latency_is_timed_once_per_configuration(
        tmp_path):
    out = tmp_path / "slow"
    args = [*ARGS[:ARGS.index("--ref")], *("--ref", "synthetic:0", "--ref", "synthetic:1",
                                           "--ref", "synthetic:2", "--ref", "synthetic:3"),
            "--metrics", "sharpness,latency", "--timing-repeats", "1"]
    proc = hooked(tmp_path, out, args=args, SLOW=json.dumps({"1": 0.5}))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    counts = claims(out)  # 8 groups: the slowed rank took fewer, the other the remainder
    assert counts[0]["groups"] + counts[1]["groups"] == 8
    assert counts[1]["groups"] < counts[0]["groups"]
    assert counts[1]["chunks"] < counts[0]["chunks"]
    with RunStore(out, lock=False) as store:
        rows = store.latency_rows()
        timed_by = store.meta("latency_timed_by")
        cells = store.rows()
    assert len(rows) == 2 * 3  # one row per (backbone setting, step count)
    assert set(timed_by) == {row["key"] for row in rows}
    in_shards = {}
    for rank in (0, 1):
        with sqlite3.connect(out / "shards" / f"rank-{rank:03d}" / "results.sqlite") as db:
            for (key,) in db.execute("SELECT key FROM latency"):
                assert key not in in_shards, "a configuration was timed twice"
                in_shards[key] = rank
    assert in_shards == {key: who["rank"] for key, who in timed_by.items()}
    assert {who["device"] for who in timed_by.values()} == {"cpu"}
    by_key = {row["key"]: row for row in rows}
    assert len(cells) == 2 * 4 * 3 * 3
    for cell in cells:  # every cell's latency is its configuration's one row
        row = by_key[cell["timings"]["latency_key"]]
        assert cell["scores"]["latency"] == pytest.approx(row["total_s"])


def test_a_rank_killed_mid_chunk_loses_no_stored_cell_and_the_rerun_finishes(tmp_path,
                                                                             single_run):
    out = tmp_path / "killed"
    proc = hooked(tmp_path, out, SLOW=json.dumps({"0": 0.25}), DIE_RANK="1", DIE_AT="2")
    proc.communicate(timeout=300)
    assert proc.returncode != 0  # rank 1 died; torchrun stopped rank 0
    before = shard_cells(out)
    kept = {key: at for cells in before.values() for key, at in cells.items()}
    assert len(before["rank-001"]) == 9  # its first group; the second died in flight
    assert len(kept) == sum(len(cells) for cells in before.values()) < TOTAL
    rerun = torchrun(out)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"{TOTAL - len(kept)} cells done, {len(kept)} already finished" in stdout
    after = shard_cells(out)
    everything = [key for cells in after.values() for key in cells]
    assert len(everything) == len(set(everything)) == TOTAL  # none ran twice
    for folder, cells in before.items():  # none stored before the kill ran again
        assert all(after[folder][key] == at for key, at in cells.items())
    assert_same_as_single(out, single_run)
    assert merge(out)["cells_added"] == 0  # merging again adds nothing


def test_rank_zero_alone_plans_and_every_cell_runs_once_though_rank_one_sees_another_state(
        tmp_path, single_run):
    out = tmp_path / "planned"
    steps = ARGS.index("--steps") + 1
    first = single(out, [*ARGS[:steps], "1", *ARGS[steps + 1:]])  # the 1-step cells finished
    assert first.returncode == 0, first.stderr
    before = set(keys(out))
    assert len(before) == TOTAL // 3
    proc = hooked(tmp_path, out, STALE_RANK="1", PLAN_DUMP=str(tmp_path))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.glob("planned-by-*")) == ["planned-by-0"]
    plans = [json.loads((tmp_path / f"plan-{r}.json").read_text()) for r in (0, 1)]
    assert plans[0]["sent"] and not plans[1]["sent"]  # rank 1 planned nothing itself
    assert plans[0] == {**plans[1], "sent": True} and plans[1]["planned_by"] == 0
    assert plans[1]["skipped"] == len(before)  # rank 0's view, not rank 1's empty one
    queue = WorkQueue(queue_path(out), token=plans[1]["token"])
    planned = set(queue.keys())
    queue.close()
    assert planned == set(keys(single_run)) - before
    ran = shard_cells(out)
    everything = [key for cells in ran.values() for key in cells]
    assert len(everything) == len(set(everything)) == TOTAL - len(before)  # each cell once
    assert set(everything) == planned  # nothing finished ran again
    done = keys(out)
    assert len(done) == len(set(done)) == TOTAL and set(done) == set(keys(single_run))
