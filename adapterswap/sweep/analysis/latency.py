"""Latency as the analysis uses it: a stored latency row summarised (median, quartiles over
repeats, fit) and matched to the backbone and adapter setting of a curve."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from adapterswap.sweep.analysis.resampling import N_TOO_SMALL, _finite


def latency_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """A latency row as the report shows it: the median (``total_s``), its quartiles when
    there were two or more repeats, and the fit with this step count's residual if fitted."""
    repeats = int(row.get("repeats") or 0)
    q1, q3 = row.get("total_q1_s"), row.get("total_q3_s")
    spread = _finite(q1) and _finite(q3) and repeats >= 2
    fit = row.get("fit") or None
    residual = None
    if isinstance(fit, Mapping):
        residuals = fit.get("residuals_s") or {}
        residual = residuals.get(row.get("steps"), residuals.get(str(row.get("steps"))))
    return {"steps": row.get("steps"), "median_s": row.get("total_s"),
            "q1_s": q1 if spread else None, "q3_s": q3 if spread else None,
            "iqr_s": (q3 - q1) if spread else None,  # type: ignore[operator]
            "denoise_s": row.get("denoise_s"), "repeats": repeats,
            "method": row.get("method") or "measured",
            "fixed_s": fit.get("fixed_s") if isinstance(fit, Mapping) else None,
            "per_step_s": fit.get("per_step_s") if isinstance(fit, Mapping) else None,
            "residual_s": residual, "batch": row.get("batch"), "device": row.get("device"),
            "note": None if spread or fit else N_TOO_SMALL}


def _setting_of(members: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first = members[0]
    sizes = Counter((r.get("height"), r.get("width")) for r in members)
    (height, width), _ = sizes.most_common(1)[0]
    return {"adapter": first["adapter"], "scale": first.get("scale"),
            "enhancer": first.get("enhancer") or "none",
            "start": first.get("start") or 0.0,
            "end": 1.0 if first.get("end") is None else first["end"],
            "height": height, "width": width}


def match_latency(latency_rows: Sequence[Mapping[str, Any]], backbone: str,
                  setting: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Per step count, the latency row of this backbone and adapter setting (scale and image
    size where both sides record them; batch 1 and the newest measurement preferred)."""
    best: dict[int, Mapping[str, Any]] = {}

    def close(a: Any, b: Any) -> bool:
        return a is None or b is None or abs(float(a) - float(b)) < 1e-9

    def rank(r: Mapping[str, Any]) -> tuple[int, float]:
        return (int((r.get("batch") or 1) == 1), float(r.get("measured_at") or 0.0))

    for r in latency_rows:
        if r.get("backbone") != backbone or r.get("adapter") != setting["adapter"] \
                or (r.get("enhancer") or "none") != setting.get("enhancer", "none"):
            continue
        start = r.get("start") if r.get("start") is not None else 0.0
        end = r.get("end") if r.get("end") is not None else 1.0
        if setting["adapter"] != "none" and not (
                close(start, setting["start"]) and close(end, setting["end"])
                and close(r.get("scale"), setting["scale"])):
            continue
        if not (close(r.get("height"), setting["height"])
                and close(r.get("width"), setting["width"])):
            continue
        if not _finite(r.get("total_s")):
            continue
        steps = int(r["steps"])
        if steps not in best or rank(r) > rank(best[steps]):
            best[steps] = r
    return {s: latency_summary(r) for s, r in sorted(best.items())}
