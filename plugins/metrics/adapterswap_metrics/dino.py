"""DINO similarity: cosine of self-supervised ViT CLS embeddings (DreamBooth's subject metric)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError
from adapterswap.metrics.base import MetricBatch
from adapterswap_metrics.common import (
    TRANSFORMERS_WEIGHTS,
    ModelMetric,
    cosine,
    from_pretrained_strict,
    local_weights,
    missing_package,
    resolve,
    rgb,
    weights_problem,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_DINO = "facebook/dino-vits16"
DINO_FILES = ("config.json", TRANSFORMERS_WEIGHTS)
DINO_HOW_TO_GET = (f"Get it with `hf download {DEFAULT_DINO}` (Apache-2.0), or pass "
                   "model=<local directory> holding config.json and the weights.")
#: ImageNet statistics, DINO's normalisation (used when the checkpoint has no processor config).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PREPROCESS = ("dino", "processor")


def dino_eval_sizes(crop_size: int) -> tuple[int, int]:
    """(resize, crop) of DINO's evaluation transform: shorter side to 256, centre crop 224,
    scaled to the model's input size (``crop_size * 256 // 224``)."""
    return crop_size * 256 // 224, crop_size


class DinoSimilarity(ModelMetric):
    """DINO: cosine similarity of the DINO ViT CLS embeddings of each image and its reference.

    The embedding is the final (layer-normalised) CLS token of a transformers ``ViTModel``
    (default ``facebook/dino-vits16``, the ViT-S/16 DreamBooth used). Options:

    - ``model``: Hub id or local directory of a DINO ViT checkpoint.
    - ``preprocess``: ``"dino"`` (default) is DINO's evaluation transform: bicubic resize of the
      shorter side to 256, centre crop 224 (both scaled to the model's ``image_size``), and the
      mean/std of the checkpoint's ``preprocessor_config.json`` (ImageNet's when it has none).
      ``"processor"`` feeds images through the checkpoint's image processor as published
      (a ``ViTImageProcessor`` resizes straight to the model size, without crop).
    - ``batch_size``, ``device``.

    ``None`` where an image has no reference. Identical images score 1.
    """

    name = "dino"
    needs = frozenset({"reference"})
    higher_is_better = True
    kinds = frozenset({"object"})
    description = "DINO: cosine of DINO ViT-S/16 CLS embeddings, image vs reference"
    options_spec = {"model": DEFAULT_DINO, "preprocess": "dino"}

    def __init__(self, *, device: str | None = None, **options: Any) -> None:
        super().__init__(device=device, **options)
        model = self.options["model"]
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError("model", model, "must be a Hub repo id or a local directory")
        preprocess = self.options["preprocess"]
        if preprocess not in _PREPROCESS:
            raise InvalidArgumentError("preprocess", preprocess,
                                       f"must be one of {', '.join(_PREPROCESS)}")
        self.source: str = model
        self.preprocess: str = preprocess
        self.model: Any = None
        self.processor: Any = None
        self.transform: Any = None

    @property
    def _what(self) -> str:
        return f"metric {self.name!r} (DINO model)"

    def _missing_reason(self) -> str | None:
        return missing_package("transformers", "torch", "torchvision") or weights_problem(
            self.source, DINO_FILES, what=self._what, how_to_get=DINO_HOW_TO_GET)

    def _local_weights(self) -> tuple[bool, str]:
        return local_weights(self.source, DINO_FILES, how_to_get=DINO_HOW_TO_GET)

    def _load_models(self) -> None:
        from torchvision import transforms
        from transformers import AutoConfig, AutoImageProcessor, ViTModel

        resolved = resolve(self.source, DINO_FILES, what=self._what, how_to_get=DINO_HOW_TO_GET)
        config = AutoConfig.from_pretrained(resolved.source,
                                            local_files_only=resolved.local_files_only)
        if config.model_type != "vit":
            raise InvalidArgumentError("model", self.source,
                                       f"is a {config.model_type!r} model; DINO needs a ViT one")
        try:
            self.processor = AutoImageProcessor.from_pretrained(
                resolved.source, local_files_only=resolved.local_files_only)
        except (OSError, ValueError):
            self.processor = None  # no preprocessor_config.json: DINO's own statistics
        if self.preprocess == "processor" and self.processor is None:
            raise MetricUnavailableError(
                f"{self._what}: preprocess='processor' but {self.source!r} has no "
                "preprocessor_config.json")
        model = from_pretrained_strict(ViTModel, resolved, what=self._what,
                                       add_pooling_layer=False)
        self.model = model.to(self.torch_device)
        mean = tuple(getattr(self.processor, "image_mean", None) or IMAGENET_MEAN)
        std = tuple(getattr(self.processor, "image_std", None) or IMAGENET_STD)
        resize, crop = dino_eval_sizes(config.image_size)
        self.transform = transforms.Compose([
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Final CLS token of the DINO ViT, one row per image."""
        import torch

        if self.preprocess == "processor":
            pixels = self.processor(images=[rgb(i) for i in images],
                                    return_tensors="pt")["pixel_values"]
        else:
            pixels = torch.stack([self.transform(rgb(i)) for i in images])
        out = self.model(pixel_values=pixels.to(self.torch_device))
        return out.last_hidden_state[:, 0]

    def _embed(self, images: Any) -> torch.Tensor:
        return self.embed_images(list(images))

    def score(self, batch: MetricBatch) -> list[float | None]:
        import torch

        self._prepare(batch)
        assert batch.references is not None  # check_batch
        pairs = [i for i, ref in enumerate(batch.references) if ref is not None]
        scores: list[float | None] = [None] * len(batch)
        if not pairs:
            return scores
        first = self.embed_unique([batch.images[i] for i in pairs], self._embed)
        second = self.embed_unique([batch.references[i] for i in pairs], self._embed)
        for i, value in zip(pairs, cosine(torch.stack(first), torch.stack(second))):
            scores[i] = value
        return scores
