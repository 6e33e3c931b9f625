"""The ``identity`` metric on tiny local face models placed where the real antelopev2 pack sits.

The expected scores are computed here without the plugin's code: insightface's SCRFD class run
directly at 640/320/160, ``norm_crop``, and the recognizer's ONNX graph run with onnxruntime on
the crop converted to RGB and scaled to [-1, 1] by hand, then the cosine by hand.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from adapterswap_flux.arcface import ARCFACE_FILENAME, IRSEArcFace
from adapterswap_flux.face import (
    ARCFACE_PATH_ENV,
    DETECTOR_FILENAME,
    FACE_PACK,
    INSIGHTFACE_ROOT_ENV,
    RECOGNIZER_FILENAME,
    arcface_candidates,
    insightface_root_candidates,
    onnx_providers,
)
from adapterswap_flux.identity import CONDITIONING_WARNING, IdentityMetric
from adapterswap_flux.tiny_face import (
    save_tiny_arcface,
    save_tiny_face_pack,
    tiny_face_image,
    tiny_face_keypoints,
)
from PIL import Image

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError
from adapterswap.metrics.base import MetricBatch

SECOND_SQUARE = (30, 100, 120)


@pytest.fixture(scope="module")
def flux_identity_root(tmp_path_factory):
    """An insightface root holding the tiny antelopev2 pack (detector + glintr100.onnx)."""
    return save_tiny_face_pack(tmp_path_factory.mktemp("insightface"), seed=0)


@pytest.fixture(scope="module")
def flux_identity_arcface(tmp_path_factory):
    """A tiny facexlib-style IR-SE ArcFace (the conditioning model)."""
    return save_tiny_arcface(tmp_path_factory.mktemp("facexlib") / ARCFACE_FILENAME, seed=3)


@pytest.fixture()
def flux_identity(flux_identity_root):
    return IdentityMetric(insightface_root=str(flux_identity_root), device="cpu").load()


def pack(root: Path) -> Path:
    return Path(root) / "models" / FACE_PACK


def faceless_image(size: int = 200) -> Image.Image:
    """Blue-grey noise: no pixel is marker-coloured, so the tiny detector finds nothing."""
    rng = np.random.default_rng(5)
    pixels = rng.normal([100, 110, 140], 8, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# -- the independent computation ------------------------------------------------------------------
def independent_crop(image: Image.Image, root: Path) -> np.ndarray | None:
    """insightface's SCRFD directly: 640, then 320, then 160; the largest box; norm_crop 112."""
    from insightface.model_zoo.scrfd import SCRFD
    from insightface.utils import face_align

    detector = SCRFD(model_file=str(pack(root) / DETECTOR_FILENAME))
    detector.prepare(-1)
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    for size in (640, 320, 160):
        boxes, kpss = detector.detect(bgr, input_size=(size, size), max_num=0, metric="default")
        if len(boxes):
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            best = max(range(len(areas)), key=lambda i: (areas[i], i))
            return face_align.norm_crop(bgr, landmark=kpss[best], image_size=112)
    return None


def onnx_embedding(crop_bgr: np.ndarray, recognizer: Path) -> np.ndarray:
    """The recognizer graph on the crop: BGR -> RGB, (x - 127.5) / 127.5, NCHW."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(recognizer), providers=["CPUExecutionProvider"])
    rgb = crop_bgr[:, :, ::-1].astype(np.float32)
    blob = ((rgb - 127.5) / 127.5).transpose(2, 0, 1)[None]
    (output,) = session.run(None, {session.get_inputs()[0].name: blob})
    return output[0].astype(np.float64)


@functools.lru_cache(maxsize=2)
def irse_model(arcface: Path) -> IRSEArcFace:
    return IRSEArcFace.from_state_dict(torch.load(arcface, weights_only=True)).float()


def irse_embedding(crop_bgr: np.ndarray, arcface: Path) -> np.ndarray:
    """facexlib's IR-SE ArcFace on the BGR crop in [-1, 1], as InfiniteYou feeds it."""
    model = irse_model(Path(arcface))
    pixels = torch.from_numpy(crop_bgr.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        return model(pixels)[0].double().numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.sqrt(a @ a) * np.sqrt(b @ b)))


def independent_score(image, reference, root: Path, *, embed=None) -> float | None:
    embed = embed or (lambda crop: onnx_embedding(crop, pack(root) / RECOGNIZER_FILENAME))
    crops = independent_crop(image, root), independent_crop(reference, root)
    if crops[0] is None or crops[1] is None:
        return None
    return cosine(embed(crops[0]), embed(crops[1]))


