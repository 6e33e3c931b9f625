"""The sweep: spec validation, engine equivalences, store resume, kill -9, locking, reports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapterswap.errors import InvalidArgumentError, UnknownNameError, UsageError
from adapterswap.sweep.engine import run_sweep
from adapterswap.sweep.report import build_report
from adapterswap.sweep.spec import DEFAULT_PROMPTS, SweepSpec, parse_int_list
from adapterswap.sweep.store import RunStore

HERE = Path(__file__).parent


def tiny_spec(out: Path, **overrides) -> SweepSpec:
    values = dict(backbones=["toy-dev", "toy-fast"], preset="tiny", seeds=[0, 1, 2],
                  steps=[1, 2, 4, 8], out=str(out),
                  metrics=["sharpness", "contrast", "latency", "toy-colour-match"])
    values.update(overrides)
    return SweepSpec(**values)


def scores_by_cell(out: Path) -> dict[tuple, dict[str, float]]:
    with RunStore(out, lock=False) as store:
        return {(r["backbone"], r["reference"], r["prompt"], r["seed"], r["steps"]):
                {k: v for k, v in r["scores"].items() if k != "latency"}
                for r in store.rows()}


# -- spec validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field", "fragment"), [
    ({"backbones": ["toy-dve"]}, None, "Did you mean 'toy-dev'?"),
    ({"steps": [0]}, "steps=0", "integer >= 1"),
    ({"steps": [2.5]}, "steps=2.5", "integer"),
    ({"steps": ["4"]}, "steps='4'", "integer"),
    ({"seeds": [-1]}, "seeds=-1", "integer >= 0"),
    ({"references": ["/no/such/face.png"]}, "references='/no/such/face.png'", "no such file"),
    ({"adapter": "toy-other-adapter"}, None, "supports the other family"),
    ({"adapter": "none", "metrics": ["toy-colour-match"]}, "metrics='toy-colour-match'",
     "needs a reference"),
    ({"height": 20}, "height=20", "multiple of 8"),
    ({"max_batch": 0}, "max_batch=0", ">= 1"),
    ({"metrics": ["sharpnes"]}, None, "Did you mean 'sharpness'?"),
    ({"preset": "huge"}, "preset='huge'", "choose one of tiny, random"),
    ({"scale": -1.0}, "scale=-1.0", ">= 0"),
])
def test_invalid_specs_name_field_and_value(tmp_path, overrides, field, fragment):
    with pytest.raises((InvalidArgumentError, UnknownNameError, UsageError)) as info:
        tiny_spec(tmp_path, **overrides).validate()
    message = str(info.value)
    assert fragment in message
    if field:
        assert field in message


def test_toml_spec_with_flag_overrides(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('backbone = "toy-dev"\nseeds = [0, 1]\nsteps = [1, 2]\npreset = "tiny"\n'
                      f'out = "{tmp_path / "o"}"\n')
    spec = SweepSpec.merged(SweepSpec.from_toml(config), {"seeds": [5], "steps": None})
    spec.validate()
    assert spec.backbones == ["toy-dev"] and spec.seeds == [5] and spec.steps == [1, 2]
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = [1]\n")
    with pytest.raises(InvalidArgumentError, match="stepz"):
        SweepSpec.merged(SweepSpec.from_toml(bad), {})
    with pytest.raises(InvalidArgumentError, match="--steps='x'"):
        parse_int_list("--steps", "1,x")


def test_defaults_grid_adapter_and_references(tmp_path):
    spec = SweepSpec(backbones=["toy-dev"], preset="tiny", out=str(tmp_path)).validate()
    cells = spec.cells()
    assert sorted({c.steps for c in cells}) == [1, 2, 4, 8]  # toy-dev's default grid
    assert {c.adapter for c in cells} == {"toy-adapter"}
    assert {c.reference for c in cells} == {"synthetic:0"}


def test_cell_keys_depend_on_config_and_versions(tmp_path):
    cells = tiny_spec(tmp_path).validate().cells()
    keys = {c.key({"torch": "1"}) for c in cells}
    assert len(keys) == len(cells)
    assert cells[0].key({"torch": "1"}) != cells[0].key({"torch": "2"})


# -- engine --------------------------------------------------------------------------------------
def test_step_parallel_equals_sequential(tmp_path):
    parallel = run_sweep(tiny_spec(tmp_path / "p"))
    sequential = run_sweep(tiny_spec(tmp_path / "s", step_parallel=False))
    assert parallel.done == sequential.done == 24
    a, b = scores_by_cell(tmp_path / "p"), scores_by_cell(tmp_path / "s")
    assert a.keys() == b.keys()
    for key in a:
        for metric, value in a[key].items():
            assert value == pytest.approx(b[key][metric], rel=1e-4, abs=1e-6), (key, metric)
    for image in (tmp_path / "p" / "images").iterdir():
        other = np.asarray(Image.open(tmp_path / "s" / "images" / image.name), dtype=int)
        assert np.abs(np.asarray(Image.open(image), dtype=int) - other).max() <= 1


def test_engine_image_equals_plain_loop(tmp_path):
    from adapterswap.denoise import denoise
    from adapterswap.plugins import get_adapter, get_backbone

    run_sweep(tiny_spec(tmp_path, backbones=["toy-dev"], seeds=[3], steps=[4]))
    (image,) = list((tmp_path / "images").iterdir())
    backbone = get_backbone("toy-dev").tiny()
    adapter = get_adapter("toy-adapter").tiny(backbone)
    ref = adapter.tiny_reference(0)
    plain = denoise(backbone, DEFAULT_PROMPTS[0], num_inference_steps=4, seeds=[3],
                    adapter=adapter, reference=ref).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(Image.open(image)))


def test_resume_skips_finished_cells(tmp_path):
    first = run_sweep(tiny_spec(tmp_path, seeds=[0]))
    again = run_sweep(tiny_spec(tmp_path, seeds=[0]))
    more = run_sweep(tiny_spec(tmp_path, seeds=[0, 1]))
    assert (first.done, again.done, again.skipped) == (8, 0, 8)
    assert (more.done, more.skipped) == (8, 8)


def test_second_writer_is_refused(tmp_path):
    with RunStore(tmp_path), pytest.raises(UsageError, match="another sweep"):
        RunStore(tmp_path)


def test_unavailable_metric_is_recorded_not_faked(tmp_path):
    from adapterswap.errors import MetricUnavailableError
    from adapterswap.metrics.basic import Contrast

    original = Contrast.load

    def broken_load(self):
        raise MetricUnavailableError("contrast model missing (test)")

    Contrast.load = broken_load
    try:
        summary = run_sweep(tiny_spec(tmp_path, backbones=["toy-fast"], seeds=[0]))
    finally:
        Contrast.load = original
    assert "contrast" in summary.unavailable_metrics
    rows = scores_by_cell(tmp_path)
    assert all("contrast" not in s and "sharpness" in s for s in rows.values())
    build_report(tmp_path)
    assert "contrast model missing (test)" in (tmp_path / "report.html").read_text()


def test_non_finite_output_is_a_failed_cell_and_the_sweep_continues(tmp_path, monkeypatch):
    from toy_plugin import ToyBackbone

    original = ToyBackbone.step

    def poisoned(self, model_output, latents, schedule, step_index):
        out = original(self, model_output, latents, schedule, step_index)
        if len(schedule.timesteps) == 2:
            out = out * float("nan")
        return out

    monkeypatch.setattr(ToyBackbone, "step", poisoned)
    summary = run_sweep(tiny_spec(tmp_path, backbones=["toy-fast"], seeds=[0]))
    assert summary.failed == 1 and summary.done == 3
    with RunStore(tmp_path, lock=False) as store:
        failed = [r for r in store.rows() if r["status"] == "failed"]
    assert failed[0]["steps"] == 2 and "NaN" in failed[0]["error"]
    monkeypatch.setattr(ToyBackbone, "step", original)
    again = run_sweep(tiny_spec(tmp_path, backbones=["toy-fast"], seeds=[0]))
    assert (again.done, again.skipped) == (1, 3)


# -- kill -9 and the CLI -------------------------------------------------------------------------
def cli(*args, env=None, **kwargs):
    full = dict(os.environ, HF_HUB_OFFLINE="1", ADAPTERSWAP_LOAD_PLUGINS="")
    full.update(env or {})
    return subprocess.Popen([sys.executable, str(HERE / "toy_cli.py"), *args], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


SWEEP_ARGS = ["sweep", "--backbone", "toy-dev", "--backbone", "toy-fast", "--preset", "tiny",
              "--seeds", "0,1,2", "--steps", "1,2,4,8", "--max-batch", "4",
              "--metrics", "sharpness,contrast,toy-colour-match"]


def done_count(out: Path) -> int:
    if not (out / "results.sqlite").exists():
        return 0
    try:
        with sqlite3.connect(out / "results.sqlite", timeout=5) as db:
            return db.execute("SELECT count(*) FROM cells WHERE status='done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    clean = tmp_path_factory.mktemp("clean")
    proc = cli(*SWEEP_ARGS, "--out", str(clean))
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    return clean


@pytest.mark.parametrize("kill_after", [1, 5, 13])
def test_kill_9_mid_sweep_then_resume_gives_every_cell_once(tmp_path, clean_run, kill_after):
    clean = clean_run
    killed = tmp_path / "killed"
    proc = cli(*SWEEP_ARGS, "--out", str(killed), env={"TOY_SLEEP": "0.05"})
    deadline = time.time() + 60
    while done_count(killed) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lost_at_most = done_count(killed)
    assert 0 < lost_at_most < 24
    resumed = cli(*SWEEP_ARGS, "--out", str(killed))
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert f"{24 - lost_at_most} cells done, {lost_at_most} already finished" in \
        resumed.stdout.read()
    with sqlite3.connect(killed / "results.sqlite") as db:
        keys = [r[0] for r in db.execute("SELECT key FROM cells")]
    assert len(keys) == len(set(keys)) == 24
    clean_scores, killed_scores = scores_by_cell(clean), scores_by_cell(killed)
    assert clean_scores.keys() == killed_scores.keys()
    for key, values in clean_scores.items():
        assert killed_scores[key] == pytest.approx(values, rel=1e-6), key
    assert len(list((killed / "images").glob("*.png"))) >= 24


def test_sweep_without_weights_names_model_and_tiny_preset(tmp_path):
    proc = cli("sweep", "--backbone", "toy-dev", "--out", str(tmp_path / "o"),
               "--source", f"toy-dev={tmp_path / 'missing-model'}")
    assert proc.wait(timeout=60) == 2
    errors = [line for line in proc.stderr.read().splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "missing-model" in errors[0] and "--preset tiny" in errors[0]


def test_sweep_cli_writes_report_csv_and_plots(tmp_path):
    out = tmp_path / "run"
    proc = cli(*SWEEP_ARGS, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"Results: {out}" in stdout
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 25
    header = lines[0].split(",")
    assert {"backbone", "adapter", "scale", "reference", "prompt", "seed", "steps",
            "sharpness", "contrast", "toy-colour-match"} <= set(header)
    assert {p.name for p in (out / "plots").iterdir()} >= {
        "metric-sharpness.png", "metric-contrast.png", "metric-toy-colour-match.png"}
    analysis = json.loads((out / "analysis.json").read_text())
    assert {c["metric"] for c in analysis["curves"]} >= {"sharpness", "toy-colour-match"}
    rebuilt = cli("report", str(out))
    assert rebuilt.wait(timeout=60) == 0


def test_swap_reports_latency_ratio_and_paired_deltas(tmp_path):
    out = tmp_path / "swap"
    proc = cli("swap", "--from", "toy-dev", "--to", "toy-fast", "--preset", "tiny",
               "--seeds", "0,1,2", "--out", str(out),
               "--metrics", "sharpness,toy-colour-match,latency")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    swap = json.loads((out / "swap.json").read_text())
    assert swap["steps"] == {"toy-dev": [8], "toy-fast": [2]}
    assert swap["latency"]["speedup"] == pytest.approx(
        swap["latency"]["from_s"] / swap["latency"]["to_s"])
    delta = swap["metrics"]["toy-colour-match"]
    assert delta["n"] == 3 and delta["ci_low"] <= delta["mean"] <= delta["ci_high"]
    with RunStore(out, lock=False) as store:
        rows = store.rows()
    manual = np.mean([
        next(r for r in rows if r["backbone"] == "toy-fast" and r["seed"] == s)["scores"][
            "toy-colour-match"]
        - next(r for r in rows if r["backbone"] == "toy-dev" and r["seed"] == s)["scores"][
            "toy-colour-match"] for s in (0, 1, 2)])
    assert delta["mean"] == pytest.approx(manual)
    assert "x faster" in stdout and "Swap: toy-dev" in (out / "report.html").read_text()


# -- the report in a real browser ----------------------------------------------------------------
def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_opens_in_headless_chromium_with_all_images_and_no_errors(tmp_path):
    browser_exe = chromium_path()
    if browser_exe is None or not _has_playwright():
        if os.environ.get("ADAPTERSWAP_REQUIRE_BROWSER"):
            pytest.fail("chromium and playwright are required (ADAPTERSWAP_REQUIRE_BROWSER)")
        pytest.skip("headless chromium or playwright not installed")
    from playwright.sync_api import sync_playwright

    out = tmp_path / "run"
    run_sweep(tiny_spec(out))
    report = build_report(out)
    expected = len(list((out / "plots").glob("*.png")))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_exe, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        loaded = page.evaluate(
            "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        title = page.title()
        browser.close()
    assert errors == []
    assert len(loaded) == expected and all(loaded)
    assert title == "adapterswap report"


def _has_playwright() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return True


# -- ablations and trajectories ------------------------------------------------------------------
def test_adapter_off_cells_equal_the_detached_backbone_exactly(tmp_path):
    from adapterswap.denoise import denoise
    from adapterswap.plugins import get_backbone

    spec = tiny_spec(tmp_path, backbones=["toy-dev"], seeds=[0, 1], steps=[4],
                     scales=[0.5, 1.0], windows=[[0.0, 1.0], [0.0, 0.5]], adapter_off=True,
                     step_parallel=False)
    summary = run_sweep(spec)
    assert summary.done == 2 * (2 * 2 + 1)
    with RunStore(tmp_path, lock=False) as store:
        rows = store.rows()
    off = [r for r in rows if r["adapter"] == "none"]
    assert len(off) == 2 and all(r["reference"] == "synthetic:0" for r in off)
    backbone = get_backbone("toy-dev").tiny()
    for row in off:
        plain = denoise(backbone, DEFAULT_PROMPTS[0], num_inference_steps=4,
                        seeds=[row["seed"]]).images[0]
        assert np.array_equal(np.asarray(plain), np.asarray(Image.open(tmp_path / row["image"])))
    settings = {(r["scale"], r["start"], r["end"]) for r in rows if r["adapter"] != "none"}
    assert settings == {(0.5, 0.0, 1.0), (0.5, 0.0, 0.5), (1.0, 0.0, 1.0), (1.0, 0.0, 0.5)}


def test_ablation_deltas_are_paired_against_adapter_off(tmp_path):
    from adapterswap.sweep.analysis import ablation_deltas

    run_sweep(tiny_spec(tmp_path, backbones=["toy-fast"], seeds=[0, 1, 2], steps=[2],
                        adapter_off=True, metrics=["toy-colour-match", "sharpness"]))
    with RunStore(tmp_path, lock=False) as store:
        rows = store.rows()
        info = store.metric_info()  # directions as the run recorded them
    deltas = {d["metric"]: d for d in ablation_deltas(rows, metric_info=info)}
    on = {r["seed"]: r["scores"]["toy-colour-match"] for r in rows if r["adapter"] != "none"}
    off = {r["seed"]: r["scores"]["toy-colour-match"] for r in rows if r["adapter"] == "none"}
    delta = deltas["toy-colour-match"]
    assert delta["n"] == 3
    assert delta["mean"] == pytest.approx(np.mean([on[s] - off[s] for s in on]))
    assert delta["from_adapter"] == bool(delta["ci_low"] > 0)
    build_report(tmp_path)
    assert "Adapter ablation" in (tmp_path / "report.html").read_text()


def test_trajectory_scores_every_step_and_ends_at_the_final_image(tmp_path):
    run_sweep(tiny_spec(tmp_path, backbones=["toy-dev"], seeds=[0, 1], steps=[4],
                        trajectory=True, metrics=["sharpness", "toy-colour-match"]))
    with RunStore(tmp_path, lock=False) as store:
        rows = store.rows()
        trajectory = store.trajectory_rows()
    for row in rows:
        mine = [t for t in trajectory if t["cell"] == row["key"]]
        assert sorted({t["step"] for t in mine}) == [0, 1, 2, 3]
        last = {t["metric"]: t["value"] for t in mine if t["step"] == 3}
        # flow matching: x0 predicted at the last step is the final latent
        assert last["sharpness"] == pytest.approx(row["scores"]["sharpness"], rel=1e-6)
        assert (tmp_path / "images" / f"{row['key']}-trajectory.png").is_file()
    report = build_report(tmp_path).read_text()
    assert "Trajectories" in report
    assert (tmp_path / "plots" / "trajectory-sharpness.png").is_file()


def test_probes_are_stored_per_cell_step_and_block_without_changing_images(tmp_path):
    run_sweep(tiny_spec(tmp_path / "plain", backbones=["toy-dev"], seeds=[0, 1],
                        steps=[2, 4]))
    run_sweep(tiny_spec(tmp_path / "probed", backbones=["toy-dev"], seeds=[0, 1],
                        steps=[2, 4], probes=True))
    with RunStore(tmp_path / "probed", lock=False) as store:
        rows = store.rows()
        probes = store.probe_rows()
    for row in rows:
        mine = [p for p in probes if p["cell"] == row["key"]]
        assert sorted({p["step"] for p in mine}) == list(range(row["steps"]))
        assert {(p["block"], p["quantity"]) for p in mine} == {
            ("text", "text/latent"), ("out", "residual/velocity")}
    plain = scores_by_cell(tmp_path / "plain")
    probed = scores_by_cell(tmp_path / "probed")
    assert plain == probed
    report = build_report(tmp_path / "probed").read_text()
    assert "Attention-stream probes" in report


def test_probe_guided_exit_picks_the_window_and_compares_on_the_same_inputs(tmp_path):
    from adapterswap.sweep.exit import exit_comparison, exit_steps

    out = tmp_path / "exit"
    proc = cli("sweep", "--backbone", "toy-dev", "--preset", "tiny", "--seeds", "0,1,2",
               "--steps", "4,8", "--probe-exit", "8", "--out", str(out),
               "--metrics", "sharpness,toy-colour-match,latency")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    with RunStore(out, lock=False) as store:
        rows, probes = store.rows(), store.probe_rows()
        plan = store.meta("probe_exit")
        latency = store.latency_rows()
    # the plan is the first step whose mean residual/velocity ratio is below the threshold
    recomputed = exit_steps(rows, probes, "residual/velocity", 8.0)
    for entry in plan["plan"]:
        curve = recomputed[(entry["backbone"], entry["steps"])]["curve"]
        expected = next((i for i, v in enumerate(curve) if i > 0 and v < 8.0), None)
        assert entry["exit_step"] == expected
    windows = {(r["steps"], r["end"]) for r in rows}
    for entry in plan["plan"]:
        if entry["exit_step"] is not None:
            assert (entry["steps"], entry["end"]) in windows
    comparison = exit_comparison(rows, latency, plan, {"toy-dev|toy-adapter": "sharpness"})
    assert comparison and all(c["deltas"]["toy-colour-match"]["n"] == 3 for c in comparison)
    assert "Probe-guided adapter exit" in (out / "report.html").read_text()


def test_metric_options_reach_the_metric_and_are_validated(tmp_path):
    from adapterswap.cli import _metric_options

    assert _metric_options(("identity.recognizer=ir-se50", "identity.batch_size=4",
                            "lpips.against=baseline")) == {
        "identity": {"recognizer": "ir-se50", "batch_size": 4},
        "lpips": {"against": "baseline"}}
    with pytest.raises(InvalidArgumentError, match="--metric-option='recognizer'"):
        _metric_options(("recognizer",))
    with pytest.raises(InvalidArgumentError, match="metric_options='contrast'"):
        tiny_spec(tmp_path, metrics=["sharpness"],
                  metric_options={"contrast": {"x": 1}}).validate()
    seen = {}
    from adapterswap.metrics.basic import Sharpness

    original = Sharpness.__init__

    def spy(self, **options):
        seen.update(options)
        original(self, **options)

    Sharpness.__init__ = spy
    Sharpness.options_spec = {"mode": None}  # a metric declares the options it takes
    try:
        run_sweep(tiny_spec(tmp_path, backbones=["toy-fast"], seeds=[0], steps=[1],
                            metrics=["sharpness"], metric_options={"sharpness": {"mode": 3}}))
    finally:
        Sharpness.__init__ = original
        del Sharpness.options_spec
    assert seen.get("mode") == 3


def test_each_reference_is_encoded_once_per_backbone(tmp_path, monkeypatch):
    from toy_plugin import ToyAdapter

    calls = []
    original = ToyAdapter.encode_reference

    def counting(self, image, backbone):
        calls.append(1)
        return original(self, image, backbone)

    monkeypatch.setattr(ToyAdapter, "encode_reference", counting)
    run_sweep(tiny_spec(tmp_path, backbones=["toy-dev"], prompts=["a", "b", "c"],
                        scales=[0.5, 1.0], seeds=[0, 1], steps=[1, 2]))
    assert len(calls) == 1  # not once per prompt, scale or latency pass
