"""References given as embedding files (``--ref face.npy``): checked before any model loads,
refused by adapters that take images only, and scored honestly: a metric that compares with
the reference image records a missing score (counted), never a number."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from toy_plugin import ToyAdapter

from adapterswap import hookimpl
from adapterswap.cli import main
from adapterswap.errors import InvalidArgumentError
from adapterswap.plugins import register_plugin, unregister_plugin
from adapterswap.references import is_embedding, load_embedding
from adapterswap.sweep.checks import check_reference

PLUGIN = "toy-embedding-plugin"


class ToyEmbeddingAdapter(ToyAdapter):
    """The toy adapter, conditioned on a 3-d "colour embedding" file or an image."""

    name = "toy-embedding-adapter"
    embedding_dim = 3

    def encode_reference(self, image, backbone):  # noqa: ANN001
        import torch

        from adapterswap.denoise import TensorBundle

        if is_embedding(image):
            vector = load_embedding(image, dim=self.embedding_dim)
            return TensorBundle({"colour": torch.from_numpy(vector).reshape(1, 3)})
        return super().encode_reference(image, backbone)


class EmbeddingPlugin:
    @hookimpl
    def register_adapters(self, register):  # noqa: ANN001
        register(ToyEmbeddingAdapter)


@pytest.fixture(scope="module", autouse=True)
def embedding_plugin():
    register_plugin(EmbeddingPlugin(), name=PLUGIN)
    yield
    unregister_plugin(PLUGIN)


@pytest.fixture()
def embedding(tmp_path):
    path = tmp_path / "face.npy"
    np.save(path, np.array([[0.2, 0.5, 0.9]], dtype=np.float64))  # (1, D) is accepted
    return path


def test_an_embedding_file_is_read_safely_and_checked(tmp_path, embedding) -> None:
    assert load_embedding(embedding, dim=3).tolist() == pytest.approx([0.2, 0.5, 0.9])
    with pytest.raises(InvalidArgumentError, match="is a 3-d embedding; the adapter takes 512"):
        load_embedding(embedding, dim=512)
    pickled = tmp_path / "object.npy"
    np.save(pickled, np.array([{"not": "numbers"}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidArgumentError, match="object.npy"):
        load_embedding(pickled)  # allow_pickle=False: refused, never unpickled
    bad = tmp_path / "nan.npy"
    np.save(bad, np.array([1.0, np.nan, 0.0]))
    with pytest.raises(InvalidArgumentError, match="not finite"):
        load_embedding(bad)
    matrix = tmp_path / "matrix.npy"
    np.save(matrix, np.zeros((2, 3)))
    with pytest.raises(InvalidArgumentError, match=r"one vector.*\(2, 3\)"):
        load_embedding(matrix)


def test_an_adapter_that_takes_images_only_refuses_the_file(embedding) -> None:
    with pytest.raises(InvalidArgumentError,
                       match="embedding file, but adapter 'toy-adapter' takes reference "
                             "images only"):
        check_reference("references", str(embedding), ToyAdapter)
    check_reference("references", str(embedding), ToyEmbeddingAdapter)


def test_a_sweep_on_an_embedding_counts_image_metrics_as_missing(tmp_path, embedding) -> None:
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, [
        "sweep", "--backbone", "toy-dev", "--preset", "tiny",
        "--adapter", "toy-embedding-adapter",
        "--ref", str(embedding), "--steps", "1,2", "--seeds", "0,1",
        "--metrics", "toy-colour-match,sharpness", "--timing-repeats", "0",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    with sqlite3.connect(out / "results.sqlite") as db:
        scores = db.execute("SELECT metric, value FROM scores").fetchall()
    by_metric: dict[str, list] = {}
    for metric, value in scores:
        by_metric.setdefault(metric, []).append(value)
    assert len(by_metric["sharpness"]) == 4 and None not in by_metric["sharpness"]
    assert by_metric["toy-colour-match"] == [None] * 4  # no image to compare: missing
    analysis = json.loads((out / "analysis.json").read_text())
    assert "toy-colour-match" in json.dumps(analysis)
    assert not (out / "references").exists() or not any((out / "references").iterdir())


def test_generate_refuses_an_embedding_for_an_image_adapter_before_loading(
        tmp_path, embedding) -> None:
    result = CliRunner().invoke(main, [
        "generate", "--backbone", "toy-dev", "--adapter", "toy-adapter", "--preset", "tiny",
        "--ref", str(embedding), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "--ref=" in result.output and "takes reference images only" in result.output
    assert not (tmp_path / "x.png").exists()