# -- the tiny recognizer --------------------------------------------------------------------------
def test_tiny_recognizer_is_routed_like_glintr100(flux_identity_root, flux_infiniteyou_root):
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    model = get_model(str(pack(flux_identity_root) / RECOGNIZER_FILENAME),
                      providers=["CPUExecutionProvider"])
    assert isinstance(model, ArcFaceONNX) and model.taskname == "recognition"
    # no mxnet-style normalisation nodes: insightface normalises with 127.5 / 127.5 itself
    assert (model.input_mean, model.input_std) == (127.5, 127.5)
    assert model.input_shape[1:] == [3, 112, 112] and model.output_shape[1:] == [64]
    # the tiny InfiniteYou repository has it beside the detector, as the real pack does
    infiniteyou_pack = flux_infiniteyou_root / "supports" / "insightface" / "models" / FACE_PACK
    assert (infiniteyou_pack / RECOGNIZER_FILENAME).is_file()
    assert (infiniteyou_pack / DETECTOR_FILENAME).is_file()


def test_declaration_and_registry():
    from adapterswap.plugins import get_metric

    assert get_metric("identity") is IdentityMetric
    assert IdentityMetric.needs == frozenset({"reference"})
    assert IdentityMetric.kinds == frozenset({"identity"})
    assert IdentityMetric.higher_is_better is True
    assert IdentityMetric.class_problems(IdentityMetric) == []


def test_listed_by_the_cli_through_the_entry_point():
    from importlib.metadata import entry_points

    assert any(e.value == "adapterswap_flux.plugin" for e in entry_points(group="adapterswap"))
    from adapterswap.plugins import LOAD_PLUGINS_ENV

    env = {k: v for k, v in os.environ.items() if k != LOAD_PLUGINS_ENV}  # all plugins
    result = subprocess.run([sys.executable, "-m", "adapterswap", "list", "metrics"],
                            capture_output=True, text=True, env=env, timeout=60, check=True)
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["identity", "reference", "True", "adapterswap-flux"] in rows


# -- scores ---------------------------------------------------------------------------------------
def test_scores_equal_the_independent_computation(flux_identity, flux_identity_root):
    reference = tiny_face_image(0)
    images = [tiny_face_image(1), tiny_face_image(2, square=SECOND_SQUARE)]
    scores = flux_identity.score(MetricBatch(images=images, references=[reference] * 2))
    assert flux_identity.detector_path == pack(flux_identity_root) / DETECTOR_FILENAME
    assert flux_identity.recognizer_path == pack(flux_identity_root) / RECOGNIZER_FILENAME
    for image, score in zip(images, scores):
        expected = independent_score(image, reference, flux_identity_root)
        assert isinstance(score, float) and score == pytest.approx(expected, abs=1e-6)
    # the crops the metric embeds are the independent ones, on the known keypoints
    crop = flux_identity.aligned_crop(images[1])
    np.testing.assert_array_equal(crop, independent_crop(images[1], flux_identity_root))
    faces = flux_identity.face.detect(np.asarray(images[1])[:, :, ::-1].copy())
    np.testing.assert_allclose(faces[0].kps, tiny_face_keypoints(SECOND_SQUARE), atol=1.0)
    assert flux_identity.notes() == []


def test_identical_image_scores_one_and_another_face_less(flux_identity):
    reference = tiny_face_image(0)
    same, other = flux_identity.score(MetricBatch(images=[reference.copy(), tiny_face_image(7)],
                                                  references=[reference, reference]))
    assert same == pytest.approx(1.0, abs=1e-5)
    assert other < same - 1e-4


def test_no_face_scores_none_and_is_counted(flux_identity):
    reference = tiny_face_image(0)
    images = [tiny_face_image(1), faceless_image(), tiny_face_image(2)]
    scores = flux_identity.score(MetricBatch(images=images, references=[reference] * 3))
    assert scores[1] is None and all(isinstance(s, float) for s in (scores[0], scores[2]))
    assert flux_identity.notes() == ["1 of 3 images had no detectable face (scored None)"]
    flux_identity.score(MetricBatch(images=[faceless_image(64)], references=[reference]))
    assert flux_identity.notes() == ["2 of 4 images had no detectable face (scored None)"]


def test_reference_without_face_scores_none_and_is_noted(flux_identity):
    images = [tiny_face_image(1), tiny_face_image(2)]
    scores = flux_identity.score(MetricBatch(images=images, references=[faceless_image()] * 2))
    assert scores == [None, None]
    assert flux_identity.notes() == [
        "1 reference image had no detectable face: the 2 images compared with it were scored "
        "None"]


