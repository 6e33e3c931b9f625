"""Bad input never shows a traceback; faults mid-run lose nothing (issue: hardening)."""

from __future__ import annotations

import errno
import string
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterswap.cli import main
from adapterswap.errors import AdapterswapError, StoreWriteError, UsageError
from adapterswap.sweep.engine import run_sweep
from adapterswap.sweep.spec import SweepSpec
from adapterswap.sweep.store import RunStore

FIELD_VALUES = {
    "backbones": st.one_of(st.lists(st.sampled_from(["toy-dev", "toy-fast", "toy-dve", "", "x"]),
                                    max_size=3), st.integers(), st.text(max_size=5)),
    "seeds": st.one_of(st.lists(st.one_of(st.integers(-5, 5), st.floats(), st.text(max_size=2)),
                                max_size=3), st.none()),
    "steps": st.one_of(st.lists(st.one_of(st.integers(-3, 40), st.floats(allow_nan=True),
                                          st.booleans()), max_size=3), st.text(max_size=3)),
    "scale": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(-2, 3), st.text(max_size=2)),
    "start": st.one_of(st.floats(-1, 2), st.just(float("nan"))),
    "end": st.one_of(st.floats(-1, 2), st.just(float("inf"))),
    "height": st.one_of(st.none(), st.integers(-16, 100), st.floats(0, 64)),
    "metrics": st.one_of(st.lists(st.sampled_from(["sharpness", "sharpnes", "latency",
                                                   "toy-colour-match", "", "lpips?"]),
                                  max_size=3), st.integers()),
    "windows": st.one_of(st.lists(st.lists(st.floats(-1, 2), max_size=3), max_size=2),
                         st.text(max_size=3)),
    "scales": st.one_of(st.lists(st.floats(allow_nan=True), max_size=2), st.text(max_size=2)),
    "max_batch": st.one_of(st.integers(-2, 4), st.floats(0, 4)),
    "references": st.one_of(st.lists(st.sampled_from(["synthetic:0", "/no/such.png", "\x00"]),
                                     max_size=2), st.integers()),
    "prompts": st.one_of(st.lists(st.text(max_size=8), max_size=2), st.integers()),
    "adapter": st.one_of(st.none(), st.sampled_from(["none", "toy-adapter", "toy-other-adapter",
                                                     "nope"])),
    "preset": st.sampled_from([None, "tiny", "huge"]),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=FIELD_VALUES))
def test_any_spec_validates_or_fails_naming_the_field(values):
    spec = SweepSpec.from_mapping({"backbones": ["toy-dev"], "preset": "tiny",
                                   "out": "unused", **values})
    try:
        spec.validate()
    except AdapterswapError as exc:
        message = str(exc)
        assert "\n" not in message
        assert exc.exit_code == 2, message
        named = [f for f in FIELD_VALUES if f in message] + ["Unknown", "Adapter", "adapter"]
        assert any(name in message for name in named), message
        return
    assert spec.cells()  # a valid spec expands


TOKENS = st.text(alphabet=string.digits + ",.-x ", max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=TOKENS, seeds=TOKENS, scales=TOKENS, windows=TOKENS,
       height=st.sampled_from([None, "0", "-8", "12", "16", "x"]),
       backbone=st.sampled_from(["toy-dev", "toy-fast", "toy-dvv", "TOY"]))
def test_cli_flags_exit_0_or_2_with_one_line(steps, seeds, scales, windows, height, backbone):
    args = ["sweep", "--dry-run", "--preset", "tiny", "--backbone", backbone]
    for flag, value in (("--steps", steps), ("--seeds", seeds), ("--scales", scales),
                        ("--windows", windows), ("--height", height)):
        if value is not None:
            args += [flag, value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 2), (args, result.output, result.exception)
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if "rror" in line]
        assert len(errors) == 1, result.stderr
        assert "Traceback" not in result.stderr


def tiny(out, **overrides):
    values = dict(backbones=["toy-dev"], preset="tiny", seeds=[0, 1, 2, 3], steps=[2, 4],
                  out=str(out), metrics=["sharpness", "toy-colour-match"], max_batch=8)
    values.update(overrides)
    return SweepSpec(**values)


def cell_scores(out):
    with RunStore(out, lock=False) as store:
        return {(r["seed"], r["steps"]): r["scores"] for r in store.rows()
                if r["status"] == "done"}


def test_out_of_memory_retries_at_a_smaller_batch(tmp_path, monkeypatch):
    import torch
    from toy_plugin import ToyBackbone

    original = ToyBackbone.predict
    calls = {"oom": 0}

    def limited(self, latents, *args, **kwargs):
        if latents.shape[0] > 2:
            calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, latents, *args, **kwargs)

    monkeypatch.setattr(ToyBackbone, "predict", limited)
    summary = run_sweep(tiny(tmp_path / "oom"))
    monkeypatch.setattr(ToyBackbone, "predict", original)
    assert summary.done == 8 and summary.failed == 0 and calls["oom"] >= 1
    with RunStore(tmp_path / "oom", lock=False) as store:
        assert store.meta("oom_retries") >= 1
    run_sweep(tiny(tmp_path / "clean"))
    a, b = cell_scores(tmp_path / "oom"), cell_scores(tmp_path / "clean")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5)


