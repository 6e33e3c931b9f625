"""Distributed sweeps: 2 gloo processes under torchrun on CPU, merge, kill one rank, resume;
rank 0 plans and broadcasts the shares."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterswap.sweep.distributed import assign, merge
from adapterswap.sweep.spec import SweepSpec
from adapterswap.sweep.store import RunStore

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


def torchrun(out, nproc=2, script=HERE / "toy_cli.py", **env):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", str(script), *ARGS, "--out", str(out)],
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


def test_assignment_is_deterministic_balanced_and_keeps_groups():
    import toy_plugin  # noqa: F401  (registered by conftest)

    spec = SweepSpec(backbones=["toy-dev", "toy-fast"], preset="tiny", seeds=[0, 1, 2, 3],
                     steps=[1, 2, 4, 8], references=["synthetic:0", "synthetic:1"],
                     prompts=["a", "b", "c"], out="unused").validate()
    keyed = [(c, c.key({})) for c in spec.cells()]
    owner = assign(keyed, 3)
    assert owner == assign(list(reversed(keyed)), 3)
    for cell, _key in keyed:  # a group never spans ranks
        group_ranks = {owner[k] for c, k in keyed if c.group() == cell.group()}
        assert len(group_ranks) == 1
    loads = [sum(c.steps for c, k in keyed if owner[k] == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(sum(c.steps for c, _ in keyed if c.group() == g)
                                          for g in {c.group() for c, _ in keyed})


def test_two_gloo_ranks_equal_a_single_process_run(tmp_path, single_run):
    out = tmp_path / "dist"
    proc = torchrun(out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"{TOTAL} cells done" in stdout
    assert sorted((out / "shards").iterdir())[0].name == "rank-000"
    assert len(keys(out)) == len(set(keys(out))) == TOTAL
    assert set(keys(out)) == set(keys(single_run))
    mine, theirs = scores(out), scores(single_run)
    for key, values in theirs.items():
        assert mine[key] == pytest.approx(values, rel=1e-6), key
    report = (out / "report.html").read_text()
    assert f"{TOTAL} cells ({TOTAL} done" in report


def test_killing_a_rank_then_rerunning_completes_without_duplicates(tmp_path, single_run):
    out = tmp_path / "killed"
    proc = torchrun(out, TOY_SLEEP="0.05")
    deadline = time.time() + 120
    shard_db = out / "shards" / "rank-001" / "results.sqlite"

    def shard_done() -> int:
        try:
            with sqlite3.connect(shard_db, timeout=5) as db:
                return db.execute("SELECT count(*) FROM cells").fetchone()[0]
        except sqlite3.Error:
            return 0

    while shard_done() < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-f", "-s", str(os.getpgid(proc.pid)), "toy_cli.py"],
                             capture_output=True, text=True).stdout.split()
    assert workers, "no torchrun workers found"
    os.kill(int(sorted(workers, key=int)[-1]), signal.SIGKILL)  # one rank dies
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    kept = shard_done()
    assert kept >= 2
    rerun = torchrun(out)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    done = keys(out)
    assert len(done) == len(set(done)) == TOTAL
    mine, theirs = scores(out), scores(single_run)
    for key, values in theirs.items():
        assert mine[key] == pytest.approx(values, rel=1e-6), key
    # merging again adds nothing
    assert merge(out)["cells_added"] == 0


#: A rank that sees another state of the stores than rank 0 (here: rank 1 sees nothing
#: finished), and a record of the plan each rank ran.
STALE_RANK = """
import json, os, runpy
from pathlib import Path
from adapterswap.sweep import distributed

rank = int(os.environ["RANK"])
if rank == 1:
    distributed.finished_everywhere = lambda out: set()
original = distributed.broadcast_plan

def recording(plan, r):
    received = original(plan, r)
    Path(os.environ["PLAN_DUMP"], f"plan-{r}.json").write_text(json.dumps(
        {"sent": plan is not None, "finished": received.finished, "shares": received.shares,
         "planned_by": received.planned_by}))
    return received

distributed.broadcast_plan = recording
runpy.run_path(os.environ["TOY_CLI"], run_name="__main__")
"""


def shard_keys(out):
    found = {}
    for path in sorted((out / "shards").glob("rank-*/results.sqlite")):
        with sqlite3.connect(path) as db:
            found[path.parent.name] = [r[0] for r in db.execute("SELECT key FROM cells")]
    return found


def test_rank_zero_plans_and_every_cell_runs_once_though_rank_one_sees_another_state(
        tmp_path, single_run):
    out = tmp_path / "planned"
    steps = ARGS.index("--steps") + 1
    first = single(out, [*ARGS[:steps], "1", *ARGS[steps + 1:]])  # the 1-step cells finished
    assert first.returncode == 0, first.stderr
    before = set(keys(out))
    assert len(before) == TOTAL // 3
    script = tmp_path / "stale_rank.py"
    script.write_text(STALE_RANK)
    proc = torchrun(out, script=script, PLAN_DUMP=str(tmp_path),
                    TOY_CLI=str(HERE / "toy_cli.py"))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    plans = [json.loads((tmp_path / f"plan-{r}.json").read_text()) for r in (0, 1)]
    assert plans[0]["sent"] and not plans[1]["sent"]  # rank 1 planned nothing itself
    assert plans[0] == {**plans[1], "sent": True} and plans[1]["planned_by"] == 0
    assert set(plans[1]["finished"]) == before  # rank 0's view, not rank 1's empty one
    ran = shard_keys(out)
    assert sorted(ran) == ["rank-000", "rank-001"]
    assert [sorted(ran[f"rank-{r:03d}"]) for r in (0, 1)] == plans[0]["shares"]
    everything = ran["rank-000"] + ran["rank-001"]
    assert len(everything) == len(set(everything)) == TOTAL - len(before)  # each cell once
    assert not set(everything) & before  # nothing finished ran again
    done = keys(out)
    assert len(done) == len(set(done)) == TOTAL and set(done) == set(keys(single_run))