def test_missing_reference_is_refused_or_scored_none(flux_identity):
    image = tiny_face_image(1)
    with pytest.raises(InvalidArgumentError, match="needs one reference per image"):
        flux_identity.score(MetricBatch(images=[image]))
    assert flux_identity.score(MetricBatch(images=[image], references=[None])) == [None]
    assert flux_identity.notes() == ["1 image had no reference image (scored None)"]


def test_conditioning_recognizer_warns_and_uses_ir_se50(flux_identity_root,
                                                        flux_identity_arcface):
    metric = IdentityMetric(recognizer="ir-se50", insightface_root=str(flux_identity_root),
                            arcface_path=str(flux_identity_arcface), device="cpu").load()
    assert metric.notes() == [CONDITIONING_WARNING]
    assert "same model that conditions generation" in CONDITIONING_WARNING
    assert "optimistic" in CONDITIONING_WARNING
    reference = tiny_face_image(0)
    images = [reference, tiny_face_image(4)]
    scores = metric.score(MetricBatch(images=images, references=[reference] * 2))
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    expected = independent_score(images[1], reference, flux_identity_root,
                                 embed=lambda crop: irse_embedding(crop, flux_identity_arcface))
    assert scores[1] == pytest.approx(expected, abs=1e-5)


def test_recognizer_may_be_an_onnx_path(flux_identity, flux_identity_root, tmp_path):
    copy = shutil.copy(pack(flux_identity_root) / RECOGNIZER_FILENAME, tmp_path / "mine.onnx")
    metric = IdentityMetric(recognizer=str(copy), insightface_root=str(flux_identity_root),
                            device="cpu").load()
    batch = MetricBatch(images=[tiny_face_image(1)], references=[tiny_face_image(0)])
    assert metric.recognizer_path == copy
    assert metric.score(batch) == pytest.approx(flux_identity.score(batch), abs=1e-7)
    detector = IdentityMetric(recognizer=str(pack(flux_identity_root) / DETECTOR_FILENAME),
                              insightface_root=str(flux_identity_root))
    with pytest.raises(MetricUnavailableError, match="not a face recognizer.*detection"):
        detector.load()


# -- finding the files ----------------------------------------------------------------------------
def test_missing_detector_names_where_it_looked(tmp_path):
    metric = IdentityMetric(insightface_root=str(tmp_path / "empty"))
    reason = metric.availability()
    assert reason is not None and reason.startswith("identity: ")
    assert str(tmp_path / "empty" / "models" / FACE_PACK) in reason
    assert DETECTOR_FILENAME in reason and "non-commercial" in reason
    with pytest.raises(MetricUnavailableError) as info:
        metric.load()
    assert reason in str(info.value)


def test_missing_recognizer_names_the_file(flux_identity_root, tmp_path):
    root = tmp_path / "detector-only"
    (pack(root)).mkdir(parents=True)
    shutil.copy(pack(flux_identity_root) / DETECTOR_FILENAME, pack(root) / DETECTOR_FILENAME)
    reason = IdentityMetric(insightface_root=str(root)).availability()
    assert reason is not None
    assert f"{str(pack(root) / RECOGNIZER_FILENAME)!r}" in reason
    assert "insightface_root=" in reason and INSIGHTFACE_ROOT_ENV in reason


def test_missing_conditioning_model_or_onnx_file_is_named(flux_identity_root, tmp_path):
    missing = tmp_path / "nope" / ARCFACE_FILENAME
    reason = IdentityMetric(recognizer="ir-se50", insightface_root=str(flux_identity_root),
                            arcface_path=str(missing)).availability()
    assert reason is not None and str(missing) in reason and ARCFACE_FILENAME in reason
    onnx = tmp_path / "absent.onnx"
    reason = IdentityMetric(recognizer=str(onnx),
                            insightface_root=str(flux_identity_root)).availability()
    assert reason is not None and f"{str(onnx)!r} does not exist" in reason


def test_bad_options_are_refused():
    with pytest.raises(InvalidArgumentError, match="'antelope'.*'antelopev2' or 'ir-se50'"):
        IdentityMetric(recognizer="antelope")
    with pytest.raises(InvalidArgumentError, match="unknown option.*recognizer"):
        IdentityMetric(det_size=320)
    with pytest.raises(InvalidArgumentError, match="must be a path"):
        IdentityMetric(insightface_root=3)


