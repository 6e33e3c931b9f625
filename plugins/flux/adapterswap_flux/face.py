"""InfiniteYou's face pipeline: detect, take the largest face, align, embed; the keypoint canvas.

Real InfiniteYou weights were trained on embeddings made exactly this way, so the steps follow its
published pipeline:

1. **Detection** with insightface's ``antelopev2`` pack (its SCRFD detector, ONNX). The image
   (BGR) is tried at detection size 640, then 320, then 160 if nothing was found.
2. The **largest face** by bounding-box area.
3. **Alignment** with ``insightface.utils.face_align.norm_crop`` to 112 x 112 from the 5 keypoints.
4. The crop (still BGR, as InfiniteYou feeds it) scaled to [-1, 1] goes through facexlib's IR-SE50
   ArcFace (:mod:`adapterswap_flux.arcface`), which returns an L2-normalised 512-d embedding.

The models are built from local files only: the detector with
``insightface.model_zoo.get_model(<path>.onnx)`` (``FaceAnalysis`` would try to download a missing
pack) and the recognition network from its ``.pth`` file. Both roots are configurable and every
missing file is reported with the places that were searched. The environment variables
:data:`INSIGHTFACE_ROOT_ENV` and :data:`ARCFACE_PATH_ENV` put a root first in the default search
(for the adapter and the ``identity`` metric alike); an explicit option still wins.

insightface, onnxruntime and OpenCV are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError, WeightsNotFoundError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

#: Detection sizes InfiniteYou tries, in order, until a face is found.
DETECTION_SIZES: tuple[int, ...] = (640, 320, 160)
#: insightface's model pack InfiniteYou uses, and its detector file.
FACE_PACK = "antelopev2"
DETECTOR_FILENAME = "scrfd_10g_bnkps.onnx"
#: The pack's recognition model (insightface's ArcFace R100 trained on Glint360K).
RECOGNIZER_FILENAME = "glintr100.onnx"
#: Environment variables searched first for the insightface root and the IR-SE50 weights.
INSIGHTFACE_ROOT_ENV = "ADAPTERSWAP_INSIGHTFACE_ROOT"
ARCFACE_PATH_ENV = "ADAPTERSWAP_ARCFACE_PATH"
#: Colours of the five keypoints on the control canvas (RGB), as InstantID/InfiniteYou draw them.
KEYPOINT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
#: Keypoint pairs joined by a limb (eyes, mouth corners to the nose tip).
KEYPOINT_LIMBS: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (3, 2), (4, 2))


class NoFaceError(InvalidArgumentError):
    """No face was found in an image at any of the detection sizes."""

    def __init__(self, what: str, image_name: str, sizes: Sequence[int]) -> None:
        tried = ", ".join(f"{s}x{s}" for s in sizes)
        self.sizes = tuple(sizes)
        super().__init__(what, image_name, f"no face detected (detection sizes tried: {tried})")


@dataclass
class DetectedFace:
    """One detection: ``bbox`` ``(x1, y1, x2, y2)``, ``kps`` ``(5, 2)`` (eyes, nose, mouth
    corners) in image pixels, the detector's score and the detection size that found it."""

    bbox: np.ndarray
    kps: np.ndarray
    score: float
    detection_size: int

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


def describe_image(image: Any) -> str:
    """A name for an image in messages: its path, or ``<PIL image WxH>``."""
    if isinstance(image, (str, Path)):
        return str(image)
    filename = getattr(image, "filename", "")
    if filename:
        return str(filename)
    size = getattr(image, "size", None)
    return f"<PIL image {size[0]}x{size[1]}>" if size else f"<{type(image).__name__}>"


def pil_to_bgr(image: Image.Image) -> np.ndarray:
    """An RGB PIL image as the uint8 BGR array insightface and InfiniteYou work on."""
    import numpy as np

    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


# --------------------------------------------------------------------------------------------------
# Locating the models
# --------------------------------------------------------------------------------------------------


def _env_path(variable: str) -> Path | None:
    value = os.environ.get(variable, "").strip()
    return Path(value).expanduser() if value else None


