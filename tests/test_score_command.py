"""``adapterswap score``: existing images scored with a registered metric (sharpness, the toy
colour match and test metrics registered here), JSON shape, missing scores counted, chunks,
and every refusal as one line before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from adapterswap import hookimpl, plugins
from adapterswap.cli import main
from adapterswap.metrics.base import Metric
from adapterswap.metrics.basic import laplacian_variance

PLUGIN = "score-test-metrics"
#: Every ``score`` call of the test metrics: (metric name, batch size).
CALLS: list[tuple[str, int]] = []
LOADED: list[str] = []


class DarkIsMissing(Metric):
    """Mean brightness in [0, 1]; no score (with a reason) for images darker than 0.2."""

    name = "test-dark-missing"
    description = "tests only"

    def load(self) -> Metric:
        LOADED.append(self.name)
        return super().load()

    def score(self, batch):  # noqa: ANN001
        CALLS.append((self.name, len(batch)))
        values = [float(np.asarray(image, dtype=np.float64).mean() / 255)
                  for image in batch.images]
        self.last_reasons = [None if v >= 0.2 else "too dark" for v in values]
        return [v if v >= 0.2 else None for v in values]


class SilentNone(Metric):
    """None for every image, without a reason; NaN for none."""

    name = "test-silent-none"
    description = "tests only"

    def score(self, batch):  # noqa: ANN001
        return [None if i % 2 else float("nan") for i in range(len(batch))]


class PromptLength(Metric):
    """Length of the prompt (needs a prompt)."""

    name = "test-prompt-length"
    needs = frozenset({"prompt"})
    description = "tests only"

    def score(self, batch):  # noqa: ANN001
        self.check_batch(batch)
        return [float(len(p)) for p in batch.prompts]


class NeedsBaseline(Metric):
    name = "test-needs-baseline"
    needs = frozenset({"baseline"})
    description = "tests only"

    def score(self, batch):  # noqa: ANN001
        return [0.0] * len(batch)


class Unavailable(Metric):
    name = "test-unavailable"
    description = "tests only"
    options_spec = {"model": "nowhere"}

    def availability(self):  # noqa: ANN201
        return f"its model {self.options.get('model', 'nowhere')!r} is not on this machine"

    def score(self, batch):  # noqa: ANN001
        raise AssertionError("never scored")


class ScoreTestMetrics:
    @hookimpl
    def register_metrics(self, register):  # noqa: ANN001
        for metric in (DarkIsMissing, SilentNone, PromptLength, NeedsBaseline, Unavailable):
            register(metric)


@pytest.fixture(autouse=True)
def test_metrics():
    plugins.register_plugin(ScoreTestMetrics(), name=PLUGIN)
    CALLS.clear()
    LOADED.clear()
    try:
        yield
    finally:
        plugins.unregister_plugin(PLUGIN)


@pytest.fixture()
def runner():
    return CliRunner()


def grey(value: int, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def noise(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


@pytest.fixture()
def folder(tmp_path):
    """Three images (saved out of name order) and two files that are not images."""
    out = tmp_path / "out"
    out.mkdir()
    for name, seed in (("c.png", 2), ("a.png", 0), ("b.jpg", 1)):
        noise(seed).save(out / name)
    (out / "results.sqlite").write_bytes(b"not an image")
    (out / "notes.txt").write_text("hello")
    (out / "nested").mkdir()
    noise(9).save(out / "nested" / "deeper.png")
    return out


def errors_of(result) -> list[str]:  # noqa: ANN001
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_a_folder_contributes_its_image_files_sorted_in_json(runner, folder):
    result = runner.invoke(main, ["score", "--metric", "sharpness", str(folder), "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["image"] for row in rows] == [str(folder / n) for n in ("a.png", "b.jpg", "c.png")]
    for row in rows:
        assert set(row) == {"image", "metric", "score", "reason"}
        assert row["metric"] == "sharpness" and row["reason"] is None
        with Image.open(row["image"]) as image:
            assert row["score"] == pytest.approx(laplacian_variance(image.convert("RGB")))


def test_text_output_one_line_per_image_then_the_summary(runner, folder):
    files = [str(folder / "c.png"), str(folder / "a.png")]
    result = runner.invoke(main, ["score", "--metric", "sharpness", *files])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    scores = []
    for line, path in zip(lines, files):  # files in the order given
        shown, value = line.split("  ")
        assert shown == path
        scores.append(float(value))
    mean = sum(scores) / 2
    assert lines[2].startswith(f"sharpness: 2 scored, 0 missing, mean {mean:.4f} "
                               "(standard error ")
    assert lines[2].endswith("; higher is better)")
    single = runner.invoke(main, ["score", "--metric", "sharpness", files[0]])
    assert "(n too small for an error; higher is better)" in single.stdout


def test_toy_metric_with_a_reference(runner, tmp_path):
    from toy_plugin import ToyColourMatch

    reference = tmp_path / "ref.png"
    Image.new("RGB", (8, 8), (200, 100, 50)).save(reference)
    image = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (100, 100, 100)).save(image)
    result = runner.invoke(main, ["score", "--metric", "toy-colour-match", "--ref",
                                  str(reference), str(image), "--json"])
    assert result.exit_code == 0, result.stderr
    [row] = json.loads(result.stdout)
    expected = ToyColourMatch().score(_batch([Image.open(image)], Image.open(reference)))[0]
    assert row == {"image": str(image), "metric": "toy-colour-match",
                   "score": pytest.approx(expected), "reason": None}


def _batch(images, reference):  # noqa: ANN001, ANN202
    from adapterswap.metrics.base import MetricBatch

    return MetricBatch(images=[i.convert("RGB") for i in images],
                       references=[reference.convert("RGB")] * len(images))


def test_missing_scores_are_counted_with_the_metrics_reason(runner, tmp_path):
    for name, value in (("1.png", 10), ("2.png", 200), ("3.png", 20), ("4.png", 150)):
        grey(value).save(tmp_path / name)
    result = runner.invoke(main, ["score", "--metric", "test-dark-missing", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{tmp_path / '1.png'}  missing (too dark)"
    assert lines[1] == f"{tmp_path / '2.png'}  {200 / 255:.4f}"
    mean = (200 + 150) / 255 / 2
    assert lines[4].startswith(f"test-dark-missing: 2 scored, 2 missing, mean {mean:.4f}")
    rows = json.loads(runner.invoke(main, ["score", "--metric", "test-dark-missing",
                                           str(tmp_path), "--json"]).stdout)
    assert [row["score"] is None for row in rows] == [True, False, True, False]
    assert rows[0]["reason"] == "too dark" and rows[1]["reason"] is None


def test_none_without_a_reason_and_nan_are_missing(runner, tmp_path):
    for name in ("a.png", "b.png"):
        grey(100).save(tmp_path / name)
    result = runner.invoke(main, ["score", "--metric", "test-silent-none", str(tmp_path),
                                  "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)  # strict JSON: no NaN
    assert [row["score"] for row in rows] == [None, None]
    assert rows[0]["reason"] == "the metric returned nan"
    assert rows[1]["reason"] == "the metric gave no score"
    text = runner.invoke(main, ["score", "--metric", "test-silent-none", str(tmp_path)])
    assert text.stdout.splitlines()[-1] == "test-silent-none: 0 scored, 2 missing, no mean"


def test_images_are_scored_in_chunks(runner, tmp_path):
    for i in range(5):
        grey(100 + i).save(tmp_path / f"{i}.png")
    result = runner.invoke(main, ["score", "--metric", "test-dark-missing", str(tmp_path),
                                  "--batch-size", "2"])
    assert result.exit_code == 0, result.stderr
    assert CALLS == [("test-dark-missing", 2), ("test-dark-missing", 2),
                     ("test-dark-missing", 1)]


def test_a_prompt_metric_reads_the_prompt(runner, folder):
    refused = runner.invoke(main, ["score", "--metric", "test-prompt-length", str(folder)])
    assert refused.exit_code == 2
    [error] = errors_of(refused)
    assert "--prompt" in error and "test-prompt-length" in error
    result = runner.invoke(main, ["score", "--metric", "test-prompt-length", "--prompt",
                                  "a chef", str(folder / "a.png"), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["score"] == 6.0


@pytest.mark.parametrize("metric, words", [("latency", "timings"),
                                           ("test-needs-baseline", "baseline images")])
def test_metrics_that_need_a_sweep_are_refused(runner, folder, metric, words):
    result = runner.invoke(main, ["score", "--metric", metric, str(folder)])
    assert result.exit_code == 2
    [error] = errors_of(result)
    assert f"metric {metric!r} needs {words}" in error and "adapterswap sweep" in error


def test_a_reference_metric_without_ref_is_refused(runner, folder):
    result = runner.invoke(main, ["score", "--metric", "toy-colour-match", str(folder)])
    assert result.exit_code == 2
    [error] = errors_of(result)
    assert "--ref" in error


def test_unknown_metric_suggests_the_close_name(runner, folder):
    result = runner.invoke(main, ["score", "--metric", "sharpnes", str(folder)])
    assert result.exit_code == 2
    [error] = errors_of(result)
    assert "Did you mean 'sharpness'?" in error


def test_unavailable_metric_says_why_and_exits_1(runner, folder):
    result = runner.invoke(main, ["score", "--metric", "test-unavailable", str(folder),
                                  "--metric-option", "model=/models/x"])
    assert result.exit_code == 1
    [error] = errors_of(result)
    assert error == ("error: metric 'test-unavailable' is unavailable: its model '/models/x' "
                     "is not on this machine")


def test_unknown_metric_option_is_refused(runner, folder):
    result = runner.invoke(main, ["score", "--metric", "sharpness", str(folder),
                                  "--metric-option", "gamma=2"])
    assert result.exit_code == 2
    [error] = errors_of(result)
    assert "'gamma'" in error and "sharpness" in error


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "nope.png", "no such file or folder"),
    (lambda d: d / "out" / "notes.txt", "cannot be read as an image"),
    (lambda d: d / "empty", "the folder holds no image files"),
])
def test_bad_paths_are_one_line_naming_the_file_before_any_model_loads(runner, folder,
                                                                       make, expected):
    (folder.parent / "empty").mkdir()
    bad = make(folder.parent)
    result = runner.invoke(main, ["score", "--metric", "test-dark-missing",
                                  str(folder / "a.png"), str(bad)])
    assert result.exit_code == 2
    [error] = errors_of(result)
    assert str(bad) in error and expected in error
    assert LOADED == [] and CALLS == [] and result.stdout == ""


def test_a_bad_reference_is_refused_naming_it(runner, folder):
    result = runner.invoke(main, ["score", "--metric", "toy-colour-match", "--ref",
                                  str(folder / "notes.txt"), str(folder)])
    assert result.exit_code == 2
    [error] = errors_of(result)
    assert "--ref" in error and "notes.txt" in error


def test_a_bad_device_is_refused(runner, folder):
    result = runner.invoke(main, ["score", "--metric", "sharpness", str(folder),
                                  "--device", "gpu7"])
    assert result.exit_code == 2
    assert "--device" in errors_of(result)[0]


def test_score_is_listed_with_examples(runner):
    assert "score" in runner.invoke(main, ["--help"]).stdout
    text = runner.invoke(main, ["score", "--help"]).stdout
    assert "Examples:" in text and "--metric" in text and "--json" in text
