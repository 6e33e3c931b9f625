"""``adapterswap doctor``: versions, devices and which weights are present, without network."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from adapterswap.hub import is_offline


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, Any]:
    """Python, torch, CUDA, diffusers and transformers versions, the offline setting, and the
    optional kernels and backends: float8, FlashAttention-3, Ray."""
    from adapterswap.config import config_path

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "adapterswap": _version("adapterswap"),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "HF_HUB_OFFLINE": is_offline(),
        "HF_HOME": os.environ.get("HF_HOME", "~/.cache/huggingface (default)"),
        "config": str(config_path()),
        "config_present": config_path().is_file(),
    }
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # a broken torch install is exactly what doctor should report
        env["cuda_available"] = f"torch failed to import: {exc}"
        return env
    from adapterswap.fastpath.flash import fa3_unavailable
    from adapterswap.fastpath.kernels import fp8_supported

    env["fp8"] = "available" if fp8_supported("cuda") else \
        "unavailable: needs a CUDA GPU of compute capability 8.9+"
    missing = fa3_unavailable("cuda")
    env["attention_fa3"] = f"fa3-fwd {_version('fa3-fwd')}" if missing is None else \
        f"unavailable: {missing}"
    ray = _version("ray")
    env["ray"] = ray if ray != "not installed" else "not installed (pip install 'ray>=2.40')"
    return env


def collect() -> dict[str, Any]:
    """The whole doctor report as a JSON-able dict."""
    from adapterswap.plugins import adapters, backbones, metrics

    report: dict[str, Any] = {"environment": environment(), "backbones": [], "adapters": [],
                              "metrics": []}
    for section, registry in (("backbones", backbones()), ("adapters", adapters())):
        for entry in registry.entries():
            try:
                status = entry.cls.weights_status()
                row = {"name": entry.name, "source": status.source, "present": status.present,
                       "where": status.where, "missing": status.missing,
                       "status": f"{status.source}: {status.describe()}",
                       "hint": entry.cls.how_to_get}
            except Exception as exc:
                row = {"name": entry.name, "present": False,
                       "status": f"could not check: {type(exc).__name__}: {exc}", "hint": ""}
            report[section].append(row)
    for entry in metrics().entries():
        report["metrics"].append(metric_row(entry.name, entry.cls))
    return report


def metric_row(name: str, cls: Any) -> dict[str, Any]:
    """A metric is available when its weights are on this machine (or it needs none) and its
    packages are installed; weights it could still download do not count."""
    try:
        present, detail = cls.weights_status({})
        reason = cls().availability() if present else None
    except Exception as exc:  # a metric that cannot answer is reported, not fatal
        present, detail, reason = False, "", f"could not check: {type(exc).__name__}: {exc}"
    if reason is not None:
        status = f"unavailable: {reason}"
    elif present:
        status = f"available ({detail})"
    else:
        status = f"missing: {detail}"
    return {"name": name, "present": present and reason is None, "weights_present": present,
            "where": detail, "status": status}
