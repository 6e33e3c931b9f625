"""The GPU benchmark history script (``benchmarks/history.py``): results append as one line
each with commit, card, torch and every number, and plot and show read them back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def history():
    spec = importlib.util.spec_from_file_location("bench_history",
                                                  ROOT / "benchmarks" / "history.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_append_and_read_back(history, tmp_path, capsys):
    log = tmp_path / "gpu.jsonl"
    for commit, speed in (("aaaa1111", 6.2), ("bbbb2222", 8.0)):
        result = tmp_path / "flux.json"
        result.write_text(json.dumps({
            "device": "NVIDIA H200", "torch": "2.11.0",
            "rows": {"schnell": {"median_s": 1.02 / speed * 6.2, "speedup": speed,
                                 "note": "text is skipped", "ok": True}},
            "steps": [1, 2, float("nan")]}))
        history.main(["--history", str(log), "append", str(result), "--commit", commit])
    lines = history.read(log)
    assert [line["commit"] for line in lines] == ["aaaa1111", "bbbb2222"]
    assert lines[0]["card"] == "NVIDIA H200" and lines[0]["torch"] == "2.11.0"
    assert lines[1]["figures"] == {"rows.schnell.median_s": pytest.approx(0.7905),
                                   "rows.schnell.speedup": 8.0, "steps.0": 1.0,
                                   "steps.1": 2.0}
    history.main(["--history", str(log), "show", "--figure", "speedup"])
    shown = capsys.readouterr().out
    assert "NVIDIA H200 | flux.rows.schnell.speedup: aaaa1111 6.2, bbbb2222 8" in shown
    out = history.plot(lines, "*speedup", tmp_path / "plot.png")
    assert out.is_file() and out.stat().st_size > 1000
    with pytest.raises(SystemExit, match="no figure"):
        history.plot(lines, "nothing-like-this", tmp_path / "none.png")


def test_a_result_without_numbers_is_refused(history, tmp_path):
    result = tmp_path / "empty.json"
    result.write_text(json.dumps({"device": "cpu", "note": "nothing measured"}))
    with pytest.raises(SystemExit, match="no numbers"):
        history.append(result, tmp_path / "gpu.jsonl", commit="cccc")
