"""Devices and dtypes: the defaults a backbone or adapter loads with, and dtype names.

Kept apart from :mod:`adapterswap.backbone` so that adapters, presets and the fast path can use
them without the backbone interface (``adapterswap.backbone`` re-exports them for plugins).
torch is imported inside the functions: ``adapterswap list`` must not import it.
"""

from __future__ import annotations

from typing import Any

from adapterswap.errors import InvalidArgumentError


def default_device() -> str:
    """``cuda`` when a GPU is usable, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def indexed_device(device: Any) -> Any:
    """``device`` as a ``torch.device`` with its index: a bare ``"cuda"`` becomes the current
    CUDA device (``torch.cuda.set_per_process_memory_fraction`` and other per-device calls
    refuse a device without an index); other devices are returned as ``torch.device``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def default_dtype(device: str) -> Any:
    """bf16 on CUDA, fp32 elsewhere (CPU half precision is slow and lossy)."""
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def parse_dtype(value: Any) -> Any:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"float16"``/``"fp32"``/``"float32"`` or a
    torch dtype -> torch dtype; ``None`` stays ``None``."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
             "float32": torch.float32, "float": torch.float32}
    try:
        return table[str(value).lower()]
    except KeyError:
        raise InvalidArgumentError("dtype", value, f"choose one of {', '.join(table)}") from None


def device_name(device: Any) -> str:
    """The hardware behind ``device``, as measurements are labelled with it: the CUDA card's
    name (``torch.cuda.get_device_name``, e.g. ``"NVIDIA H100 80GB HBM3"``), ``"cpu"`` for the
    CPU, or the device string itself for anything else (``"mps"``; ``"cuda"`` without a
    usable GPU)."""
    import torch

    target = torch.device(device)
    if target.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(target.index if target.index is not None else 0)
    return "cpu" if target.type == "cpu" else str(device)