def test_default_search_order(flux_identity_root, tmp_path, monkeypatch):
    import huggingface_hub.constants

    home, cache = tmp_path / "home", tmp_path / "hf-cache"
    snapshot = cache / "models--ByteDance--InfiniteYou" / "snapshots" / "abc123"
    (snapshot / "supports").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    metric = IdentityMetric()
    assert metric.insightface_roots() == [snapshot / "supports" / "insightface",
                                          home / ".insightface"]
    reason = metric.availability()
    for place in (snapshot / "supports" / "insightface" / "models" / FACE_PACK,
                  home / ".insightface" / "models" / FACE_PACK):
        assert str(place) in reason
    # insightface's own ~/.insightface/models/antelopev2
    shutil.copytree(flux_identity_root / "models", home / ".insightface" / "models")
    assert metric.locate()[1] == home / ".insightface" / "models" / FACE_PACK / RECOGNIZER_FILENAME
    # InfiniteYou's supports/ in the Hugging Face cache comes before it
    shutil.copytree(flux_identity_root, snapshot / "supports" / "insightface")
    assert metric.locate()[0] == pack(snapshot / "supports" / "insightface") / DETECTOR_FILENAME
    # the environment variable comes first; an explicit option beats it
    monkeypatch.setenv(INSIGHTFACE_ROOT_ENV, str(flux_identity_root))
    assert metric.locate()[1] == pack(flux_identity_root) / RECOGNIZER_FILENAME
    explicit = IdentityMetric(insightface_root=str(home / ".insightface"))
    assert explicit.locate()[1].is_relative_to(home)


def test_adapter_honours_the_environment_variables(flux_infiniteyou_root, tmp_path, monkeypatch):
    from adapterswap_flux.infusenet import InfuseNet

    faces = tmp_path / "faces"
    shutil.copytree(flux_infiniteyou_root / "supports" / "insightface", faces)
    arcface = shutil.copy(flux_infiniteyou_root / "supports" / "facexlib" / ARCFACE_FILENAME,
                          tmp_path / ARCFACE_FILENAME)
    monkeypatch.setenv(INSIGHTFACE_ROOT_ENV, str(faces))
    monkeypatch.setenv(ARCFACE_PATH_ENV, str(arcface))
    assert insightface_root_candidates(None)[0] == faces
    assert arcface_candidates(None)[0] == Path(arcface)
    adapter = InfuseNet(str(flux_infiniteyou_root), device="cpu", dtype=torch.float32).load()
    assert adapter.face.detector_path == pack(faces) / DETECTOR_FILENAME
    assert adapter.face.arcface_path == Path(arcface)


def test_onnx_providers_follow_the_device(monkeypatch, flux_identity_root):
    import onnxruntime

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers("cuda:1") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    metric = IdentityMetric(insightface_root=str(flux_identity_root), device="cuda").load()
    assert metric.model.session.get_providers() == ["CPUExecutionProvider"]


# -- in a sweep -----------------------------------------------------------------------------------
def test_tiny_sweep_stores_identity_scores(flux_identity_root, tmp_path, monkeypatch):
    from adapterswap_flux.infusenet import InfuseNet

    from adapterswap.sweep.engine import SweepEngine, run_sweep
    from adapterswap.sweep.spec import SweepSpec
    from adapterswap.sweep.store import RunStore

    monkeypatch.setenv(INSIGHTFACE_ROOT_ENV, str(flux_identity_root))
    loaded = {}
    original = SweepEngine.load_metrics

    def keep(self):
        loaded.update(original(self))
        return loaded

    monkeypatch.setattr(SweepEngine, "load_metrics", keep)
    out = tmp_path / "sweep"
    summary = run_sweep(SweepSpec(backbones=["flux-schnell"], preset="tiny", seeds=[0],
                                  steps=[1, 2], metrics=["identity"], out=str(out)))
    assert summary.done == 2 and summary.failed == 0 and summary.unavailable_metrics == {}
    metric = loaded["identity"]
    assert metric.detector_path == pack(flux_identity_root) / DETECTOR_FILENAME
    reference = InfuseNet.tiny_reference(0)
    with RunStore(out, lock=False) as store:
        assert store.metric_status()["identity"] == (True, None)
        rows = store.rows()
    assert sorted(r["steps"] for r in rows) == [1, 2]
    for row in rows:
        assert "identity" in row["scores"]
        image = Image.open(out / row["image"]).convert("RGB")
        expected = independent_score(image, reference, flux_identity_root)
        stored = row["scores"]["identity"]
        assert (stored is None) == (expected is None)
        if expected is not None:
            assert stored == pytest.approx(expected, abs=1e-5)
    without_face = sum(r["scores"]["identity"] is None for r in rows)
    assert metric.images_checked == 2 and metric.images_without_face == without_face
    if without_face:
        assert f"{without_face} of 2 images had no detectable face (scored None)" in \
            metric.notes()
    else:
        assert metric.notes() == []

