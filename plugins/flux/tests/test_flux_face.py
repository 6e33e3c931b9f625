"""The face pipeline's real code (insightface SCRFD routing and decoding, norm_crop, IR-SE ArcFace)
running on tiny local models placed where InfiniteYou keeps the real ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapterswap_flux.arcface import ARCFACE_FILENAME, IRSEArcFace, IRSEConfig
from adapterswap_flux.face import (
    DETECTION_SIZES,
    DETECTOR_FILENAME,
    FACE_PACK,
    DetectedFace,
    FaceAnalyzer,
    NoFaceError,
    blank_canvas,
    draw_keypoints,
    find_arcface,
    find_detector,
    insightface_root_candidates,
    pil_to_bgr,
    resize_and_pad,
)
from adapterswap_flux.tiny_face import (
    TINY_FACE_SQUARE,
    save_tiny_face_models,
    tiny_face_image,
    tiny_face_keypoints,
)
from PIL import Image

from adapterswap.errors import WeightsNotFoundError


@pytest.fixture(scope="module")
def flux_face_root(tmp_path_factory):
    return save_tiny_face_models(tmp_path_factory.mktemp("infiniteyou"), seed=0)


@pytest.fixture(scope="module")
def flux_face(flux_face_root):
    detector = find_detector(insightface_root_candidates(flux_face_root))
    arcface = find_arcface([flux_face_root / "supports" / "facexlib"])
    return FaceAnalyzer(detector, arcface).load()


def test_tiny_models_sit_where_the_real_packs_do(flux_face_root, flux_face):
    from insightface.model_zoo.scrfd import SCRFD

    pack = flux_face_root / "supports" / "insightface" / "models" / FACE_PACK
    assert flux_face.detector_path == pack / DETECTOR_FILENAME
    assert flux_face.arcface_path == flux_face_root / "supports" / "facexlib" / ARCFACE_FILENAME
    # insightface's own model router recognised the ONNX file as an SCRFD detector with keypoints
    assert isinstance(flux_face.detector, SCRFD)
    assert flux_face.detector.use_kps and flux_face.detector.fmc == 3


def test_detection_finds_the_known_keypoints(flux_face):
    faces = flux_face.detect(pil_to_bgr(tiny_face_image(0)))
    assert len(faces) == 1
    face = faces[0]
    left, top, side = TINY_FACE_SQUARE
    np.testing.assert_allclose(face.bbox, [left, top, left + side, top + side], atol=1.5)
    np.testing.assert_allclose(face.kps, tiny_face_keypoints(), atol=1.0)
    assert face.detection_size == 640 and face.score == pytest.approx(0.9)


def test_keypoints_follow_the_face(flux_face):
    square = (30, 100, 120)
    faces = flux_face.detect(pil_to_bgr(tiny_face_image(1, square=square)))
    np.testing.assert_allclose(faces[0].kps, tiny_face_keypoints(square), atol=1.0)


def test_no_face_error_names_image_and_sizes_after_trying_each(flux_face, monkeypatch):
    tried = []
    detect = flux_face.detector.detect

    def spy(image, input_size=None, **kwargs):
        tried.append(input_size)
        return detect(image, input_size=input_size, **kwargs)

    monkeypatch.setattr(flux_face.detector, "detect", spy)
    blank = pil_to_bgr(Image.new("RGB", (120, 90), (90, 100, 130)))
    with pytest.raises(NoFaceError) as info:
        flux_face.embed(blank, image_name="holiday.jpg")
    assert tried == [(640, 640), (320, 320), (160, 160)]
    message = str(info.value)
    assert "holiday.jpg" in message and "640x640, 320x320, 160x160" in message
    assert info.value.sizes == DETECTION_SIZES


def test_falls_back_to_smaller_detection_sizes(flux_face, monkeypatch):
    detect = flux_face.detector.detect

    def only_small(image, input_size=None, **kwargs):
        if input_size[0] > 160:
            return np.empty((0, 5), np.float32), np.empty((0, 5, 2), np.float32)
        return detect(image, input_size=input_size, **kwargs)

    monkeypatch.setattr(flux_face.detector, "detect", only_small)
    faces = flux_face.detect(pil_to_bgr(tiny_face_image(0)))
    assert faces[0].detection_size == 160
    np.testing.assert_allclose(faces[0].kps, tiny_face_keypoints(), atol=2.0)


def test_largest_face_is_chosen(flux_face, monkeypatch):
    small = DetectedFace(np.array([0, 0, 10, 10.0]), np.zeros((5, 2)), 0.99, 640)
    large = DetectedFace(np.array([0, 0, 30, 20.0]), np.ones((5, 2)), 0.6, 640)
    monkeypatch.setattr(flux_face, "detect", lambda image: [small, large, small])
    assert flux_face.largest_face(np.zeros((8, 8, 3), np.uint8)) is large


def test_alignment_maps_the_face_square_onto_the_crop(flux_face):
    import cv2

    image = pil_to_bgr(tiny_face_image(0))
    face = flux_face.detect(image)[0]
    crop = flux_face.aligned_crop(image, face.kps)
    left, top, side = TINY_FACE_SQUARE
    # the keypoints are the ArcFace template scaled to the square, so the crop is the square
    square = cv2.resize(image[top:top + side, left:left + side], (112, 112),
                        interpolation=cv2.INTER_AREA)
    assert crop.shape == (112, 112, 3)
    assert np.abs(crop[4:-4, 4:-4].astype(float) - square[4:-4, 4:-4]).mean() < 12


def test_embedding_is_arcface_of_the_bgr_crop_in_minus_one_one(flux_face, flux_face_root):
    from insightface.utils import face_align

    image = pil_to_bgr(tiny_face_image(2))
    embedding, face = flux_face.embed(image)
    crop = face_align.norm_crop(image, landmark=face.kps, image_size=112)
    state = torch.load(flux_face_root / "supports" / "facexlib" / ARCFACE_FILENAME,
                       weights_only=True)
    network = IRSEArcFace.from_state_dict(state)
    pixels = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = network(pixels)
    assert embedding.shape == (1, 64)
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=0)
    assert float(embedding.norm()) == pytest.approx(1.0, abs=1e-5)
    other, _ = flux_face.embed(pil_to_bgr(tiny_face_image(3)))
    assert not torch.allclose(embedding, other, atol=1e-3)


def test_ir_se_layout_matches_facexlib_key_names():
    config = IRSEConfig.ir_se50()
    assert len(config.units) == 24 and config.embedding_dim == 512
    with torch.device("meta"):
        model = IRSEArcFace(config)
    keys = set(model.state_dict())
    for key in ("input_layer.0.weight", "input_layer.2.weight", "body.0.res_layer.5.fc1.weight",
                "body.3.shortcut_layer.0.weight", "body.3.shortcut_layer.1.running_var",
                "body.23.res_layer.4.bias", "output_layer.3.weight",
                "output_layer.4.running_mean"):
        assert key in keys, key
    assert "body.0.shortcut_layer.0.weight" not in keys  # 64 -> 64: max-pool shortcut
    assert IRSEConfig.from_state_dict(model.state_dict()) == config
    assert model.state_dict()["output_layer.3.weight"].shape == (512, 512 * 7 * 7)


def test_ir_se50_equals_facexlib():
    """The real recognition_arcface_ir_se50.pth is a state dict of facexlib's class: a random
    one of those loads strictly into ours and gives the same embeddings."""
    arcface_arch = pytest.importorskip("facexlib.recognition.arcface_arch")
    torch.manual_seed(0)
    theirs = arcface_arch.Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
    for module in theirs.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    theirs.eval()
    ours = IRSEArcFace.from_state_dict(theirs.state_dict())
    assert ours.config == IRSEConfig.ir_se50()
    pixels = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), theirs(pixels), atol=1e-5, rtol=1e-4)


def test_missing_face_models_name_the_searched_places(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        find_detector([tmp_path / "nowhere"])
    message = str(info.value)
    assert "nowhere" in message and "antelopev2" in message and "insightface_root" in message
    with pytest.raises(WeightsNotFoundError) as info:
        find_arcface([tmp_path / "no-facexlib"])
    message = str(info.value)
    assert "no-facexlib" in message and ARCFACE_FILENAME in message
    assert "github.com/xinntao/facexlib" in message


def test_keypoint_canvas_and_blank_canvas():
    kps = tiny_face_keypoints()
    canvas = np.asarray(draw_keypoints((256, 200), kps))
    assert canvas.shape == (200, 256, 3)
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    for (x, y), colour in zip(kps, expected):
        assert tuple(canvas[int(y), int(x)]) == colour
    assert canvas[5, 5].tolist() == [0, 0, 0]
    assert not np.asarray(blank_canvas((32, 16))).any()
    assert blank_canvas((32, 16)).size == (32, 16)


def test_resize_and_pad_keeps_aspect_on_white():
    image = Image.new("RGB", (100, 50), (10, 20, 30))
    padded = resize_and_pad(image, (64, 64))
    array = np.asarray(padded)
    assert padded.size == (64, 64)
    assert array[0, 0].tolist() == [255, 255, 255]  # padding above
    assert array[32, 32].tolist() == [10, 20, 30]  # the image, 64 x 32, centred
    assert (array[:, :, 0] == 10).sum() == 64 * 32