@pytest.mark.parametrize("fail_after", [0, 3, 7])
def test_disk_full_stops_cleanly_keeps_cells_and_resumes(tmp_path, monkeypatch, fail_after):
    original = RunStore.save_image
    count = {"n": 0}

    def full_disk(self, key, image):
        if count["n"] >= fail_after:
            raise self._write_error(OSError(errno.ENOSPC, "No space left on device"))
        count["n"] += 1
        return original(self, key, image)

    monkeypatch.setattr(RunStore, "save_image", full_disk)
    with pytest.raises(StoreWriteError, match="No space left on device.*re-run to resume"):
        run_sweep(tiny(tmp_path / "full"))
    kept = cell_scores(tmp_path / "full")
    assert len(kept) == fail_after
    monkeypatch.setattr(RunStore, "save_image", original)
    again = run_sweep(tiny(tmp_path / "full"))
    assert (again.skipped, again.done) == (fail_after, 8 - fail_after)
    run_sweep(tiny(tmp_path / "clean"))
    clean = cell_scores(tmp_path / "clean")
    for key, values in clean.items():
        assert cell_scores(tmp_path / "full")[key] == pytest.approx(values, rel=1e-5)
    assert not list((tmp_path / "full" / "images").glob("*.tmp.png"))


def test_unwritable_out_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match="invalid --out=.*a-file"):
        RunStore(blocker)
    result = CliRunner().invoke(main, ["sweep", "--preset", "tiny", "--backbone", "toy-fast",
                                       "--out", str(blocker / "sub")])
    assert result.exit_code == 2 and "--out=" in result.stderr


HOSTILE = ["../../escape", "/etc/passwd", "..\\..\\win", "a/b/../../c", "ünïcødé ✓ 😀",
           "x" * 3000, "nul\tand\r\nnewlines", "$(rm -rf /)", "%s%n"]


def test_hostile_names_never_write_outside_out(tmp_path):
    root = tmp_path / "root"
    refs = root / "refs" / ".." / "refs"
    (root / "refs").mkdir(parents=True)
    ref_paths = []
    for i, name in enumerate(["../weird name.png", "ünï ✓.png"]):
        path = root / "refs" / name.replace("../", "")
        from PIL import Image

        Image.new("RGB", (8, 8), (i * 100, 20, 20)).save(path)
        ref_paths.append(str(refs / path.name))
    out = root / "out"
    before = {p for p in tmp_path.rglob("*")}
    run_sweep(tiny(out, prompts=HOSTILE, references=ref_paths, seeds=[0], steps=[1]))
    from adapterswap.sweep.report import build_report

    build_report(out)
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(out in p.parents or p == out for p in created), sorted(
        str(p) for p in created if out not in p.parents)
    assert all(len(p.name) < 120 for p in created)
    html = (out / "report.html").read_text()
    assert "$(rm -rf /)" in html and "<script" not in html.lower()


def test_nul_in_a_prompt_is_refused_by_name():
    spec = tiny("unused", prompts=["ok", "bad\x00prompt"])
    with pytest.raises(UsageError, match="prompts='bad\\\\x00prompt'"):
        spec.validate()


def test_images_are_never_half_written(tmp_path):
    run_sweep(tiny(tmp_path, seeds=[0], steps=[2]))
    for image in (tmp_path / "images").glob("*.png"):
        from PIL import Image

        with Image.open(image) as im:
            assert np.asarray(im).shape[-1] == 3


def test_a_second_sweep_on_the_same_out_is_refused_while_the_first_runs(tmp_path):
    import os
    import sqlite3
    import subprocess
    import sys
    import time

    here = Path(__file__).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", ADAPTERSWAP_LOAD_PLUGINS="", TOY_SLEEP="1.0")
    args = ["sweep", "--backbone", "toy-dev", "--preset", "tiny", "--seeds", "0,1,2",
            "--steps", "1,2,4,8", "--out", str(tmp_path), "--metrics", "sharpness"]
    first = subprocess.Popen([sys.executable, str(here / "toy_cli.py"), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def done() -> int:
        try:
            with sqlite3.connect(tmp_path / "results.sqlite", timeout=5) as db:
                return db.execute("SELECT count(*) FROM cells").fetchone()[0]
        except sqlite3.Error:
            return 0

    deadline = time.time() + 90
    while done() < 1 and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    second = CliRunner().invoke(main, args)  # the first is mid-run: its lock is held
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert 0 < done() and second.exit_code == 2, second.output
    assert "another sweep" in second.stderr and str(tmp_path) in second.stderr
    with RunStore(tmp_path, lock=False) as store:
        keys = [r["key"] for r in store.rows()]
    assert len(keys) == len(set(keys)) == 12


def test_a_broken_plugin_leaves_sweeps_on_other_backbones_working(tmp_path, isolated_plugins):
    from toy_plugin import ToyPlugin

    from adapterswap import hookimpl

    class Broken:
        @hookimpl
        def register_backbones(self, register):
            raise RuntimeError("broken backbone plugin")

    isolated_plugins.register_plugin(ToyPlugin(), name="toy-plugin")
    isolated_plugins.register_plugin(Broken(), name="broken-plugin")
    summary = run_sweep(tiny(tmp_path, seeds=[0], steps=[1, 2], metrics=["sharpness"]))
    assert summary.done == 2
    assert [f.plugin for f in isolated_plugins.plugin_failures()] == ["broken-plugin"]
