"""Sweeps on Ray (``--backend ray``) on a local CPU cluster of 2 workers: the same cells,
scores and images as one process; a killed actor's cells run on the other, each cell stored
once; a killed driver loses at most its cells in flight and the re-run resumes; a cluster of
two ``ray start`` processes on this machine joined with ``--address``. Skipped without Ray,
except the checks that Ray is optional."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from adapterswap.sweep.spec import SweepSpec
from adapterswap.sweep.store import RunStore

HERE = Path(__file__).parent
TOY_CLI = HERE / "toy_cli.py"
GRID = ["sweep", "--backbone", "toy-dev", "--backbone", "toy-fast", "--preset", "tiny",
        "--seeds", "0,1,2", "--steps", "1,2,4", "--ref", "synthetic:0", "--ref", "synthetic:1",
        "--metrics", "sharpness,contrast,toy-colour-match"]
TOTAL = 2 * 2 * 3 * 3
#: Scores of runs whose forwards batch other rows together than one process's (a chunk that
#: recomputes a first step one process reused from an earlier chunk) may differ in float32
#: rounding; the same batches give the same bytes.
BATCHING_RTOL = 1e-5
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'ray>=2.40')")


def environment(ray_dir: str | None = None, **extra: str) -> dict[str, str]:
    """The test processes' environment: offline, only the toy plugin, one thread, Ray's
    files under ``ray_dir`` and token authentication with a token of this test's own."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", ADAPTERSWAP_LOAD_PLUGINS="", OMP_NUM_THREADS="1",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0")
    if ray_dir is not None:
        env["RAY_TMPDIR"] = ray_dir
    env.update(extra)
    return env


TOKEN = secrets.token_hex(16)


def short_dir() -> str:
    """Ray's session folder holds Unix sockets: their paths must stay under ~100 bytes."""
    return tempfile.mkdtemp(prefix="asray-", dir="/tmp")


def cli(args, out, ray_dir=None, script=TOY_CLI, timeout=300, **env):
    return subprocess.run([sys.executable, str(script), *args, "--out", str(out)],
                          env=environment(ray_dir, **env), capture_output=True, text=True,
                          timeout=timeout)


def stored(out):
    """key -> (status, scores, image bytes) of every cell in the store."""
    with RunStore(out, lock=False) as store:
        return {r["key"]: (r["status"], r["scores"],
                           (Path(out) / r["image"]).read_bytes() if r["image"] else None)
                for r in store.rows()}


def assert_same_cells(out, reference, rtol=1e-6, same_bytes=True):
    mine, theirs = stored(out), stored(reference)
    assert set(mine) == set(theirs)
    for key, (status, scores, image) in theirs.items():
        assert mine[key][0] == status == "done"
        assert mine[key][1] == pytest.approx(scores, rel=rtol), key
        if same_bytes:
            assert mine[key][2] == image, key


def session_processes(sid: int) -> list[int]:
    found = subprocess.run(["ps", "-s", str(sid), "-o", "pid="], capture_output=True,
                           text=True).stdout.split()
    return [int(p) for p in found]


