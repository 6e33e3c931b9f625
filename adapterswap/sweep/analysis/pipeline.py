"""The entry point: :func:`analyse` aggregates a store's rows into curves, regimes, knees,
confounds, Pareto fronts, fidelity-matched recommendations, deltas, trajectories and probe
maps (one :class:`~adapterswap.sweep.analysis.result.Analysis`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from adapterswap.sweep.analysis.confounds import confound_counts, window_never_opens
from adapterswap.sweep.analysis.curves import Curve, curve_from_observations
from adapterswap.sweep.analysis.deltas import ablation_deltas
from adapterswap.sweep.analysis.fidelity import _missing_fidelity, fidelity_kind, fidelity_metrics
from adapterswap.sweep.analysis.labels import row_label
from adapterswap.sweep.analysis.latency import _setting_of, match_latency
from adapterswap.sweep.analysis.missing import MISSING_POLICIES, worst_values
from adapterswap.sweep.analysis.recommendation import Recommendation, pareto_front, recommend
from adapterswap.sweep.analysis.regime import REGIME_LEVEL
from adapterswap.sweep.analysis.resampling import CI_LEVEL, N_TOO_SMALL, RESAMPLES, _finite
from adapterswap.sweep.analysis.result import Analysis
from adapterswap.sweep.analysis.trajectories import probe_maps, trajectory_curves


def analyse(rows: Sequence[Mapping[str, Any]], latency_rows: Sequence[Mapping[str, Any]] = (),
            *, metric_info: Mapping[str, Mapping[str, Any]] | None = None,
            adapter_kinds: Mapping[str, str | None] | None = None,
            fraction: float | None = None, latency_budget: float | None = None,
            margin: float | None = None, missing: str = "drop",
            trajectory_rows: Sequence[Mapping[str, Any]] = (),
            probe_rows: Sequence[Mapping[str, Any]] = (), resamples: int = RESAMPLES,
            seed: int = 0, metric_info_source: str = "store",
            adapter_kinds_source: str = "store") -> Analysis:
    """Aggregate finished cells into curves (per backbone, adapter setting and metric),
    regimes, knees, confounds, Pareto fronts and recommendations on the fidelity metric
    of each setting's adapter kind (module doc).

    :param metric_info: per metric ``higher_is_better`` (``None``: unknown), ``kinds`` (the
        adapter kinds it measures fidelity for; ``"none"``: the prompt), ``kind`` (its role),
        ``worst``, ``available``, ``reason``. A metric missing here has an unknown direction:
        its mean and interval are shown, with no regime, knee, Pareto or recommendation.
    :param adapter_kinds: adapter name -> kind, any string (``"none"`` -> ``None``).
    :param fraction: deprecated and ignored; the effective regime is the margin rule.
    :param margin: the regime's margin for every metric (default: each metric's own
        seed-to-seed noise at its largest step count).
    :param missing: ``"drop"`` or ``"worst"`` (module doc).
    :param seed: the bootstrap's seed; every curve draws from ``default_rng(seed)``, so curves
        over the same units resample the same clusters.
    """
    from adapterswap.errors import InvalidArgumentError

    if missing not in MISSING_POLICIES:
        raise InvalidArgumentError("missing", missing, f"choose one of "
                                   f"{', '.join(MISSING_POLICIES)}")
    if margin is not None and not (_finite(margin) and margin >= 0):
        raise InvalidArgumentError("margin", margin, "must be a finite number >= 0")
    if not (isinstance(resamples, int) and resamples >= 100):
        raise InvalidArgumentError("resamples", resamples, "must be an integer >= 100")
    metric_info = {k: dict(v or {}) for k, v in (metric_info or {}).items()}
    adapter_kinds = dict(adapter_kinds or {})
    done = [r for r in rows if r["status"] == "done"]
    result = Analysis(metric_info_source=metric_info_source,
                      adapter_kinds_source=adapter_kinds_source)
    result.options = {
        "missing": missing, "margin": margin, "resamples": resamples, "seed": seed,
        "ci_level": CI_LEVEL, "regime_level": REGIME_LEVEL,
        "resampling": "clusters (reference, prompt) with replacement, all seeds and step "
                      "counts of a drawn cluster together; seeds when there is one cluster",
        "regime_rule": "fewest steps whose paired mean difference from the largest step "
                       "count is within the margin in the metric's better direction",
        "latency_budget_s": latency_budget, "fraction": fraction,
    }
    if fraction is not None and fraction != 0.95:  # 0.95: the CLI's old default, always passed
        result.notes.append(f"fraction={fraction:g} is deprecated and ignored: the effective "
                            "regime is the margin rule")
    fills = worst_values(done, metric_info) if missing == "worst" else {}
    result.confounds = confound_counts(rows)

    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in done:
        groups.setdefault((row["backbone"], row_label(row)), []).append(row)
    scored_anywhere = sorted({m for r in done for m in r["scores"]})
    for name in scored_anywhere:
        info = metric_info.get(name) or {}
        result.metrics[name] = {
            "higher_is_better": info.get("higher_is_better"), "kind": info.get("kind"),
            "worst": info.get("worst"), "evaluator": info.get("evaluator"),
            "direction": {True: "higher", False: "lower"}.get(info.get("higher_is_better"),
                                                              "unknown"),
            "known": name in metric_info}
    for (backbone, label), members in sorted(groups.items()):
        kept = [r for r in members if not window_never_opens(r)]
        excluded = Counter(r["steps"] for r in members if window_never_opens(r))
        setting = _setting_of(members)
        latency = match_latency(latency_rows, backbone, setting)
        if latency:
            result.latency[f"{backbone}|{label}"] = latency
        metrics = sorted({m for r in kept for m in r["scores"]})
        if not kept:
            result.recommendations.append(Recommendation(
                backbone, label, None, None, None, None,
                f"the adapter window of all {len(members)} cells never opened (adapter-off "
                "cells under an adapter label): nothing to analyse", label=f"{backbone}|{label}",
                adapter_name=setting["adapter"], latency_budget_s=latency_budget))
            continue
        for metric in metrics:
            info = metric_info.get(metric)
            observations = [((r["reference"], r["prompt"], r["seed"]), r["steps"],
                             r["scores"][metric]) for r in kept if metric in r["scores"]]
            fill, source = fills.get(metric, (None, None))
            kind = (info or {}).get("kind")
            curve = curve_from_observations(
                observations, backbone=backbone, setting=label, metric=metric, info=info,
                adapter_name=setting["adapter"], margin=margin, missing=missing, fill=fill,
                fill_source=source, excluded=excluded, regime=kind != "latency",
                resamples=resamples, seed=seed)
            if kind == "latency":
                _no_intervals(curve, "a latency score is one timed measurement per "
                                     "configuration copied to its cells, not a sample per "
                                     "seed: no interval here (the latency table has the "
                                     "spread over repeats)")
            result.curves.append(curve)
        _recommend_for(result, backbone, label, setting["adapter"], metrics, metric_info,
                       adapter_kinds, latency_budget)
    _summarise_recommendations(result)
    result.ablations = ablation_deltas(rows, metric_info=metric_info, missing=missing,
                                       fills=fills, resamples=resamples, seed=seed)
    result.trajectories = trajectory_curves(rows, trajectory_rows, metric_info=metric_info,
                                            margin=margin, resamples=resamples, seed=seed)
    result.probes = probe_maps(rows, probe_rows)
    return result


def _no_intervals(curve: Curve, why: str) -> None:
    k = len(curve.steps)
    curve.ci_low, curve.ci_high = [None] * k, [None] * k
    curve.difference_ci_low, curve.difference_ci_high = [None] * k, [None] * k
    curve.resampling = None
    curve.notes = [n for n in curve.notes if "resample" not in n and N_TOO_SMALL not in n]
    curve.notes.append(why)


def _recommend_for(result: Analysis, backbone: str, label: str, adapter: str,
                   metrics: Sequence[str], metric_info: Mapping[str, Mapping[str, Any]],
                   adapter_kinds: Mapping[str, str | None],
                   latency_budget: float | None) -> None:
    """Choose the fidelity metric of one (backbone, setting): among the metrics scored there,
    one that declares the adapter's kind (``"none"`` without an adapter,
    :mod:`~adapterswap.sweep.analysis.fidelity`); then its Pareto front and its
    recommendation (or the reason there is none)."""
    key = f"{backbone}|{label}"

    def nothing(reason: str, kind: str | None = None, metric: str | None = None) -> None:
        result.recommendations.append(Recommendation(
            backbone, label, metric, None, None, None, reason, label=key, adapter_name=adapter,
            adapter_kind=kind, latency_budget_s=latency_budget))

    if adapter != "none" and adapter not in adapter_kinds:
        nothing(f"the kind of adapter {adapter!r} is not recorded, so no fidelity metric "
                "can be matched to it")
        return
    adapter_kind = None if adapter == "none" else adapter_kinds.get(adapter)
    if adapter != "none" and adapter_kind is None:
        nothing(f"adapter {adapter!r} has no kind, so no fidelity metric can be matched to it")
        return
    wanted = fidelity_kind(adapter_kind)
    matched = fidelity_metrics(wanted, metrics, metric_info)  # as the metrics declare
    if not matched:
        nothing(_missing_fidelity(wanted, adapter, metrics, metric_info), adapter_kind)
        return
    curves = {c.metric: c for c in result.curves if c.label == key and c.metric in matched}
    known = [m for m in matched if curves[m].higher_is_better is not None]
    if not known:
        nothing(f"the direction of {', '.join(matched)} is unknown (not recorded in the "
                "store), so no step count can be recommended", adapter_kind, matched[0])
        return
    metric = known[0]  # several of the same kind: the first by name, stated in the report
    result.fidelity_metric[key] = metric
    curve = curves[metric]
    latency = result.latency.get(key, {})
    points = [(latency[s]["median_s"], m, s) for s, m in zip(curve.steps, curve.mean)
              if s in latency and m is not None]
    if len(curve.steps) >= 2 and points:
        result.pareto[key] = pareto_front(points, higher_is_better=bool(curve.higher_is_better))
    result.recommendations.append(recommend(curve, latency, latency_budget=latency_budget,
                                            adapter_kind=adapter_kind))


def _summarise_recommendations(result: Analysis) -> None:
    """``recommendation``: with one (backbone, setting), its recommendation or ``None``; with
    several, a mapping ``"backbone|setting"`` -> recommendation or ``None`` (``None`` overall
    when none has one). ``recommendation_reason``: the reason (one line per setting)."""
    recs = result.recommendations
    made = [r for r in recs if r.steps is not None]
    if len(recs) == 1:
        result.recommendation = asdict(recs[0]) if made else None
        result.recommendation_reason = recs[0].reason
    elif recs:
        result.recommendation = ({r.label: asdict(r) if r.steps is not None else None
                                  for r in recs} if made else None)
        result.recommendation_reason = "; ".join(f"{r.label}: {r.reason}" for r in recs)
    else:
        result.recommendation_reason = "no finished cells"
