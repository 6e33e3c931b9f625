"""Probe-guided adapter exit: stop the adapter where its contribution has faded.

1. The sweep runs as specified, with probes on and the adapter's full window.
2. For each backbone and step count, the adapter's relative contribution (its
   ``probe_quantity``, averaged over blocks, cells and samples) is read per step; the exit step
   is the first step where it falls below ``threshold``. The window end becomes
   ``exit_step / steps``, so the adapter (and its compute) is skipped from that step on.
3. The same cells run again with that window, on the same inputs and seeds.
4. The report compares them: adapter steps and measured latency saved, against the paired
   fidelity delta (exit minus full) with its 95% CI.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from adapterswap.errors import InvalidArgumentError, UsageError
from adapterswap.sweep.spec import SweepSpec
from adapterswap.sweep.store import RunStore, one_invocation


def exit_steps(rows: Sequence[Mapping[str, Any]], probe_rows: Sequence[Mapping[str, Any]],
               quantity: str, threshold: float) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (backbone, steps): the mean contribution per step and the exit step (``None``:
    never below the threshold, the adapter keeps its full window)."""
    by_cell = {r["key"]: r for r in rows if r["status"] == "done" and r["adapter"] != "none"
               and (r["start"], r["end"]) == (0.0, 1.0)}
    values: dict[tuple[str, int], dict[int, list[float]]] = {}
    for p in probe_rows:
        row = by_cell.get(p["cell"])
        if row is None or p["quantity"] != quantity or p["value"] is None:
            continue
        values.setdefault((row["backbone"], row["steps"]), {}).setdefault(
            p["step"], []).append(p["value"])
    plan = {}
    for (backbone, steps), per_step in values.items():
        curve = [float(np.mean(per_step[i])) if i in per_step else math.nan
                 for i in range(steps)]
        exit_at = next((i for i, v in enumerate(curve) if i > 0 and v < threshold), None)
        plan[(backbone, steps)] = {"curve": curve, "exit_step": exit_at,
                                   "end": 1.0 if exit_at is None else exit_at / steps}
    return plan


def run_probe_exit(spec: SweepSpec, threshold: float, *,
                   run: Callable[[SweepSpec], Any]) -> dict[str, Any]:
    """Run the full-window sweep with probes, then the exit-window cells; store the plan in
    the run's meta ``probe_exit`` and return it. ``run`` runs one spec (with progress)."""
    from adapterswap.plugins import get_adapter, get_backbone

    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise InvalidArgumentError("--probe-exit", threshold, "must be a number > 0")
    if spec.windows or (spec.start, spec.end) != (0.0, 1.0):
        raise InvalidArgumentError("--probe-exit", threshold,
                                   "choose the window itself: do not combine with windows")
    spec.probes = True
    spec.validate()
    adapters = {spec.adapter_for(get_backbone(b)) for b in spec.backbones} - {None}
    if len(adapters) != 1:
        raise UsageError("--probe-exit needs exactly one adapter in the sweep")
    adapter_cls = get_adapter(adapters.pop())
    if not adapter_cls.supports_probes or not adapter_cls.probe_quantity:
        raise UsageError(f"adapter {adapter_cls.name!r} has no probes, so probe-guided exit "
                         "cannot choose its window")
    with one_invocation():  # readers show both passes as this invocation's cells
        return _run_passes(spec, threshold, adapter_cls, run)


def _run_passes(spec: SweepSpec, threshold: float, adapter_cls: Any,
                run: Callable[[SweepSpec], Any]) -> dict[str, Any]:
    first = run(spec)
    with RunStore(spec.out, lock=False) as store:
        plan = exit_steps(store.rows(store.current_keys()), store.probe_rows(),
                          adapter_cls.probe_quantity,
                          threshold)
    results = [first]
    for (backbone, steps), entry in sorted(plan.items()):
        if entry["exit_step"] is None:
            continue
        derived = dataclasses.replace(
            spec, backbones=[backbone], steps=[steps], only_default_steps=False,
            windows=[[0.0, entry["end"]]], probes=False, defaults_used=[])
        results.append(run(derived))
    summary = {"threshold": threshold, "quantity": adapter_cls.probe_quantity,
               "plan": [{"backbone": b, "steps": n, **e} for (b, n), e in sorted(plan.items())]}
    with RunStore(spec.out, lock=False) as store:
        store.set_meta("probe_exit", summary)
        store.set_meta("spec", spec.to_dict())
    return {"summary": summary, "runs": results}


def exit_comparison(rows: Sequence[Mapping[str, Any]], latency_rows: Sequence[Mapping[str, Any]],
                    plan: Mapping[str, Any], fidelity: Mapping[str, str], *,
                    metric_info: Mapping[str, Mapping[str, Any]] | None = None,
                    resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per planned exit: adapter steps skipped, median latency full vs exit, and the paired
    delta of every metric (exit minus full) over reference, prompt and seed, with a bootstrap
    interval that resamples (reference, prompt) clusters (``None``: n too small). Directions
    come from ``metric_info`` (``None``: unknown); cells whose window never opened are left
    out."""
    from adapterswap.sweep.analysis import paired_delta, window_never_opens

    metric_info = metric_info or {}
    done = [r for r in rows if r["status"] == "done" and r["adapter"] != "none"
            and not window_never_opens(r)]
    out = []
    for entry in plan.get("plan", []):
        if entry["exit_step"] is None:
            continue
        b, n, end = entry["backbone"], entry["steps"], entry["end"]
        full = [r for r in done if r["backbone"] == b and r["steps"] == n
                and (r["start"], r["end"]) == (0.0, 1.0)]
        cut = [r for r in done if r["backbone"] == b and r["steps"] == n
               and (r["start"], r["end"]) == (0.0, end)]
        if not full or not cut:
            continue
        lat = {(r.get("start"), r.get("end")): r["total_s"] for r in latency_rows
               if r["backbone"] == b and r["steps"] == n and r["adapter"] == full[0]["adapter"]
               and (r.get("batch") or 1) == 1}
        label = next((k for k in fidelity if k.startswith(f"{b}|")), None)
        metrics = sorted({m for r in full for m in r["scores"]})
        deltas = {}
        for metric in metrics:
            if (metric_info.get(metric) or {}).get("kind") == "latency":
                continue
            a = {(r["reference"], r["prompt"], r["seed"]): r["scores"].get(metric) for r in full}
            c = {(r["reference"], r["prompt"], r["seed"]): r["scores"].get(metric) for r in cut}
            higher = (metric_info.get(metric) or {}).get("higher_is_better")
            deltas[metric] = {**paired_delta(a, c, resamples=resamples, seed=seed),
                              "higher_is_better": None if higher is None else bool(higher)}
        out.append({
            "backbone": b, "steps": n, "exit_step": entry["exit_step"], "end": end,
            "adapter_steps_skipped": n - entry["exit_step"],
            "adapter_compute_saved": (n - entry["exit_step"]) / n,
            "latency_full_s": lat.get((0.0, 1.0)), "latency_exit_s": lat.get((0.0, end)),
            "latency_statistic": "median",
            "fidelity_metric": fidelity.get(label) if label else None,
            "deltas": deltas,
        })
    return out
