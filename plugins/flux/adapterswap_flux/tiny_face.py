"""Tiny stand-ins for InfiniteYou's face models, so the real face code runs without real weights.

- :class:`TinySCRFD` is a deterministic detector with the output structure of insightface's
  SCRFD (strides 8/16/32, two anchors per cell, 9 outputs: scores, box distances and keypoint
  distances). It finds one "face": the pixels whose red channel exceeds the blue one by more than
  :data:`MARKER_THRESHOLD`. The box is the square of that region's area centred on its centroid,
  and the 5 keypoints sit in the box where ArcFace's alignment template puts them. Exported to
  ONNX (:func:`export_tiny_detector`) it is routed by ``insightface.model_zoo.get_model`` to
  insightface's own ``SCRFD`` class, whose pre-processing, anchor decoding and NMS then run.
- A tiny IR-SE ArcFace (:class:`~adapterswap_flux.arcface.IRSEConfig.tiny`) with random weights,
  saved as a facexlib-style ``.pth``.
- :class:`TinyRecognizer`, a small random convolutional network with the interface of the pack's
  ArcFace R100 (``glintr100.onnx``): input ``(N, 3, 112, 112)``, one ``(N, E)`` embedding output.
  Exported to ONNX (:func:`export_tiny_recognizer`) it is routed by insightface's model router to
  ``ArcFaceONNX`` (square input of at least 112 px, one output), whose ``get_feat``
  pre-processing then runs.
- :func:`tiny_face_image`: a synthetic 256 x 256 portrait whose face square, and so whose
  keypoints (:func:`tiny_face_keypoints`), are known.

:func:`save_tiny_face_models` writes the models where InfiniteYou's layout keeps the real ones:
``supports/insightface/models/antelopev2/scrfd_10g_bnkps.onnx`` and ``glintr100.onnx`` (written
by :func:`save_tiny_face_pack`, which makes any directory an insightface root), and
``supports/facexlib/recognition_arcface_ir_se50.pth``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: insightface's ArcFace alignment template for a 112 px crop (eyes, nose tip, mouth corners).
ARCFACE_TEMPLATE_112: tuple[tuple[float, float], ...] = (
    (38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
    (41.5493, 92.3655), (70.7299, 92.2041))
#: A pixel belongs to the tiny detector's face when ``R - B`` exceeds this (0..255 scale).
MARKER_THRESHOLD = 127.0
#: Smallest face area (detector-input pixels) the tiny detector reports.
MIN_FACE_AREA = 64.0
#: Score the tiny detector gives the anchors inside a face (insightface keeps scores >= 0.5).
FACE_SCORE = 0.9

TINY_IMAGE_SIZE = 256
#: ``(left, top, side)`` of the face square in the synthetic image.
TINY_FACE_SQUARE = (80, 72, 96)


def tiny_face_keypoints(square: tuple[int, int, int] = TINY_FACE_SQUARE) -> np.ndarray:
    """The 5 keypoints ``(5, 2)`` of the synthetic face (pixel-edge coordinates)."""
    import numpy as np

    left, top, side = square
    template = np.asarray(ARCFACE_TEMPLATE_112, dtype=np.float64) / 112.0
    return np.stack([left + template[:, 0] * side, top + template[:, 1] * side], axis=1)


def tiny_face_image(seed: int = 0, *, square: tuple[int, int, int] = TINY_FACE_SQUARE,
                    size: int = TINY_IMAGE_SIZE) -> Image.Image:
    """A synthetic portrait: a blue-grey textured background (no marker pixels) and a warm face
    square with darker eyes, nose and mouth, all of them marker-coloured so the face region is
    exactly the square. ``seed`` changes the texture and the face's tint."""
    import cv2
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = 110 + 40 * np.sin(5 * x + 3 * y + rng.uniform(0, 6.28))
    background = np.stack([base, base + 10, base + 30], axis=-1)
    background += rng.normal(0, 6, size=background.shape)
    image = np.clip(background, 0, 255)
    left, top, side = square
    tint = rng.uniform(-15, 15, size=3)
    skin = np.array([235.0, 170.0, 70.0]) + tint
    image[top:top + side, left:left + side] = skin
    canvas = np.ascontiguousarray(image.astype(np.uint8))
    kps = tiny_face_keypoints(square)
    feature = (150, 30, 10)
    for eye in kps[:2]:
        cv2.circle(canvas, (int(eye[0]), int(eye[1])), max(2, side // 14), feature, -1)
    nose = kps[2]
    cv2.circle(canvas, (int(nose[0]), int(nose[1])), max(2, side // 20), (255, 120, 60), -1)
    cv2.line(canvas, tuple(int(v) for v in kps[3]), tuple(int(v) for v in kps[4]), feature,
             max(1, side // 24))
    return Image.fromarray(canvas, "RGB")


def _detector_module():  # noqa: ANN202 - the class needs torch, imported lazily
    import torch
    from torch import nn

    class TinySCRFD(nn.Module):
        """SCRFD-shaped deterministic detector of the marker-coloured square (see module doc)."""

        strides = (8, 16, 32)

        def __init__(self) -> None:
            super().__init__()
            template = torch.tensor(ARCFACE_TEMPLATE_112) / 112.0
            self.register_buffer("template", template)

        def forward(self, blob: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # insightface feeds (pixel - 127.5) / 128 in RGB order.
            rgb = blob[0] * 128.0 + 127.5
            mask = (rgb[0] - rgb[2] > MARKER_THRESHOLD).to(blob.dtype)
            ones = torch.ones_like(mask)
            ys = torch.cumsum(ones, dim=0) - 0.5  # pixel centres
            xs = torch.cumsum(ones, dim=1) - 0.5
            area = mask.sum()
            safe = torch.clamp(area, min=1.0)
            cx = (mask * xs).sum() / safe
            cy = (mask * ys).sum() / safe
            side = torch.sqrt(area)
            x1, y1 = cx - side / 2, cy - side / 2
            x2, y2 = cx + side / 2, cy + side / 2
            kps_x = x1 + self.template[:, 0] * side
            kps_y = y1 + self.template[:, 1] * side
            present = (area >= MIN_FACE_AREA).to(blob.dtype)
            scores, boxes, points = [], [], []
            for stride in self.strides:
                cells = blob[0, 0, ::stride, ::stride]
                cell_ones = torch.ones_like(cells)
                ay = ((torch.cumsum(cell_ones, dim=0) - 1) * stride).reshape(-1, 1)
                ax = ((torch.cumsum(cell_ones, dim=1) - 1) * stride).reshape(-1, 1)
                # two anchors per cell, consecutive, as SCRFD lays them out
                ax = ax.repeat(1, 2).reshape(-1, 1)
                ay = ay.repeat(1, 2).reshape(-1, 1)
                inside = (ax >= x1) & (ax <= x2) & (ay >= y1) & (ay <= y2)
                scores.append(inside.to(blob.dtype) * present * FACE_SCORE)
                boxes.append(torch.cat([ax - x1, ay - y1, x2 - ax, y2 - ay], dim=1) / stride)
                offsets = torch.stack([kps_x.reshape(1, -1) - ax, kps_y.reshape(1, -1) - ay],
                                      dim=2)
                points.append(offsets.reshape(offsets.shape[0], 10) / stride)
            return (*scores, *boxes, *points)

    return TinySCRFD


def export_tiny_detector(path: str | Path) -> Path:
    """Export :class:`TinySCRFD` to ONNX with dynamic height/width (SCRFD's output order:
    3 score maps, 3 box maps, 3 keypoint maps; rank-2, not batched)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _detector_module()().eval()
    dummy = torch.zeros(1, 3, 64, 64)
    names = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in (8, 16, 32)]
    dynamic = {"input.1": {2: "height", 3: "width"}}
    dynamic.update({name: {0: f"anchors_{name}"} for name in names})
    torch.onnx.export(model, (dummy,), str(path), input_names=["input.1"], output_names=names,
                      dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return path


def _recognizer_module():  # noqa: ANN202 - the class needs torch, imported lazily
    from torch import nn

    class TinyRecognizer(nn.Module):
        """A random stand-in for the pack's ArcFace R100: ``(N, 3, 112, 112)`` -> ``(N, E)``
        (not normalised, as ``glintr100.onnx``'s output is not)."""

        def __init__(self, embedding_dim: int) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.PReLU(8),
                nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.PReLU(16),
                nn.AvgPool2d(2))  # 112 -> 28 -> 14 -> 7
            self.head = nn.Linear(16 * 7 * 7, embedding_dim)

        def forward(self, pixels):  # noqa: ANN001, ANN201
            return self.head(self.features(pixels).flatten(1))

    return TinyRecognizer


def export_tiny_recognizer(path: str | Path, seed: int = 0, *, embedding_dim: int = 64) -> Path:
    """Export a random :class:`TinyRecognizer` to ONNX with a dynamic batch axis (the layout of
    ``glintr100.onnx``: input ``(None, 3, 112, 112)``, one output ``(None, E)``)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = _recognizer_module()(embedding_dim).eval()
    dummy = torch.zeros(1, 3, 112, 112)
    torch.onnx.export(model, (dummy,), str(path), input_names=["input.1"],
                      output_names=["embedding"],
                      dynamic_axes={"input.1": {0: "None"}, "embedding": {0: "None"}},
                      opset_version=17, dynamo=False)
    return path


def save_tiny_face_pack(root: str | Path, seed: int = 0, *, embedding_dim: int = 64) -> Path:
    """Write the tiny detector and recognizer as insightface's ``antelopev2`` pack under
    ``root`` (``<root>/models/antelopev2/scrfd_10g_bnkps.onnx`` and ``glintr100.onnx``), so
    ``root`` is an insightface root; returns ``root``."""
    from adapterswap_flux.face import DETECTOR_FILENAME, FACE_PACK, RECOGNIZER_FILENAME

    root = Path(root)
    pack = root / "models" / FACE_PACK
    export_tiny_detector(pack / DETECTOR_FILENAME)
    export_tiny_recognizer(pack / RECOGNIZER_FILENAME, seed, embedding_dim=embedding_dim)
    return root


def save_tiny_arcface(path: str | Path, seed: int = 0, *, embedding_dim: int = 64) -> Path:
    """A random tiny IR-SE ArcFace saved as a facexlib-style state dict (``torch.save``)."""
    import torch

    from adapterswap_flux.arcface import IRSEArcFace, IRSEConfig

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = IRSEArcFace(IRSEConfig.tiny(embedding_dim)).eval()
    torch.save(model.state_dict(), str(path))
    return path


def save_tiny_face_models(root: str | Path, seed: int = 0, *, embedding_dim: int = 64) -> Path:
    """Write the tiny face pack (detector and evaluation recognizer) and the tiny IR-SE ArcFace
    in InfiniteYou's ``supports/`` layout under ``root``; returns ``root``."""
    from adapterswap_flux.arcface import ARCFACE_FILENAME

    root = Path(root)
    save_tiny_face_pack(root / "supports" / "insightface", seed, embedding_dim=embedding_dim)
    save_tiny_arcface(root / "supports" / "facexlib" / ARCFACE_FILENAME, seed,
                      embedding_dim=embedding_dim)
    return root
