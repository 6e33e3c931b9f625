"""LPIPS: learned perceptual distance (Zhang et al. 2018) with the ``lpips`` package, AlexNet."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterswap.errors import InvalidArgumentError, MetricUnavailableError, UnsafeWeightsError
from adapterswap.hub import is_offline
from adapterswap.metrics.base import MetricBatch
from adapterswap_metrics.common import ModelMetric, chunks, missing_package, package_file, rgb

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: torchvision's ImageNet AlexNet (``AlexNet_Weights.IMAGENET1K_V1``), the trunk LPIPS uses.
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
#: LPIPS v0.1 linear calibration layers for AlexNet, shipped inside the ``lpips`` package.
LPIPS_LINEAR_WEIGHTS = ("weights", "v0.1", "alex.pth")
#: AlexNet's five conv layers leave nothing to pool below this many pixels a side.
MIN_SIDE = 32

_AGAINST = ("reference", "baseline")


def alexnet_checkpoint() -> Path:
    """Where torchvision caches the AlexNet ImageNet weights: ``<torch hub dir>/checkpoints``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """A ``(3, H, W)`` float tensor in [-1, 1], the input range ``lpips.LPIPS`` expects."""
    import numpy as np
    import torch

    array = np.asarray(rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class LPIPSMetric(ModelMetric):
    """LPIPS distance (v0.1, AlexNet trunk) between each image and its reference or baseline.

    Options:

    - ``against``: ``"reference"`` (default; the cell's reference image) or ``"baseline"``
      (the baseline image, e.g. the same cell on another backbone or without the adapter).
      The metric then needs ``baselines`` instead of ``references``.
    - ``resolution``: if set (int >= 32), both images are resized (bicubic) to
      ``resolution x resolution`` first. Default: compare at the generated image's size,
      resizing the other image (bicubic) only when its size differs.
    - ``batch_size``, ``device``: see :class:`~adapterswap_metrics.common.ModelMetric`.
    - ``random_backbone``: tests only. ``True`` (seed 0) or an int seed builds the AlexNet
      trunk with random weights (``lpips.LPIPS(pnet_rand=True)``) so the real code path runs
      without the ImageNet download. Scores are then meaningless.

    Images are scaled to [-1, 1] as the package expects. The score is ``None`` where the image
    has no reference (baseline). Lower is more similar; identical images score 0.
    """

    name = "lpips"
    needs = frozenset({"reference"})  # per instance: {"baseline"} with against="baseline"
    higher_is_better = False
    kinds = frozenset()
    default_for = frozenset({"identity", "style"})
    description = "LPIPS distance (AlexNet, v0.1) to the reference, or against=baseline"
    options_spec = {"against": "reference", "resolution": None, "random_backbone": False}

    def __init__(self, *, device: str | None = None, **options: Any) -> None:
        super().__init__(device=device, **options)
        against = self.options["against"]
        if against not in _AGAINST:
            raise InvalidArgumentError("against", against, f"must be one of {', '.join(_AGAINST)}")
        self.against: str = against
        # The class declares the default; an instance compared with baselines needs those.
        self.needs = frozenset({against})
        resolution = self.options["resolution"]
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(
                resolution, int) or resolution < MIN_SIDE):
            raise InvalidArgumentError("resolution", resolution,
                                       f"must be an integer >= {MIN_SIDE} (pixels a side) or None")
        self.resolution: int | None = resolution
        random_backbone = self.options["random_backbone"]
        if not isinstance(random_backbone, (bool, int)):
            raise InvalidArgumentError("random_backbone", random_backbone,
                                       "must be True/False or an integer seed (tests only)")
        self.random_backbone = random_backbone
        self.model: Any = None

    def _missing_reason(self) -> str | None:
        reason = missing_package("lpips", "torchvision")
        if reason is not None:
            return reason
        linear = package_file("lpips", *LPIPS_LINEAR_WEIGHTS)
        if linear is None or not linear.is_file():
            return (f"the lpips package lacks its linear-layer weights ({linear}); "
                    "reinstall it: pip install --force-reinstall lpips")
        if self.random_backbone is not False:
            return None
        checkpoint = alexnet_checkpoint()
        if checkpoint.is_file() or not is_offline():
            return None  # present, or torchvision can still download it
        return (f"the AlexNet ImageNet weights LPIPS needs are not in torchvision's cache "
                f"({checkpoint}) and HF_HUB_OFFLINE is set (no network), so they cannot be "
                f"downloaded. Copy {ALEXNET_FILE} there (from {ALEXNET_URL}), or point TORCH_HOME "
                "at a directory whose hub/checkpoints/ holds it")

    def _local_weights(self) -> tuple[bool, str]:
        """The lpips package's linear layers and torchvision's cached AlexNet (which would
        otherwise be downloaded on the first load)."""
        linear = package_file("lpips", *LPIPS_LINEAR_WEIGHTS)
        if linear is None or not linear.is_file():
            return False, (f"the lpips package's linear-layer weights ({linear}) are missing: "
                           "pip install --force-reinstall lpips")
        if self.random_backbone is not False:
            return True, f"{linear} (random AlexNet trunk: tests only)"
        checkpoint = alexnet_checkpoint()
        if not checkpoint.is_file():
            return False, (f"the AlexNet ImageNet weights are not in torchvision's cache "
                           f"({checkpoint}); copy {ALEXNET_FILE} there (from {ALEXNET_URL}), or "
                           "point TORCH_HOME at a directory whose hub/checkpoints/ holds it")
        return True, f"{linear}; {checkpoint}"

    def _load_models(self) -> None:
        import warnings

        import lpips
        import torch

        if self.random_backbone is False:
            seed = None
        else:  # True means seed 0
            seed = 0 if self.random_backbone is True else int(self.random_backbone)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # lpips passes torchvision the deprecated ``pretrained=`` flag; the trunk is always
            # built without weights here, and the real ones are loaded below.
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(0 if seed is None else seed)
            model = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True,
                                verbose=False)
        linear_path = package_file("lpips", *LPIPS_LINEAR_WEIGHTS)
        linear = torch.load(linear_path, map_location="cpu", weights_only=True)
        expected = {k for k in model.state_dict() if k.startswith("lin") and not
                    k.startswith("lins.")}
        if set(linear) != expected:
            raise MetricUnavailableError(
                f"metric 'lpips': {linear_path} does not hold the AlexNet linear layers "
                f"(expected {sorted(expected)}, found {sorted(linear)})")
        model.load_state_dict(linear, strict=False)
        if seed is None:
            load_alexnet_trunk(model.net, self._alexnet_state())
        self.model = model.eval().requires_grad_(False).to(self.torch_device)

    def _alexnet_state(self) -> dict[str, Any]:
        """torchvision's AlexNet ImageNet state dict: from the cache, else downloaded (with
        torchvision's hash check); always read with ``weights_only=True``."""
        import pickle

        import torch

        checkpoint = alexnet_checkpoint()
        try:
            if checkpoint.is_file():
                return torch.load(checkpoint, map_location="cpu", weights_only=True)
            return torch.hub.load_state_dict_from_url(
                ALEXNET_URL, map_location="cpu", progress=False, check_hash=True,
                weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeWeightsError(
                f"metric 'lpips': {checkpoint} is not a plain tensor checkpoint and is not loaded "
                f"(weights_only=True refused it): {exc}") from exc
        except (OSError, RuntimeError) as exc:
            raise MetricUnavailableError(
                f"metric 'lpips': could not read the AlexNet weights {checkpoint}: {exc}"
            ) from exc

    def score(self, batch: MetricBatch) -> list[float | None]:
        """One LPIPS distance per image; ``None`` where the reference (baseline) is missing."""
        import torch
        from PIL import Image

        self._prepare(batch)
        others = batch.references if self.against == "reference" else batch.baselines
        assert others is not None  # check_batch
        scores: list[float | None] = [None] * len(batch)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (image, other) in enumerate(zip(batch.images, others)):
            if other is not None:
                size = (self.resolution,) * 2 if self.resolution else image.size
                groups.setdefault(size, []).append(index)
        for size, indices in groups.items():
            if min(size) < MIN_SIDE:
                raise InvalidArgumentError(
                    "images", f"{size[0]}x{size[1]}",
                    f"LPIPS (AlexNet) needs at least {MIN_SIDE}x{MIN_SIDE} pixels; pass a larger "
                    "resolution option")

            def fit(image: Image.Image, size: tuple[int, int] = size) -> torch.Tensor:
                if image.size != size:
                    image = rgb(image).resize(size, Image.BICUBIC)
                return to_signed_tensor(image)

            for part in chunks(indices, self.batch_size):
                first = torch.stack([fit(batch.images[i]) for i in part])
                second = torch.stack([fit(others[i]) for i in part])
                with torch.inference_mode():
                    distance = self.model(first.to(self.torch_device),
                                          second.to(self.torch_device))
                for i, value in zip(part, distance.flatten().tolist()):
                    scores[i] = float(value)
        return scores


def load_alexnet_trunk(trunk: Any, state: dict[str, Any]) -> None:
    """Copy torchvision AlexNet ``features.<i>.*`` weights into the lpips trunk.

    lpips splits ``alexnet.features`` into ``slice1`` .. ``slice5`` keeping each layer's index as
    its name, so ``features.3.weight`` lives at ``slice2.3.weight``. Every conv of the checkpoint
    must land somewhere and every trunk parameter must be covered.
    """
    import torch

    targets: dict[str, torch.nn.Parameter] = {}
    for _slice_name, block in trunk.named_children():
        for index, layer in block.named_children():
            for param_name, param in layer.named_parameters(recurse=False):
                targets[f"features.{index}.{param_name}"] = param
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    if set(features) != set(targets):
        raise MetricUnavailableError(
            "metric 'lpips': the AlexNet checkpoint does not match torchvision's AlexNet "
            f"(missing {sorted(set(targets) - set(features))}, "
            f"unexpected {sorted(set(features) - set(targets))})")
    with torch.no_grad():
        for key, param in targets.items():
            value = features[key]
            if tuple(value.shape) != tuple(param.shape):
                raise MetricUnavailableError(
                    f"metric 'lpips': AlexNet weight {key} has shape {tuple(value.shape)}, "
                    f"expected {tuple(param.shape)}")
            param.copy_(value)