def end_session(sid: int) -> None:
    """Kill every process left in a session this test started (Ray's daemons and workers)."""
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = cli(GRID, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def single_run_batch_2(tmp_path_factory):
    out = tmp_path_factory.mktemp("single-batch-2")
    result = cli([*GRID, "--max-batch", "2"], out)
    assert result.returncode == 0, result.stderr
    return out


# ---------------------------------------------------------------------- Ray is optional
def test_importing_adapterswap_never_imports_ray():
    code = ("import sys; import adapterswap, adapterswap.cli, adapterswap.sweep.ray_backend, "
            "adapterswap.sweep.worker, adapterswap.sweep.scheduler; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=environment())
    assert result.returncode == 0, result.stderr


def test_backend_ray_without_ray_says_what_to_install_in_one_line(tmp_path):
    blocker = tmp_path / "no_ray.py"  # the CLI as it runs where Ray is not installed
    blocker.write_text(f"import runpy, sys\nsys.modules['ray'] = None\n"
                       f"runpy.run_path({str(TOY_CLI)!r}, run_name='__main__')\n")
    out = tmp_path / "out"
    result = cli([*GRID, "--backend", "ray"], out, script=blocker)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --backend ray needs Ray: pip install 'ray>=2.40'"]
    assert not out.exists()  # refused before anything was written


def test_address_needs_backend_ray(tmp_path):
    result = cli([*GRID, "--address", "auto"], tmp_path / "out")
    assert result.returncode == 2
    assert "--address" in result.stderr and "--backend ray" in result.stderr


# ---------------------------------------------------------------------- a local cluster
def slow_toy_denoiser() -> None:
    """Every Ray worker's setup: the toy denoiser sleeps, so a test can act mid-sweep."""
    import toy_plugin

    original = toy_plugin.ToyBackbone.predict
    if getattr(original, "slowed", False):
        return

    def predict(self, *args, **kwargs):
        time.sleep(0.05)
        return original(self, *args, **kwargs)

    predict.slowed = True
    toy_plugin.ToyBackbone.predict = predict


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs started in this process (RaySweep uses it as it is);
    the workers import the toy plugin from here and their toy denoiser is slowed."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    # a local ray.init turns token authentication on by itself (RAY_AUTH_MODE left unset):
    # with this token, not one written to ~/.ray
    os.environ.pop("RAY_AUTH_MODE", None)
    os.environ["RAY_AUTH_TOKEN"] = TOKEN
    ray = pytest.importorskip("ray")
    ray_dir = short_dir()
    env = {k: v for k, v in environment().items()
           if k in ("HF_HUB_OFFLINE", "ADAPTERSWAP_LOAD_PLUGINS", "OMP_NUM_THREADS")}
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir,
                 logging_level="WARNING", runtime_env={
                     "env_vars": {**env, "PYTHONPATH": str(HERE)},
                     "worker_process_setup_hook": "test_ray_backend.slow_toy_denoiser"})
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def grid_spec(out, **extra):
    return SweepSpec(backbones=["toy-dev", "toy-fast"], preset="tiny", seeds=[0, 1, 2],
                     steps=[1, 2, 4], references=["synthetic:0", "synthetic:1"],
                     metrics=["sharpness", "contrast", "toy-colour-match"], out=str(out),
                     **extra)


@needs_ray
def test_two_ray_workers_equal_one_process(local_ray, tmp_path, single_run):
    from adapterswap.sweep.ray_backend import RaySweep

    out = tmp_path / "ray"
    sweep = RaySweep(grid_spec(out), workers=2)
    summary = sweep.run()
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (TOTAL, TOTAL, 0, 0)
    assert sorted(sweep.written) == sorted(set(sweep.written)) and len(sweep.written) == TOTAL
    assert sweep.duplicates == 0 and not sweep.lost_workers
    # whole groups as one process batches them: the same scores and image bytes
    assert_same_cells(out, single_run)
    with RunStore(out, lock=False) as store:
        run = store.latest_run()
        assert run["status"] == "done" and run["device"] == "cpu"
        assert {r["run_id"] for r in store.rows()} == {run["id"]}
        assert set(run["cell_keys"]) == set(stored(single_run))
        assert store.metric_status() == {m: (True, None) for m in
                                         ("sharpness", "contrast", "toy-colour-match")}
    assert sorted(p.name for p in (out / "references").iterdir()) == \
        sorted(p.name for p in (single_run / "references").iterdir())
    assert len(list((out / "thumbnails").iterdir())) == TOTAL
    # re-running finds every cell finished and runs nothing
    again = RaySweep(grid_spec(out), workers=2).run()
    assert (again.done, again.skipped) == (0, TOTAL)


@needs_ray
def test_a_killed_actors_cells_run_on_the_other_each_stored_once(local_ray, tmp_path,
                                                                single_run_batch_2):
    from adapterswap.sweep.ray_backend import RaySweep

    killed = []

    def kill_worker_1(sweep, worker, chunk):
        if worker == 1 and not killed:  # after its first chunk, with its next one running
            killed.append(sweep.scheduler.in_flight(1))
            local_ray.kill(sweep.actors[1])

    out = tmp_path / "killed"
    sweep = RaySweep(grid_spec(out, max_batch=2), workers=2, on_chunk=kill_worker_1)
    summary = sweep.run()
    assert killed and killed[0], "worker 1 had no chunk in flight when it was killed"
    assert sweep.lost_workers == [1] and sweep.scheduler.retried >= 1
    in_flight = {key for chunk in killed[0] for key in chunk.keys}
    assert in_flight <= set(sweep.written)  # run again on worker 0
    assert (summary.done, summary.failed) == (TOTAL, 0)
    assert len(sweep.written) == len(set(sweep.written)) == TOTAL and sweep.duplicates == 0
    # chunks of 2 as in one process with --max-batch 2; a retried chunk is computed again
    assert_same_cells(out, single_run_batch_2, rtol=BATCHING_RTOL, same_bytes=False)


# ---------------------------------------------------------------------- the driver killed
SLOW_CLI = """
import os, runpy, time
import ray

def slow_toy_denoiser():
    import toy_plugin
    original = toy_plugin.ToyBackbone.predict
    def predict(self, *args, **kwargs):
        time.sleep(0.2)
        return original(self, *args, **kwargs)
    toy_plugin.ToyBackbone.predict = predict

ray.init(num_cpus=2, include_dashboard=False, runtime_env={
    "worker_process_setup_hook": slow_toy_denoiser,
    "env_vars": {"PYTHONPATH": os.environ["TOY_TESTS"]}})
runpy.run_path(os.environ["TOY_CLI"], run_name="__main__")
"""


def stored_count(out) -> int:
    try:
        with sqlite3.connect(Path(out) / "results.sqlite", timeout=5) as db:
            return db.execute("SELECT count(*) FROM cells WHERE status='done'").fetchone()[0]
    except sqlite3.Error:
        return 0


@needs_ray
def test_killing_the_driver_loses_only_cells_in_flight_and_the_rerun_resumes(tmp_path,
                                                                            single_run):
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    out, ray_dir = tmp_path / "out", short_dir()
    env = environment(ray_dir, TOY_TESTS=str(HERE), TOY_CLI=str(TOY_CLI))
    driver = subprocess.Popen([sys.executable, str(script), *GRID, "--backend", "ray",
                               "--nproc", "2", "--out", str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while stored_count(out) < 4 and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, driver.communicate()[1]
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=60)
        kept = stored_count(out)
        assert 4 <= kept < TOTAL
        rerun = cli([*GRID, "--backend", "ray", "--nproc", "2"], out, ray_dir)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{TOTAL - kept} cells done, {kept} already finished, 0 failed" in rerun.stdout
        # the resumed cells of a half-done group run in a smaller batch than one process
        # ran them in, which may round differently on the CPU: a tolerance, not bytes
        assert_same_cells(out, single_run, rtol=BATCHING_RTOL, same_bytes=False)
        with RunStore(out, lock=False) as store:
            assert [r["status"] for r in store.runs()] == ["running", "done"]
    finally:
        end_session(driver.pid)  # Ray's daemons the killed driver left behind
        shutil.rmtree(ray_dir, ignore_errors=True)


# ---------------------------------------------------------------------- a cluster
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ray
def test_a_cluster_of_two_ray_start_processes_runs_a_sweep_joined_by_address(tmp_path,
                                                                            single_run):
    ray_bin = Path(sys.executable).parent / "ray"
    ray_dir, port = short_dir(), free_port()
    env = environment(ray_dir)
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    nodes = [subprocess.Popen([str(ray_bin), "start", "--head", f"--port={port}",
                               "--include-dashboard=false", *common], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        joined = False
        while time.time() < deadline and not joined:
            if len(nodes) == 1 and subprocess.run(
                    [str(ray_bin), "status", f"--address={address}"], env=env,
                    capture_output=True).returncode == 0:
                nodes.append(subprocess.Popen([str(ray_bin), "start", f"--address={address}",
                                               *common], env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL,
                                              start_new_session=True))
            if len(nodes) == 2:
                status = subprocess.run([str(ray_bin), "status", f"--address={address}"],
                                        env=env, capture_output=True, text=True).stdout
                joined = "/2.0 CPU" in status
            time.sleep(1)
        assert joined, "the second node did not join"
        out = tmp_path / "cluster"
        result = cli([*GRID, "--backend", "ray", "--address", address, "--nproc", "2"], out,
                     ray_dir)
        assert result.returncode == 0, result.stderr
        assert "ray: 2 workers (one CPU each) on 2 node(s)" in result.stderr
        assert f"{TOTAL} cells done, 0 already finished, 0 failed" in result.stdout
        assert_same_cells(out, single_run)
        assert (out / "report.html").is_file()
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)  # ray start --block stops its processes
        for node in nodes:
            try:
                node.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pass
            end_session(node.pid)
        shutil.rmtree(ray_dir, ignore_errors=True)
