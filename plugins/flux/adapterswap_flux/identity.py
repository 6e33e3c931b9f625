"""The ``identity`` metric: ArcFace cosine similarity between a generated face and the reference.

Both images go through the face pipeline InfiniteYou uses for its reference
(:mod:`adapterswap_flux.face`): insightface's ``antelopev2`` SCRFD detector tried at 640, then 320,
then 160, the largest face, ``norm_crop`` to the recognizer's input (112 x 112). The two crops are
embedded by the **evaluation recognizer** and the score is their cosine similarity.

The default evaluation recognizer is the pack's own ArcFace R100 (``glintr100.onnx``, trained on
Glint360K), run through insightface's ``ArcFaceONNX.get_feat``, which converts the BGR crop to RGB
and normalises it as the graph expects (``(x - 127.5) / 127.5``, or nothing for graphs that begin
with their own normalisation nodes). It is a different network from the one that conditions
InfuseNet (facexlib's IR-SE50, :mod:`adapterswap_flux.arcface`), so the metric does not grade the
adapter with its own encoder. ``recognizer="ir-se50"`` measures with the conditioning model
instead (then :meth:`IdentityMetric.notes` warns that the score may be optimistic), and a path to
an ``.onnx`` file uses any recognizer insightface's model router accepts.

A generated image without a detectable face scores ``None``, and so does every image compared with
a reference without one; the counts are reported by :meth:`IdentityMetric.notes`. Nothing is ever
downloaded: :meth:`IdentityMetric.availability` names the missing file and every place searched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError, WeightsNotFoundError
from adapterswap.metrics.base import Metric, MetricBatch

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: Named evaluation recognizers (anything else must be a path to an ``.onnx`` file).
RECOGNIZERS: tuple[str, ...] = ("antelopev2", "ir-se50")
#: The Hub repository whose ``supports/insightface`` (and ``supports/facexlib``) are searched in
#: the local Hugging Face cache (never downloaded).
INFINITEYOU_REPO = "ByteDance/InfiniteYou"
#: Python packages the metric needs (import name, pip name).
PACKAGES: tuple[tuple[str, str], ...] = (
    ("insightface", "insightface"), ("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
    ("cv2", "opencv-python"), ("skimage", "scikit-image"))

CONDITIONING_WARNING = (
    "the identity score is measured with facexlib's IR-SE50 ArcFace, the same model that "
    "conditions generation (InfuseNet's ID embedding), so it may be optimistic; the default "
    "recognizer='antelopev2' (insightface's glintr100 ArcFace R100) is independent of it")


def infiniteyou_cache_root() -> Path | None:
    """The newest local Hugging Face cache snapshot of ``ByteDance/InfiniteYou`` (no network)."""
    from adapterswap.hub import cached_snapshot

    return cached_snapshot(INFINITEYOU_REPO, ())


def find_recognizer(roots: list[Path]) -> Path:
    """``glintr100.onnx`` of the ``antelopev2`` pack under the first root that has it (a root is
    an insightface root holding ``models/antelopev2/`` or the pack directory itself)."""
    from adapterswap_flux.face import FACE_PACK, RECOGNIZER_FILENAME

    searched = []
    for root in roots:
        root = Path(root).expanduser()
        for pack in (root / "models" / FACE_PACK, root):
            path = pack / RECOGNIZER_FILENAME
            searched.append(path)
            if path.is_file():
                return path
    where = ", ".join(repr(str(p)) for p in searched) or "nowhere (no candidates)"
    raise WeightsNotFoundError(
        f"identity: the evaluation recognizer {RECOGNIZER_FILENAME} (insightface's {FACE_PACK!r} "
        f"ArcFace R100) was not found; searched {where}. InfiniteYou ships the pack in the "
        f"{INFINITEYOU_REPO} repository under supports/insightface/models/{FACE_PACK}/ "
        f"(insightface models are for non-commercial research only); pass "
        f"insightface_root=<dir holding models/{FACE_PACK}/> or set ADAPTERSWAP_INSIGHTFACE_ROOT.")


def image_key(image: Image.Image) -> str:
    """A content key for an image (mode, size and pixels), to cache reference embeddings."""
    digest = hashlib.sha1(image.tobytes())
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cosine similarity of two embeddings in float64 (``None`` if one has zero norm)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if not norms > 0.0:
        return None
    return float(np.dot(a, b) / norms)


class IdentityMetric(Metric):
    """ArcFace identity similarity of each generated image to its reference (higher is better).

    Options (``IdentityMetric(device=..., **options)``):

    :param recognizer: ``"antelopev2"`` (default: ``glintr100.onnx`` of insightface's pack),
        ``"ir-se50"`` (facexlib's IR-SE50, the model InfuseNet is conditioned with; a warning
        note is added) or a path to an ``.onnx`` recognizer.
    :param insightface_root: a directory holding ``models/antelopev2/`` (or the pack itself);
        default: ``$ADAPTERSWAP_INSIGHTFACE_ROOT``, then the local Hugging Face cache of
        ``ByteDance/InfiniteYou`` (``supports/insightface``), then ``~/.insightface``.
    :param arcface_path: facexlib's ``recognition_arcface_ir_se50.pth`` (or its directory), for
        ``recognizer="ir-se50"``; default: ``$ADAPTERSWAP_ARCFACE_PATH``, the cache's
        ``supports/facexlib/``, then facexlib's own weights folder.

    ``device``: ``"cuda"`` runs the ONNX models with onnxruntime's CUDA provider when it is
    available (CPU otherwise); default: CUDA when torch sees a GPU.
    """

    name = "identity"
    needs = frozenset({"reference"})
    higher_is_better = True
    kinds = frozenset({"identity"})
    worst = -1.0  # cosine similarity
    description = ("ArcFace cosine similarity to the reference face (insightface antelopev2: "
                   "SCRFD detector, glintr100 recognizer)")
    options_spec: ClassVar[dict[str, Any]] = {"recognizer": RECOGNIZERS[0],
                                              "insightface_root": None, "arcface_path": None}

    @classmethod
    def evaluator(cls, options: Any = None) -> str:
        """The recognizer behind the figures: the default pack's glintr100, facexlib's IR-SE50
        (the conditioning model) or the given ``.onnx`` file."""
        recognizer = (options or {}).get("recognizer", RECOGNIZERS[0])
        if recognizer == "antelopev2":
            return cls.description
        if recognizer == "ir-se50":
            return ("ArcFace cosine similarity, facexlib IR-SE50 recognizer (the model that "
                    "conditions InfuseNet: may be optimistic), SCRFD detector")
        return f"ArcFace cosine similarity, recognizer {os.fspath(recognizer)}, SCRFD detector"

    def __init__(self, *, device: str | None = None, **options: Any) -> None:
        self.check_options(options)
        if device is not None and not isinstance(device, str):
            raise InvalidArgumentError("device", device, "must be a string such as 'cuda:0'")
        recognizer = options.get("recognizer", RECOGNIZERS[0])
        if isinstance(recognizer, os.PathLike):
            recognizer = os.fspath(recognizer)
        if not isinstance(recognizer, str) or (
                recognizer not in RECOGNIZERS and not recognizer.endswith(".onnx")):
            raise InvalidArgumentError(
                "recognizer", recognizer,
                f"choose {' or '.join(repr(r) for r in RECOGNIZERS)}, or give the path of an "
                f".onnx recognizer")
        paths: dict[str, Path | None] = {}
        for option in ("insightface_root", "arcface_path"):
            value = options.get(option)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise InvalidArgumentError(option, value, "must be a path")
            paths[option] = Path(value).expanduser() if value is not None else None
        super().__init__(device=device, **options)
        self.recognizer = recognizer
        self.insightface_root = paths["insightface_root"]
        self.arcface_path = paths["arcface_path"]
        self.face: Any = None
        self.model: Any = None
        self.detector_path: Path | None = None
        self.recognizer_path: Path | None = None
        self.crop_size = 112
        self._references: dict[str, np.ndarray | None] = {}
        self.images_checked = 0
        self.images_without_face = 0
        self.images_without_reference = 0
        self.images_with_faceless_reference = 0
        self.faceless_references: set[str] = set()

    # ------------------------------------------------------------------ locating
    @property
    def uses_conditioning_model(self) -> bool:
        """True when the evaluation recognizer is InfuseNet's conditioning model (IR-SE50)."""
        return self.recognizer == "ir-se50"

    def insightface_roots(self) -> list[Path]:
        """The roots searched for the ``antelopev2`` pack, in order."""
        from adapterswap_flux.face import insightface_root_candidates

        if self.insightface_root is not None:
            return [self.insightface_root]
        return insightface_root_candidates(infiniteyou_cache_root())

    def locate(self) -> tuple[Path, Path]:
        """``(detector, recognizer)`` files, without loading them; :class:`WeightsNotFoundError`
        naming the missing file and the places searched."""
        from adapterswap_flux.face import arcface_candidates, find_arcface, find_detector

        detector = find_detector(self.insightface_roots(), what="identity")
        if self.recognizer == "antelopev2":
            recognizer = find_recognizer(self.insightface_roots())
        elif self.recognizer == "ir-se50":
            if self.arcface_path is not None:
                recognizer = find_arcface([self.arcface_path], explicit=True, what="identity")
            else:
                recognizer = find_arcface(arcface_candidates(infiniteyou_cache_root()),
                                          what="identity")
        else:
            recognizer = Path(self.recognizer).expanduser()
            if not recognizer.is_file():
                raise WeightsNotFoundError(
                    f"identity: the recognizer {str(recognizer)!r} does not exist (recognizer= "
                    f"takes {' or '.join(repr(r) for r in RECOGNIZERS)} or the path of an .onnx "
                    f"recognizer)")
        return detector, recognizer

    def availability(self) -> str | None:
        """Why the metric cannot run here (a missing package or model file), else ``None``."""
        packages = list(PACKAGES) + ([("torch", "torch")] if self.uses_conditioning_model else [])
        for module, pip_name in packages:
            if importlib.util.find_spec(module) is None:
                return (f"identity: the Python package {module!r} is not installed "
                        f"(pip install {pip_name})")
        try:
            self.locate()
        except WeightsNotFoundError as exc:
            return str(exc)
        return None

    @classmethod
    def weights_status(cls, options: Mapping[str, Any] | None = None) -> tuple[bool, str]:
        """Whether the detector and the evaluation recognizer are on this machine (nothing is
        ever downloaded): :meth:`availability`'s answer, or where the two files are."""
        metric = cls(**dict(options or {}))
        reason = metric.availability()
        if reason is not None:
            return False, reason
        detector, recognizer = metric.locate()
        return True, f"detector {detector}; recognizer {recognizer}"

    # ------------------------------------------------------------------ loading
    def load(self) -> IdentityMetric:
        """Build the detector and the evaluation recognizer from local files (once)."""
        if self.loaded:
            return self
        reason = self.availability()
        if reason is not None:
            raise MetricUnavailableError(f"metric {self.name!r} is unavailable: {reason}")
        from adapterswap_flux.face import FaceAnalyzer

        detector, recognizer = self.locate()
        device = self.device
        if device is None:
            from adapterswap.backbone import default_device

            device = default_device()
        try:
            face = FaceAnalyzer(detector, recognizer if self.uses_conditioning_model else None,
                                device=device, what="identity").load()
            model = None if self.uses_conditioning_model else \
                load_onnx_recognizer(recognizer, device)
        except WeightsNotFoundError as exc:
            raise MetricUnavailableError(f"metric {self.name!r} is unavailable: {exc}") from None
        self.face, self.model = face, model
        self.crop_size = 112 if model is None else int(model.input_size[0])
        self.detector_path, self.recognizer_path = detector, recognizer
        self.device = str(device)
        self.loaded = True
        return self

    # ------------------------------------------------------------------ embedding
    def aligned_crop(self, image: Image.Image) -> np.ndarray | None:
        """The recognizer's aligned BGR crop of the largest face in ``image`` (``None`` when no
        face is found at any detection size)."""
        from insightface.utils import face_align

        from adapterswap_flux.face import NoFaceError, describe_image, pil_to_bgr

        self.load()
        bgr = pil_to_bgr(image)
        try:
            face = self.face.largest_face(bgr, argument="image", image_name=describe_image(image))
        except NoFaceError:
            return None
        return face_align.norm_crop(bgr, landmark=face.kps, image_size=self.crop_size)

    def embed_crops(self, crops: list[np.ndarray]) -> np.ndarray:
        """Evaluation embeddings ``(N, E)`` (float64, not normalised) of aligned BGR crops."""
        import numpy as np

        self.load()
        if not crops:
            return np.zeros((0, 0))
        if self.model is not None:
            return np.asarray(self.model.get_feat(list(crops)), dtype=np.float64)
        rows = [self.face.embed_crop(crop).detach().float().cpu().numpy() for crop in crops]
        return np.concatenate(rows).astype(np.float64)

    def embedding(self, image: Image.Image) -> np.ndarray | None:
        """The evaluation embedding ``(E,)`` of the largest face in ``image`` (``None`` if none)."""
        crop = self.aligned_crop(image)
        return None if crop is None else self.embed_crops([crop])[0]

    def _reference_embedding(self, reference: Image.Image) -> tuple[str, np.ndarray | None]:
        key = image_key(reference)
        if key not in self._references:
            self._references[key] = self.embedding(reference)
        return key, self._references[key]

    # ------------------------------------------------------------------ scoring
    def score(self, batch: MetricBatch) -> list[float | None]:
        """Cosine similarity of each image's largest face to its reference's largest face
        (``None`` where either has no detectable face, or the reference is missing)."""
        self.check_batch(batch)
        self.load()
        assert batch.references is not None
        scores: list[float | None] = [None] * len(batch)
        targets: list[np.ndarray] = []
        crops, slots = [], []
        counting = batch.purpose == "final"  # trajectory previews stay out of the notes
        for slot, (image, reference) in enumerate(zip(batch.images, batch.references)):
            if reference is None:
                self.images_without_reference += counting
                continue
            key, target = self._reference_embedding(reference)
            if target is None:
                if counting:
                    self.faceless_references.add(key)
                self.images_with_faceless_reference += counting
                continue
            self.images_checked += counting
            crop = self.aligned_crop(image)
            if crop is None:
                self.images_without_face += counting
                continue
            crops.append(crop)
            slots.append(slot)
            targets.append(target)
        for slot, embedding, target in zip(slots, self.embed_crops(crops), targets):
            scores[slot] = cosine_similarity(embedding, target)
        return scores

    def notes(self) -> list[str]:
        """The conditioning-model warning (``recognizer="ir-se50"``) and the counts of images
        scored ``None`` so far (no face in the image, or in its reference)."""
        notes = []
        if self.uses_conditioning_model:
            notes.append(CONDITIONING_WARNING)
        if self.images_without_face:
            notes.append(f"{self.images_without_face} of {self.images_checked} images had no "
                         f"detectable face (scored None)")
        if self.faceless_references:
            count = len(self.faceless_references)
            notes.append(f"{count} reference image{'s' if count > 1 else ''} had no detectable "
                         f"face: the {self.images_with_faceless_reference} images compared with "
                         f"{'them' if count > 1 else 'it'} were scored None")
        if self.images_without_reference:
            count = self.images_without_reference
            notes.append(f"{count} image{'s' if count > 1 else ''} had no reference image "
                         f"(scored None)")
        return notes


def load_onnx_recognizer(path: Path, device: Any) -> Any:
    """insightface's ``ArcFaceONNX`` for ``path`` (routed by insightface's model router by its
    shapes: a square input of at least 112 px, one embedding output)."""
    from insightface.model_zoo import get_model

    from adapterswap_flux.face import onnx_providers

    try:
        model = get_model(str(path), providers=onnx_providers(device))
    except Exception as exc:  # an unreadable file is reported as unusable, with the reason
        raise WeightsNotFoundError(
            f"identity: {str(path)!r} could not be loaded by insightface/onnxruntime: "
            f"{type(exc).__name__}: {exc}") from None
    if model is None or getattr(model, "taskname", None) != "recognition":
        routed = getattr(model, "taskname", None) or "nothing"
        raise WeightsNotFoundError(
            f"identity: {str(path)!r} is not a face recognizer: insightface routed it to "
            f"{routed} (a recognizer has one input (N, 3, S, S) with S >= 112 and S a multiple "
            f"of 16, and one embedding output)")
    size = int(model.input_size[0])
    if size % 112 and size % 128:
        raise WeightsNotFoundError(
            f"identity: {str(path)!r} takes {size} px crops; insightface's alignment supports "
            f"multiples of 112 or 128 only")
    return model