def onnx_providers(device: Any) -> list[str]:
    """onnxruntime execution providers for ``device``: CUDA first when the device is a CUDA
    device and onnxruntime has the CUDA provider, always with the CPU as fallback."""
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and \
            "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return providers


def insightface_root_candidates(weights_root: Path | None) -> list[Path]:
    """Where the ``antelopev2`` pack is looked for when no root is configured:
    ``$ADAPTERSWAP_INSIGHTFACE_ROOT`` if set, InfiniteYou's ``supports/insightface`` next to its
    weights, then insightface's own ``~/.insightface``."""
    candidates = []
    env = _env_path(INSIGHTFACE_ROOT_ENV)
    if env is not None:
        candidates.append(env)
    if weights_root is not None:
        candidates.append(weights_root / "supports" / "insightface")
    candidates.append(Path("~/.insightface").expanduser())
    return candidates


def find_detector(roots: Sequence[Path], *, what: str = "infusenet") -> Path:
    """The SCRFD detector of the ``antelopev2`` pack under the first root that has it.

    A root may be an insightface root (holding ``models/antelopev2/``) or the pack directory
    itself. The pack's ``scrfd_10g_bnkps.onnx`` is preferred; otherwise the ONNX file whose
    graph has the SCRFD output structure (5 or more outputs) is used.
    """
    searched = []
    for root in roots:
        root = Path(root).expanduser()
        for pack in (root / "models" / FACE_PACK, root):
            searched.append(pack)
            if not pack.is_dir():
                continue
            preferred = pack / DETECTOR_FILENAME
            if preferred.is_file():
                return preferred
            for candidate in sorted(pack.glob("*.onnx")):
                if _looks_like_detector(candidate):
                    return candidate
    where = ", ".join(repr(str(p)) for p in searched)
    raise WeightsNotFoundError(
        f"{what}: insightface's {FACE_PACK!r} face detector ({DETECTOR_FILENAME}) was not "
        f"found; searched {where}. InfiniteYou ships the pack in the ByteDance/InfiniteYou "
        f"repository under supports/insightface/models/{FACE_PACK}/ (insightface models are for "
        f"non-commercial research only); pass insightface_root=<dir holding "
        f"models/{FACE_PACK}/> to use another copy."
    )


def _looks_like_detector(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # an unreadable file is simply not the detector
        return False
    return len(model.graph.output) >= 5


def arcface_candidates(weights_root: Path | None) -> list[Path]:
    """Where ``recognition_arcface_ir_se50.pth`` is looked for when no path is configured:
    ``$ADAPTERSWAP_ARCFACE_PATH`` if set, ``supports/facexlib/`` next to InfiniteYou's weights,
    then facexlib's own download folder (where InfiniteYou's facexlib call saves it), without
    importing facexlib."""
    from adapterswap_flux.arcface import ARCFACE_FILENAME

    candidates = []
    env = _env_path(ARCFACE_PATH_ENV)
    if env is not None:
        candidates.append(env)
    if weights_root is not None:
        candidates.append(weights_root / "supports" / "facexlib" / ARCFACE_FILENAME)
    try:
        spec = importlib.util.find_spec("facexlib")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "weights" / ARCFACE_FILENAME)
    return candidates


