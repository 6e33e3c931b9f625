"""Runs and provenance end to end: readers show one run's cells, keys follow what changes
pixels (weights content, reference content, dtype), an unchanged re-run resumes."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3

import pytest
from adapterswap_sd15 import tiny
from adapterswap_sd15.backbones import SD15Backbone
from click.testing import CliRunner
from PIL import Image

from adapterswap.cli import main

TINY = ["--backbone", "sd15", "--preset", "tiny", "--adapter", "none", "--steps", "1,2",
        "--seeds", "0,1", "--metrics", "sharpness,contrast"]


def _sweep(out, *args, env=None):
    result = CliRunner().invoke(main, ["sweep", *args, "--out", str(out)], env=env)
    assert result.exit_code == 0, result.stderr + result.stdout
    return result


def _csv(out):
    with (out / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def _done(result) -> int:
    return int(result.stdout.split(" cells done")[0].split()[-1])


def test_two_sweeps_into_one_out_are_two_runs_and_readers_show_the_newest(tmp_path):
    out = tmp_path / "runs"
    _sweep(out, *TINY, "--prompt", "a red apple")
    _sweep(out, *TINY, "--prompt", "a blue door")

    rows = _csv(out)
    assert {r["prompt"] for r in rows} == {"a blue door"} and len(rows) == 4
    analysis = json.loads((out / "analysis.json").read_text())
    assert all(sum(c["n"]) == 4 for c in analysis["curves"] if c["metric"] == "sharpness")
    assert "a red apple" not in (out / "report.html").read_text()

    result = CliRunner().invoke(main, ["report", str(out), "--all-runs"])
    assert result.exit_code == 0, result.stderr
    assert {r["prompt"] for r in _csv(out)} == {"a red apple", "a blue door"}

    db = sqlite3.connect(out / "results.sqlite")
    runs = db.execute("SELECT id, code_hash, device, dtype, status FROM runs ORDER BY id")\
        .fetchall()
    assert len(runs) == 2
    assert all(code and device == "cpu" and dtype == "float32" and status == "done"
               for _, code, device, dtype, status in runs)
    by_prompt = dict(db.execute("SELECT DISTINCT prompt, run_id FROM cells").fetchall())
    assert by_prompt == {"a red apple": runs[0][0], "a blue door": runs[1][0]}


def test_one_seed_sweep_shows_no_interval(tmp_path):
    out = tmp_path / "one"
    _sweep(out, "--backbone", "sd15", "--preset", "tiny", "--adapter", "none",
           "--steps", "1,2", "--seeds", "0", "--metrics", "sharpness,contrast")
    analysis = json.loads((out / "analysis.json").read_text())
    for curve in analysis["curves"]:
        assert all(v is None for v in curve["ci_low"] + curve["ci_high"]), curve["metric"]
    # sharpness and contrast are diagnostics: nothing to recommend on
    assert analysis["recommendation"] is None and analysis["recommendation_reason"]


def test_a_kind_matched_metric_gives_a_recommendation_with_its_interval(tmp_path):
    out = tmp_path / "style"
    # toy-adapter is a style adapter; toy-colour-match measures style fidelity
    _sweep(out, "--backbone", "toy-fast", "--preset", "tiny", "--steps", "1,2,4",
           "--seeds", "0,1,2", "--metrics", "toy-colour-match,sharpness")
    analysis = json.loads((out / "analysis.json").read_text())
    recommendation = analysis["recommendation"]
    assert recommendation is not None and recommendation["metric"] == "toy-colour-match"
    low, high = recommendation["regime_interval"]
    assert low <= recommendation["regime"] <= high and recommendation["steps"] in (1, 2, 4)
    assert recommendation["adapter_kind"] == recommendation["metric_kind"] == "style"
    report = (out / "report.html").read_text()
    assert "regime 90% interval" in report and f"{low}-{high}" in report


def _reference(path, colour):
    Image.new("RGB", (32, 32), colour).save(path)
    return str(path)


def test_reference_content_not_path_keys_the_cells(tmp_path):
    out = tmp_path / "ref"
    ref = _reference(tmp_path / "ref.png", (200, 30, 30))
    args = ["--backbone", "sd15", "--preset", "tiny", "--ref", ref, "--steps", "1",
            "--seeds", "0", "--metrics", "sharpness"]
    assert _done(_sweep(out, *args)) == 1
    assert _done(_sweep(out, *args)) == 0  # nothing changed: resumes, no new cell
    _reference(tmp_path / "ref.png", (30, 30, 200))  # same path, other content
    assert _done(_sweep(out, *args)) == 1


@pytest.fixture(scope="module")
def saved_sd15(tmp_path_factory):
    return tiny.save_tiny_pipeline("sd15", tmp_path_factory.mktemp("w") / "sd15", seed=0)


def test_weights_content_and_dtype_key_the_cells(tmp_path, saved_sd15, monkeypatch):
    config = tmp_path / "config.toml"
    monkeypatch.setenv("ADAPTERSWAP_CONFIG", str(config))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(saved_sd15, copy)
    out = tmp_path / "out"
    size = SD15Backbone.tiny_size
    args = ["--backbone", "sd15", "--adapter", "none", "--steps", "1", "--seeds", "0",
            "--prompt", "a cat", "--metrics", "sharpness", "--height", str(size[0]),
            "--width", str(size[1]), "--device", "cpu"]

    config.write_text(f'[sources]\nsd15 = "{saved_sd15}"\n')
    assert _done(_sweep(out, *args)) == 1
    config.write_text(f'[sources]\nsd15 = "{copy}"\n')  # the same weights elsewhere
    assert _done(_sweep(out, *args)) == 0
    tiny.save_tiny_pipeline("sd15", copy, seed=1)  # other weights, same path
    assert _done(_sweep(out, *args)) == 1
    assert _done(_sweep(out, *args, "--dtype", "bf16")) == 1
    assert _done(_sweep(out, *args, "--dtype", "bf16")) == 0
    weights = [json.loads(w)["backbone:sd15"] for (w,) in sqlite3.connect(
        out / "results.sqlite").execute("SELECT weights FROM runs ORDER BY id")]
    assert weights[0] == weights[1] != weights[2] and weights[0].startswith("local:")


def test_latency_rows_carry_median_and_iqr_or_a_fit_with_residuals(tmp_path):
    out = tmp_path / "latency"
    _sweep(out, "--backbone", "toy-fast", "--preset", "tiny", "--steps", "1,2,4",
           "--seeds", "0", "--metrics", "sharpness,latency", "--timing-repeats", "5")
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT steps, total_s, total_q1_s, total_q3_s, repeats, method, fit, "
                      "samples_s FROM latency").fetchall()
    assert sorted(r[0] for r in rows) == [1, 2, 4]
    for _steps, median, q1, q3, repeats, method, fit, samples in rows:
        if method == "measured":
            assert repeats >= 5 and len(json.loads(samples)) == repeats
            assert q1 <= median <= q3
        else:  # predicted from a fixed + per-step model fitted to measured step counts
            assert method == "fitted" and json.loads(fit)["residuals_s"]
    analysis = json.loads((out / "analysis.json").read_text())
    table = next(iter(analysis["latency"].values()))
    assert all(entry["median_s"] > 0 for entry in table.values())
    # each cell's timings name the latency row they came from
    keys = {json.loads(t).get("latency_key") for (t,) in db.execute("SELECT timings FROM cells")}
    assert None not in keys and len(keys) == 3


class _FaceLike:
    """A style metric that, like a face metric without a face, cannot score some images:
    here every other image of a batch (scored ``None``)."""

    @staticmethod
    def make():
        from adapterswap import hookimpl
        from adapterswap.metrics.base import Metric

        class Spotty(Metric):
            name = "spotty"
            needs = frozenset({"reference"})
            kinds = frozenset({"style"})
            higher_is_better = True
            worst = 0.0

            def score(self, batch):  # noqa: ANN001
                return [None if i % 2 == 0 else 1.0 for i, _ in enumerate(batch.images)]

        class Plugin:
            @hookimpl
            def register_metrics(self, register):  # noqa: ANN001
                register(Spotty)

        return Plugin()


def test_images_a_metric_cannot_score_are_counted_not_dropped(tmp_path):
    from adapterswap import plugins

    plugins.register_plugin(_FaceLike.make(), name="spotty-plugin")
    try:
        out = tmp_path / "spotty"
        _sweep(out, "--backbone", "toy-fast", "--preset", "tiny", "--steps", "1,2",
               "--seeds", "0,1,2", "--metrics", "spotty")
        rows = sqlite3.connect(out / "results.sqlite").execute(
            "SELECT count(*), count(value) FROM scores WHERE metric = 'spotty'").fetchone()
        attempted, scored = rows
        assert attempted == 6  # every image has a row; unscored ones hold NULL
        assert 0 < scored < attempted, scored
        curve = next(c for c in json.loads((out / "analysis.json").read_text())["curves"]
                     if c["metric"] == "spotty")
        assert sum(curve["attempted"]) == attempted and sum(curve["scored"]) == scored
        assert curve["scored_share"] == [s / a for s, a in zip(curve["scored"],
                                                                 curve["attempted"])]
        result = CliRunner().invoke(main, ["report", str(out), "--missing", "worst"])
        assert result.exit_code == 0, result.stderr
        worst = next(c for c in json.loads((out / "analysis.json").read_text())["curves"]
                     if c["metric"] == "spotty")
        assert sum(worst["n"]) == attempted  # unscored images scored as the worst value
    finally:
        plugins.unregister_plugin("spotty-plugin")


def test_cells_whose_window_never_opens_are_flagged_and_left_out(tmp_path):
    out = tmp_path / "window"
    # window 0-0.25: step i acts when (i + 1) / N <= 0.25, so never with fewer than 4 steps
    result = _sweep(out, "--backbone", "toy-fast", "--preset", "tiny", "--steps", "1,2,4",
                    "--seeds", "0,1", "--start", "0", "--end", "0.25",
                    "--metrics", "toy-colour-match")
    assert "2 cell(s) have an adapter window that never opens" not in result.stderr  # per flag
    assert "4 cell(s) have an adapter window that never opens" in result.stderr
    rows = sqlite3.connect(out / "results.sqlite").execute(
        "SELECT steps, adapter_active_steps, confounds FROM cells").fetchall()
    for steps, active, confounds in rows:
        assert active == (1 if steps == 4 else 0)
        assert ("window_never_opens" in json.loads(confounds)) == (steps < 4)
    analysis = json.loads((out / "analysis.json").read_text())
    flagged = {(c["steps"], c["cells"]) for c in analysis["confounds"]
               if c["flag"] == "window_never_opens"}
    assert flagged == {(1, 2), (2, 2)}
    curve = next(c for c in analysis["curves"] if c["metric"] == "toy-colour-match")
    assert curve["steps"] == [4]  # the never-opened cells are not the adapter's curve
