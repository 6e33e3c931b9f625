"""The console entry point ends without the interpreter's teardown, and loses nothing by it:
threads finish, exit handlers run, buffered output arrives, the exit status is kept."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from adapterswap.cli import fast_exit as fe

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    import torch  # a heavy module: the fast exit applies
    from adapterswap.cli.fast_exit import fast_exit, wanted

    out = Path(sys.argv[1])

    def late_thread():
        time.sleep(0.3)
        (out / "thread").write_text("done")

    def handler():  # runs after the threads, as in an ordinary exit
        (out / "atexit").write_text("thread first" if (out / "thread").exists() else "no")

    atexit.register(handler)
    threading.Thread(target=late_thread).start()
    pool = ThreadPoolExecutor(1)
    pool.submit(lambda: (time.sleep(0.2), (out / "pool").write_text("done")))
    sys.stdout.write("buffered output")  # a pipe: block-buffered, not yet written
    import ctypes
    ctypes.CDLL(None).printf(b" and a C line\\n")  # in the C library's buffer
    print("wanted", wanted(), file=sys.stderr)
    fast_exit(sys.argv[2] if sys.argv[2] == "text" else int(sys.argv[2]))
""")


@pytest.mark.parametrize("code", ["0", "3", "text"])
def test_fast_exit_keeps_threads_handlers_output_and_status(tmp_path, code):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("ADAPTERSWAP_FULL_EXIT", "PYTHONUNBUFFERED")}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), code],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == {"0": 0, "3": 3, "text": 1}[code], done.stderr
    assert done.stdout == "buffered output and a C line\n"
    assert "wanted True" in done.stderr
    if code == "text":  # sys.exit's rule: a message is printed and the status is 1
        assert "text" in done.stderr.splitlines()[-1]
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "pool").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "thread first"


def test_the_fast_exit_is_wanted_only_after_torch_and_can_be_turned_off(monkeypatch):
    for name in ("ADAPTERSWAP_FULL_EXIT", *fe.PROFILER_VARIABLES):  # whatever runs the tests
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fe, "HEAVY_MODULES", ("pytest",))  # imported here, as torch is there
    assert fe.wanted()
    monkeypatch.setattr(fe, "HEAVY_MODULES", ("a_module_nobody_imported",))
    assert not fe.wanted()  # `adapterswap list`, `plugins`: an ordinary exit
    monkeypatch.setattr(fe, "HEAVY_MODULES", ("pytest",))
    monkeypatch.setenv("ADAPTERSWAP_FULL_EXIT", "1")
    assert not fe.wanted()
    monkeypatch.setenv("ADAPTERSWAP_FULL_EXIT", "0")
    assert fe.wanted()
    monkeypatch.setenv("CUDA_INJECTION64_PATH", "/opt/nsight/libinjection.so")  # nsys, ncu
    assert not fe.wanted()
    monkeypatch.delenv("CUDA_INJECTION64_PATH")
    previous = sys.getprofile()
    sys.setprofile(lambda frame, event, arg: None)  # as python -m cProfile does
    try:
        assert not fe.wanted()
    finally:
        sys.setprofile(previous)
    assert [fe.exit_status(c) for c in (None, 0, 2)] == [0, 0, 2]


@pytest.mark.parametrize("how", ["sys.stdout = None", "sys.stdout.close()"])
def test_a_missing_or_closed_stdout_keeps_the_status(how):
    """Started without stdout (``sys.stdout`` is None) or with it closed by the program: the
    status still comes through, as Python's own exit keeps it."""
    code = (f"import sys; {how}\n"
            "from adapterswap.cli.fast_exit import fast_exit; fast_exit(4)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 4, done.stderr


def test_a_cli_sweep_through_the_entry_point_stores_everything(tmp_path):
    """``python -m adapterswap sweep`` as a user runs it: the store, the report and the
    summary line all there after the fast exit, status 0; a usage error stays status 2."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERSWAP_FULL_EXIT"}
    done = subprocess.run(
        [sys.executable, "-m", "adapterswap", "sweep", "--backbone", "sd15", "--preset",
         "tiny", "--steps", "1,2", "--seeds", "0", "--timing-repeats", "0", "--metrics",
         "sharpness", "--out", str(out)], capture_output=True, text=True, env=env,
        timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 cells done" in done.stdout and (out / "report.html").stat().st_size > 0
    with sqlite3.connect(out / "results.sqlite") as db:
        statuses = [r[0] for r in db.execute("SELECT status FROM cells")]
        summary = db.execute("SELECT summary FROM runs").fetchone()[0]
    assert statuses == ["done", "done"] and json.loads(summary)["done"] == 2
    bad = subprocess.run([sys.executable, "-m", "adapterswap", "sweep", "--backbone", "sd15",
                          "--preset", "tiny", "--steps", "0", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "steps" in bad.stderr