def find_arcface(candidates: Sequence[Path], *, explicit: bool = False,
                 what: str = "infusenet") -> Path:
    """The first existing ArcFace weights file (a directory may hold it)."""
    from adapterswap_flux.arcface import ARCFACE_FILENAME, ARCFACE_URL

    searched = []
    for candidate in candidates:
        candidate = Path(candidate).expanduser()
        path = candidate / ARCFACE_FILENAME if candidate.is_dir() else candidate
        searched.append(path)
        if path.is_file():
            return path
    where = ", ".join(repr(str(p)) for p in searched) or "nowhere (no candidates)"
    hint = "" if explicit else " or pass arcface_path=<file>"
    raise WeightsNotFoundError(
        f"{what}: the ArcFace recognition weights ({ARCFACE_FILENAME}, facexlib's IR-SE50) "
        f"were not found; searched {where}. Download them from {ARCFACE_URL} into "
        f"<InfiniteYou dir>/supports/facexlib/{hint}."
    )


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def _load_arcface(path: Path, what: str = "infusenet") -> torch.nn.Module:
    """facexlib's IR-SE ArcFace from its ``.pth`` state dict (float32, eval mode)."""
    import torch

    from adapterswap.weights import read_pickle
    from adapterswap_flux.arcface import IRSEArcFace

    state = read_pickle(path, what=what)  # tensors only: a pickle needing code is refused
    try:
        arcface = IRSEArcFace.from_state_dict(state)
    except (ValueError, RuntimeError) as exc:
        raise WeightsNotFoundError(
            f"{what}: {str(path)!r} is not facexlib's IR-SE ArcFace state dict ({exc})"
        ) from None
    return arcface.to(torch.float32)


