"""CLIP metrics with transformers: CLIP-I, CLIP-T (CLIP score) and style similarity.

All three read a CLIP checkpoint in the Hugging Face layout (default
``openai/clip-vit-large-patch14``); option ``model`` takes another repo id or a local directory.
Images go through the checkpoint's own image processor (``preprocessor_config.json``), prompts
through its tokenizer; the embeddings are the projected ones (``image_embeds``/``text_embeds``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError
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

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# transformers 5 saves a CLIPProcessor's image settings as processor_config.json.
CLIP_IMAGE_FILES = ("config.json", TRANSFORMERS_WEIGHTS,
                    "preprocessor_config.json|processor_config.json")
CLIP_TEXT_FILES = (*CLIP_IMAGE_FILES, "tokenizer.json|vocab.json")
CLIP_HOW_TO_GET = ("Get it with `hf download openai/clip-vit-large-patch14` (MIT licence), or pass "
                   "model=<local directory> holding config.json, model.safetensors, "
                   "preprocessor_config.json and the tokenizer files.")


class _ClipMetric(ModelMetric):
    """Shared loading and embedding for the CLIP metrics."""

    options_spec = {"model": DEFAULT_CLIP}
    #: Whether the text tower (and tokenizer) is needed.
    uses_text = False

    def __init__(self, *, device: str | None = None, **options: Any) -> None:
        super().__init__(device=device, **options)
        model = self.options["model"]
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError("model", model, "must be a Hub repo id or a local directory")
        self.source: str = model
        self.image_model: Any = None
        self.text_model: Any = None
        self.processor: Any = None
        self.tokenizer: Any = None

    @property
    def _what(self) -> str:
        return f"metric {self.name!r} (CLIP model)"

    @property
    def _required(self) -> tuple[str, ...]:
        return CLIP_TEXT_FILES if self.uses_text else CLIP_IMAGE_FILES

    def _missing_reason(self) -> str | None:
        return missing_package("transformers", "torch") or weights_problem(
            self.source, self._required, what=self._what, how_to_get=CLIP_HOW_TO_GET)

    def _local_weights(self) -> tuple[bool, str]:
        return local_weights(self.source, self._required, how_to_get=CLIP_HOW_TO_GET)

    def _load_models(self) -> None:
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            CLIPModel,
            CLIPVisionModelWithProjection,
        )

        resolved = resolve(self.source, self._required, what=self._what,
                           how_to_get=CLIP_HOW_TO_GET)
        local = {"local_files_only": resolved.local_files_only}
        self.processor = AutoImageProcessor.from_pretrained(resolved.source, **local)
        if self.uses_text:
            model = from_pretrained_strict(CLIPModel, resolved, what=self._what)
            self.tokenizer = AutoTokenizer.from_pretrained(resolved.source, **local)
            self.image_model = self.text_model = model.to(self.torch_device)
        else:
            # The image tower alone; the text tower's weights in the file are left unread.
            model = from_pretrained_strict(CLIPVisionModelWithProjection, resolved, what=self._what)
            self.image_model = model.to(self.torch_device)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Projected CLIP image embeddings (not normalised), one row per image."""
        pixels = self.processor(images=[rgb(i) for i in images], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(self.torch_device)
        if self.text_model is not None:  # a whole CLIPModel
            out = self.image_model.get_image_features(pixel_values=pixel_values)
            return out if _is_tensor(out) else out.pooler_output
        return self.image_model(pixel_values=pixel_values).image_embeds

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Projected CLIP text embeddings, one row per prompt (truncated to 77 tokens)."""
        limit = min(self.tokenizer.model_max_length,
                    self.text_model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=limit,
                                return_tensors="pt").to(self.torch_device)
        out = self.text_model.get_text_features(input_ids=tokens["input_ids"],
                                                attention_mask=tokens["attention_mask"])
        return out if _is_tensor(out) else out.pooler_output

    def _image_pair_cosines(self, images: Any, others: Any) -> list[float | None]:
        """Cosine of each image's embedding with its counterpart's; None without one."""
        import torch

        pairs = [i for i, other in enumerate(others) if other is not None]
        scores: list[float | None] = [None] * len(images)
        if not pairs:
            return scores
        first = self.embed_unique([images[i] for i in pairs], self._embed_for_pairs)
        second = self.embed_unique([others[i] for i in pairs], self._embed_for_pairs)
        for i, value in zip(pairs, cosine(torch.stack(first), torch.stack(second))):
            scores[i] = value
        return scores

    def _embed_for_pairs(self, images: Any) -> torch.Tensor:
        return self.embed_images(list(images))


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


class ClipImageSimilarity(_ClipMetric):
    """CLIP-I: cosine similarity of the CLIP image embeddings of each image and its reference.

    Options: ``model`` (Hub id or local directory, default ``openai/clip-vit-large-patch14``),
    ``batch_size``, ``device``. ``None`` where an image has no reference. In [-1, 1]; identical
    images score 1.
    """

    name = "clip-i"
    needs = frozenset({"reference"})
    higher_is_better = True
    kinds = frozenset({"object"})
    description = "CLIP-I: cosine of CLIP image embeddings, image vs reference (ViT-L/14)"

    def score(self, batch: MetricBatch) -> list[float | None]:
        self._prepare(batch)
        return self._image_pair_cosines(batch.images, batch.references)


class ClipTextSimilarity(_ClipMetric):
    """CLIP-T: cosine similarity of the CLIP embeddings of each image and its prompt.

    Reported as the raw cosine in [-1, 1]. The usual "CLIP score" is a rescaled, clipped form of
    this number: ``100 * max(cos, 0)`` (torchmetrics' ``CLIPScore``), or ``2.5 * max(cos, 0)`` in
    Hessel et al. 2021 (CLIPScore). Prompts longer than CLIP's 77 tokens are truncated, as CLIP
    itself does. ``None`` where the prompt is missing or blank.

    Options: ``model`` (default ``openai/clip-vit-large-patch14``), ``batch_size``, ``device``.
    """

    name = "clip-t"
    needs = frozenset({"prompt"})
    higher_is_better = True
    kinds = frozenset({"none"})  # prompt fidelity: what a run without an adapter is judged on
    default_for = frozenset({"*"})  # how well the prompt is kept, beside any adapter
    description = "CLIP-T: cosine of CLIP image and prompt embeddings (x100, clip at 0 = CLIPScore)"
    uses_text = True

    def score(self, batch: MetricBatch) -> list[float | None]:
        import torch

        self._prepare(batch)
        assert batch.prompts is not None  # check_batch
        scored = [i for i, p in enumerate(batch.prompts) if p is not None and p.strip()]
        scores: list[float | None] = [None] * len(batch)
        if not scored:
            return scores
        images = self.embed_unique([batch.images[i] for i in scored],
                                   lambda part: self.embed_images(list(part)))
        texts = self.embed_unique([batch.prompts[i] for i in scored],
                                  lambda part: self.embed_texts(list(part)), key=lambda p: p)
        for i, value in zip(scored, cosine(torch.stack(images), torch.stack(texts))):
            scores[i] = value
        return scores


class StyleSimilarity(_ClipMetric):
    """Style similarity of each image to its reference: cosine of style embeddings.

    Default: CLIP image embeddings (as CLIP-I; option ``model``). With option ``csd_weights``
    (a CSD checkpoint file, a directory holding one, or the Hub id ``tomg-group-umd/CSD-ViT-L``)
    it uses CSD, the style descriptor of Somepalli et al. 2024 ("Measuring Style Similarity in
    Diffusion Models"): a CLIP ViT-L/14 image tower fine-tuned for style plus its style
    projection head, preprocessed as CSD's evaluation (bicubic resize, centre crop, CLIP
    normalisation). CSD carries its own backbone, so ``model`` is not used with it.

    ``None`` where an image has no reference. Identical images score 1.
    """

    name = "style"
    needs = frozenset({"reference"})
    higher_is_better = True
    kinds = frozenset({"style"})
    description = "Style similarity to the reference: CLIP image cosine, or CSD with csd_weights"
    options_spec = {"model": DEFAULT_CLIP, "csd_weights": None}

    def __init__(self, *, device: str | None = None, **options: Any) -> None:
        super().__init__(device=device, **options)
        csd_weights = self.options["csd_weights"]
        if csd_weights is not None and (not isinstance(csd_weights, str) or not csd_weights):
            raise InvalidArgumentError("csd_weights", csd_weights,
                                       "must be a file, a directory or a Hub repo id")
        if csd_weights is not None and "model" in options:
            raise InvalidArgumentError(
                "model", options["model"], "cannot be combined with csd_weights: the CSD "
                "checkpoint holds its own CLIP ViT-L/14 backbone")
        self.csd_weights: str | None = csd_weights
        self.csd_transform: Any = None

    def _missing_reason(self) -> str | None:
        if self.csd_weights is None:
            return super()._missing_reason()
        from adapterswap_metrics.csd import csd_weights_problem

        return (missing_package("transformers", "torch", "torchvision")
                or csd_weights_problem(self.csd_weights, what=self._what_csd))

    def _local_weights(self) -> tuple[bool, str]:
        if self.csd_weights is None:
            return super()._local_weights()
        from adapterswap_metrics.csd import CSD_HOW_TO_GET, csd_file

        found = csd_file(self.csd_weights)
        if found is not None:
            return True, f"CSD weights {found}"
        return False, f"CSD weights {self.csd_weights!r} not found here. {CSD_HOW_TO_GET}"

    @property
    def _what_csd(self) -> str:
        return f"metric {self.name!r} (CSD weights)"

    def _load_models(self) -> None:
        if self.csd_weights is None:
            super()._load_models()
            return
        from adapterswap_metrics.csd import load_csd

        model, self.csd_transform = load_csd(self.csd_weights, what=self._what_csd)
        self.image_model = model.to(self.torch_device)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        if self.csd_weights is None:
            return super().embed_images(images)
        import torch

        pixel_values = torch.stack([self.csd_transform(rgb(i)) for i in images])
        return self.image_model(pixel_values=pixel_values.to(self.torch_device)).image_embeds

    def score(self, batch: MetricBatch) -> list[float | None]:
        self._prepare(batch)
        return self._image_pair_cosines(batch.images, batch.references)
