"""Small tensor helpers the data structures and the denoising loop share.

They keep the loop free of host synchronisation: constant index tensors are made once per value
and device (:func:`device_tensor`), and host tensors reach the GPU through pinned memory
(:func:`host_to_device`), so neither stalls the queue of kernels. torch is imported lazily so
that ``adapterswap --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_DEVICE_TENSORS: dict[tuple[Any, ...], Any] = {}
_DEVICE_TENSORS_MAX = 512


def device_tensor(values: Any, device: Any, dtype: Any = None) -> torch.Tensor:
    """A small constant tensor (row indices, per-row scales) on ``device``, made once and then
    reused: building it from Python data is a host-to-device copy, which synchronises the
    stream and stalls the queue of kernels, so the denoising loop must not do it every step.
    The returned tensor is shared; never modify it in place."""
    import torch

    values = tuple(values)
    key = (values, str(device), dtype)
    tensor = _DEVICE_TENSORS.get(key)
    if tensor is None:
        if len(_DEVICE_TENSORS) >= _DEVICE_TENSORS_MAX:
            _DEVICE_TENSORS.clear()
        if dtype is None:
            dtype = torch.long if all(isinstance(v, int) for v in values) else torch.float32
        tensor = _DEVICE_TENSORS[key] = torch.tensor(values, dtype=dtype, device=device)
    return tensor


def host_to_device(tensor: torch.Tensor, device: Any) -> torch.Tensor:
    """``tensor.to(device)`` without stalling the host: a copy from ordinary (pageable) host
    memory to a GPU waits for every kernel queued before it, so each new batch of noise or
    timesteps would drain the queue between groups of a sweep. From pinned memory the copy is
    queued like a kernel (PyTorch keeps the pinned block until the copy has run)."""
    import torch

    target = torch.device(device)
    if target.type == "cuda" and tensor.device.type == "cpu" and torch.cuda.is_available():
        return tensor.pin_memory().to(target, non_blocking=True)
    return tensor.to(target)
