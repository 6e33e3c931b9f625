"""The analysis result: what ``analysis.json`` holds, made JSON-safe."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from adapterswap.sweep.analysis.curves import Curve
from adapterswap.sweep.analysis.recommendation import Recommendation
from adapterswap.sweep.analysis.trajectories import ProbeMap


@dataclass
class Analysis:
    """What ``analysis.json`` holds (:meth:`to_dict`; ``README`` and the module doc describe
    the fields)."""

    curves: list[Curve] = field(default_factory=list)
    latency: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    pareto: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)
    recommendations: list[Recommendation] = field(default_factory=list)
    recommendation: Any = None
    recommendation_reason: str = ""
    fidelity_metric: dict[str, str] = field(default_factory=dict)
    confounds: list[dict[str, Any]] = field(default_factory=list)
    ablations: list[dict[str, Any]] = field(default_factory=list)
    trajectories: list[Curve] = field(default_factory=list)
    probes: list[ProbeMap] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric_info_source: str = "store"
    adapter_kinds_source: str = "store"
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN and infinities become ``null``, step keys stay numbers in lists."""
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, Mapping):
        return {(str(k) if not isinstance(k, str) else k): _json_safe(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