class FaceAnalyzer:
    """Detection, alignment and ArcFace embedding from local model files.

    :param detector_path: the SCRFD ``.onnx`` file (see :func:`find_detector`).
    :param arcface_path: the facexlib IR-SE ``.pth`` state dict (see :func:`find_arcface`);
        ``None`` for detection and alignment only.
    :param device: where the ArcFace network runs (float32, as InfiniteYou runs it).
    :param sizes: detection sizes tried in order.
    :param det_thresh: detector score threshold (insightface's default 0.5).
    :param what: who uses the models, for messages (``"infusenet"``, ``"identity"``).
    """

    def __init__(self, detector_path: str | Path, arcface_path: str | Path | None, *,
                 device: Any = "cpu", sizes: Sequence[int] = DETECTION_SIZES,
                 det_thresh: float = 0.5, what: str = "infusenet") -> None:
        self.detector_path = Path(detector_path)
        self.arcface_path = Path(arcface_path) if arcface_path is not None else None
        self.device = device
        self.sizes = tuple(int(s) for s in sizes)
        self.det_thresh = det_thresh
        self.what = what
        self.detector: Any = None
        self.arcface: torch.nn.Module | None = None

    def load(self) -> FaceAnalyzer:
        """Create the ONNX detector session and load the ArcFace network (once)."""
        if self.detector is not None:
            return self
        from insightface.model_zoo import get_model

        providers = onnx_providers(self.device)
        try:
            detector = get_model(str(self.detector_path), providers=providers)
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf ...) name no file
            from adapterswap.weights import first_line

            raise WeightsNotFoundError(
                f"{self.what}: {str(self.detector_path)!r} is not a readable ONNX model "
                f"({type(exc).__name__}: {first_line(exc)}); download it again") from None
        if detector is None or getattr(detector, "taskname", None) != "detection":
            raise WeightsNotFoundError(
                f"{self.what}: {str(self.detector_path)!r} is not an insightface SCRFD face "
                f"detector (insightface did not route it to detection)"
            )
        detector.prepare(0 if len(providers) > 1 else -1, det_thresh=self.det_thresh,
                         input_size=(self.sizes[0], self.sizes[0]))
        if self.arcface_path is not None:
            self.arcface = _load_arcface(self.arcface_path, self.what).to(self.device)
        self.detector = detector
        return self

    # -- detection ----------------------------------------------------------------------------
    def detect(self, image_bgr: np.ndarray) -> list[DetectedFace]:
        """All faces found at the first detection size that finds any ([] if none does)."""
        self.load()
        for size in self.sizes:
            bboxes, kpss = self.detector.detect(image_bgr, input_size=(size, size), max_num=0,
                                                metric="default")
            if bboxes.shape[0] == 0:
                continue
            if kpss is None:
                raise WeightsNotFoundError(
                    f"{self.what}: the detector {str(self.detector_path)!r} gives no keypoints; "
                    f"InfiniteYou needs a keypoint model such as {DETECTOR_FILENAME}")
            return [DetectedFace(bboxes[i, :4], kpss[i], float(bboxes[i, 4]), size)
                    for i in range(bboxes.shape[0])]
        return []

    def largest_face(self, image_bgr: np.ndarray, *, argument: str = "reference",
                     image_name: str = "<image>") -> DetectedFace:
        """The face with the largest box (ties: the later detection, as InfiniteYou's sort);
        :class:`NoFaceError` naming the image and the sizes tried when there is none."""
        faces = self.detect(image_bgr)
        if not faces:
            raise NoFaceError(argument, image_name, self.sizes)
        return sorted(faces, key=lambda face: face.area)[-1]

    # -- recognition --------------------------------------------------------------------------
    def aligned_crop(self, image_bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """The 112 x 112 ArcFace crop (BGR uint8) aligned on the 5 keypoints."""
        import numpy as np
        from insightface.utils import face_align

        return face_align.norm_crop(image_bgr, landmark=np.asarray(kps), image_size=112)

    def embed_crop(self, crop_bgr: np.ndarray) -> torch.Tensor:
        """ArcFace embedding ``(1, E)`` (float32, unit norm) of an aligned BGR crop."""
        import numpy as np
        import torch

        self.load()
        if self.arcface is None:
            raise InvalidArgumentError("arcface_path", None,
                                       "this FaceAnalyzer detects only (no ArcFace model)")
        pixels = torch.from_numpy(np.ascontiguousarray(crop_bgr)).unsqueeze(0)
        pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
        pixels = (2 * pixels - 1).contiguous().to(self.device)
        with torch.no_grad():
            return self.arcface(pixels)

    def embed(self, image_bgr: np.ndarray, *, argument: str = "reference",
              image_name: str = "<image>") -> tuple[torch.Tensor, DetectedFace]:
        """Detect, take the largest face, align and embed: ``((1, E), face)``."""
        face = self.largest_face(image_bgr, argument=argument, image_name=image_name)
        return self.embed_crop(self.aligned_crop(image_bgr, face.kps)), face


# --------------------------------------------------------------------------------------------------
# Control images
# --------------------------------------------------------------------------------------------------


def resize_and_pad(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Fit ``image`` into ``size`` = ``(width, height)`` on a white canvas, centred.

    The side of the target that is not longer sets the scale (Lanczos), as InfiniteYou does for
    control images; the image may overflow the other side, where it is cut.
    """
    from PIL import Image

    width, height = size
    src_w, src_h = image.size
    if width <= height:
        new_w, new_h = width, int(width * (src_h / src_w))
    else:
        new_w, new_h = int(height * (src_w / src_h)), height
    resized = image.resize((new_w, new_h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def draw_keypoints(size: tuple[int, int], kps: np.ndarray, *, stick_width: int = 4,
                   radius: int = 10) -> Image.Image:
    """The control canvas InfiniteYou conditions on: ``size`` = ``(width, height)``, black, with
    the four limbs (eyes and mouth corners to the nose) as ellipses at 60 % intensity and the five
    keypoints as filled circles in :data:`KEYPOINT_COLOURS`."""
    import cv2
    import numpy as np
    from PIL import Image

    width, height = size
    kps = np.asarray(kps, dtype=np.float64)
    canvas = np.zeros((height, width, 3))
    for start, end in KEYPOINT_LIMBS:
        xs, ys = kps[[start, end], 0], kps[[start, end], 1]
        length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))),
                                   (int(length / 2), stick_width), int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas.copy(), polygon, KEYPOINT_COLOURS[start])
    canvas = (canvas * 0.6).astype(np.uint8)
    for index, (x, y) in enumerate(kps):
        canvas = cv2.circle(canvas.copy(), (int(x), int(y)), radius, KEYPOINT_COLOURS[index], -1)
    return Image.fromarray(canvas.astype(np.uint8))


def blank_canvas(size: tuple[int, int]) -> Image.Image:
    """The black control image InfiniteYou uses when no control image is given."""
    from PIL import Image

    return Image.new("RGB", size, (0, 0, 0))
