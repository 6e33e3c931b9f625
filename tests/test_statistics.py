"""The report's statistics against scipy and hand computation.

- paired, clustered bootstrap intervals (``scipy.stats.bootstrap``, percentile method);
- exact bootstrap distributions of tiny cases enumerated by hand;
- "n too small" instead of any interval from one unit;
- the effective regime (margin rule) and the knee with their bootstrap distributions;
- kind-matched fidelity and the recommendation; direction read, never guessed;
- missing scores (share scored, ``missing="worst"``), windows that never open, confounds;
- latency medians and IQRs; the report and analysis.json built from a real store.

Monte-Carlo tolerances are derived in :func:`percentile_tolerance` from the number of
resamples, never copied from a run.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time

import numpy as np
import pytest

from adapterswap.sweep.analysis import (
    N_TOO_SMALL,
    _knees,
    ablation_deltas,
    analyse,
    bootstrap_ci,
    confound_counts,
    curve_from_observations,
    knee,
    latency_summary,
    paired_delta,
    pooled_seed_sd,
    swap_comparison,
)

stats = pytest.importorskip("scipy.stats")

STEPS = [1, 2, 4, 8, 16, 28]
IDENTITY = {"higher_is_better": True, "kind": "identity", "worst": -1.0, "available": True}
SHARPNESS = {"higher_is_better": True, "kind": "diagnostic", "worst": None, "available": True}
CONTRAST = {"higher_is_better": True, "kind": "diagnostic", "worst": None, "available": True}


def percentile_tolerance(samples_sd: float, resamples: int, level: float = 0.95,
                         sigmas: float = 5.0) -> float:
    """Monte-Carlo tolerance for comparing the end of two independent percentile intervals.

    The standard error of a sample quantile ``p`` of ``B`` draws is
    ``sqrt(p (1 - p) / B) / f(q_p)``; for a bootstrap distribution close to normal with
    standard deviation ``s``, ``f(q_p) = phi(z_p) / s``. Two independent estimates differ by
    ``sqrt(2)`` of that; ``sigmas`` of it is the tolerance (5: a false alarm about once in
    1.7 million)."""
    p = (1 - level) / 2
    z = stats.norm.ppf(1 - p)
    density = stats.norm.pdf(z) / samples_sd
    return sigmas * math.sqrt(2) * math.sqrt(p * (1 - p) / resamples) / density


def row(backbone="b", adapter="ad", reference="r0", prompt="p0", seed=0, steps=1, scores=None,
        **extra):
    base = {"key": f"{backbone}-{adapter}-{reference}-{prompt}-{seed}-{steps}-"
                   f"{extra.get('start', 0.0)}-{extra.get('end', 1.0)}",
            "status": "done", "backbone": backbone, "adapter": adapter, "scale": None,
            "start": 0.0, "end": 1.0, "reference": reference, "prompt": prompt, "seed": seed,
            "steps": steps, "height": 64, "width": 64, "guidance_scale": None,
            "scores": dict(scores or {}), "timings": {}, "confounds": [],
            "adapter_active_steps": None if adapter == "none" else steps}
    base.update(extra)
    return base


# ------------------------------------------------------------------ against scipy
def test_paired_difference_interval_matches_scipy_percentile_bootstrap():
    """One value per (reference, prompt) at two step counts: the clustered bootstrap of the
    paired difference is the ordinary bootstrap of the differences, as scipy computes it."""
    rng = np.random.default_rng(10)
    n, resamples = 30, 20000
    base = rng.normal(0.5, 0.2, size=n)  # large between-cluster spread, shared by both
    x = base + rng.normal(0, 0.03, size=n)  # at 4 steps
    y = base + 0.05 + rng.normal(0, 0.03, size=n)  # at 28 steps
    keys = [(f"r{i}", "p", 0) for i in range(n)]
    ours = paired_delta(dict(zip(keys, x)), dict(zip(keys, y)), resamples=resamples, seed=1)
    assert ours["resampling"] == "clusters" and ours["clusters"] == n
    theirs = stats.bootstrap((x, y), lambda a, b, axis: np.mean(b - a, axis=axis),
                             paired=True, vectorized=True, method="percentile",
                             n_resamples=resamples, confidence_level=0.95,
                             random_state=np.random.default_rng(2)).confidence_interval
    d = y - x
    tolerance = percentile_tolerance(d.std() / math.sqrt(n), resamples)
    assert ours["mean"] == pytest.approx(d.mean())
    assert ours["ci_low"] == pytest.approx(theirs.low, abs=tolerance)
    assert ours["ci_high"] == pytest.approx(theirs.high, abs=tolerance)
    # the same numbers through a curve: the difference from the plateau, paired per cluster
    observations = [(k, 4, v) for k, v in zip(keys, x)] + [(k, 28, v) for k, v in zip(keys, y)]
    curve = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY, resamples=resamples, seed=1, margin=0.1)
    assert curve.difference[0] == pytest.approx(-d.mean())
    assert -curve.difference_ci_high[0] == pytest.approx(theirs.low, abs=tolerance)
    assert -curve.difference_ci_low[0] == pytest.approx(theirs.high, abs=tolerance)


def test_cluster_bootstrap_matches_scipy_on_cluster_means_and_is_wider_than_cells():
    """Equal-size clusters: the pooled mean is the mean of cluster means, so resampling
    clusters is scipy's bootstrap of the cluster means. Resampling cells instead ignores the
    shared (reference, prompt) and gives a far narrower interval."""
    rng = np.random.default_rng(11)
    clusters, seeds, resamples = 12, 4, 20000
    effects = rng.normal(0, 0.3, size=clusters)
    values = (effects[:, None] + rng.normal(0, 0.02, size=(clusters, seeds))).ravel()
    labels = [(f"r{c}", "p") for c in range(clusters) for _ in range(seeds)]
    ours = bootstrap_ci(values, clusters=labels, resamples=resamples, seed=5)
    means = values.reshape(clusters, seeds).mean(axis=1)
    theirs = stats.bootstrap((means,), np.mean, method="percentile", n_resamples=resamples,
                             random_state=np.random.default_rng(6)).confidence_interval
    tolerance = percentile_tolerance(means.std() / math.sqrt(clusters), resamples)
    assert ours[0] == pytest.approx(theirs.low, abs=tolerance)
    assert ours[1] == pytest.approx(theirs.high, abs=tolerance)
    cells = bootstrap_ci(values, resamples=resamples, seed=5)
    assert (ours[1] - ours[0]) > 1.5 * (cells[1] - cells[0])


def test_one_cluster_resamples_seeds_like_scipy():
    rng = np.random.default_rng(12)
    values = rng.normal(0.6, 0.05, size=24)
    resamples = 20000
    observations = [(("r", "p", s), 8, v) for s, v in enumerate(values)]
    curve = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY, resamples=resamples, seed=3)
    assert curve.resampling == "seeds"
    assert any("seeds only" in note for note in curve.notes)
    theirs = stats.bootstrap((values,), np.mean, method="percentile", n_resamples=resamples,
                             random_state=np.random.default_rng(4)).confidence_interval
    tolerance = percentile_tolerance(values.std() / math.sqrt(values.size), resamples)
    assert curve.ci_low[0] == pytest.approx(theirs.low, abs=tolerance)
    assert curve.ci_high[0] == pytest.approx(theirs.high, abs=tolerance)


# ------------------------------------------------------------------ by hand
def test_exact_bootstrap_of_three_clusters():
    """Clusters with values 0, 1, 5: the 27 equally likely resamples give mean 0 and mean 5
    with probability 1/27 (3.7%) each, more than 2.5%, so the 95% percentile interval is
    exactly [0, 5] (a shift below needs fewer than 500 of 20000 draws where 741 are
    expected: about 9 standard deviations)."""
    means = [np.mean(c) for c in itertools.product([0.0, 1.0, 5.0], repeat=3)]
    assert means.count(0.0) == means.count(5.0) == 1 and len(means) == 27
    low, high = bootstrap_ci([0.0, 1.0, 5.0], clusters=["a", "b", "c"], resamples=20000)
    assert (low, high) == (0.0, 5.0)
    # the same with each cluster holding two seeds of equal value: clusters, not cells
    low, high = bootstrap_ci([0.0, 0.0, 1.0, 1.0, 5.0, 5.0],
                             clusters=["a", "a", "b", "b", "c", "c"], resamples=20000)
    assert (low, high) == (0.0, 5.0)


def test_pairing_keeps_a_constant_step_effect_exact():
    """Every seed gains exactly 0.1 from 4 to 28 steps while seeds differ wildly: paired,
    every resample's difference is 0.1 (a real zero width, from many units), while each
    step's own mean has a wide interval."""
    rng = np.random.default_rng(13)
    level = rng.normal(0, 1.0, size=(6, 3))
    observations = []
    for c in range(6):
        for s in range(3):
            observations.append(((f"r{c}", "p", s), 4, level[c, s]))
            observations.append(((f"r{c}", "p", s), 28, level[c, s] + 0.1))
    curve = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY, margin=0.05)
    assert curve.difference[0] == pytest.approx(-0.1)
    assert curve.difference_ci_low[0] == pytest.approx(-0.1)
    assert curve.difference_ci_high[0] == pytest.approx(-0.1)
    assert curve.ci_high[0] - curve.ci_low[0] > 0.5
    # and the regime is never 4 steps, in any resample: the difference exceeds the margin
    assert curve.effective_regime == 28 and curve.regime_interval == [28, 28]


def test_one_unit_gives_no_interval_anywhere():
    observations = [(("r", "p", 0), s, v) for s, v in zip(STEPS, [0.2, 0.45, 0.58, 0.61,
                                                                   0.62, 0.62])]
    curve = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY, margin=0.02)
    assert curve.resampling is None
    assert curve.ci_low == [None] * 6 and curve.ci_high == [None] * 6
    assert curve.difference_ci_low == [None] * 6
    assert curve.effective_regime == 8  # the point estimate: -0.01 is within 0.02
    assert curve.regime_interval is None and curve.knee_interval is None
    assert any(N_TOO_SMALL in note for note in curve.notes)
    # and without a margin: one seed has no seed-to-seed noise, so no regime at all
    bare = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                   info=IDENTITY)
    assert bare.margin is None and bare.effective_regime is None
    assert "margin unknown" in bare.regime_note


def test_pooled_seed_noise_is_the_default_margin():
    # cluster A: 1, 3 (mean 2, squares 2); cluster B: 4, 6, 8 (mean 6, squares 8);
    # pooled: sqrt((2 + 8) / ((2 - 1) + (3 - 1)))
    expected = math.sqrt(10 / 3)
    assert pooled_seed_sd([1, 3, 4, 6, 8], ["A", "A", "B", "B", "B"]) == pytest.approx(expected)
    assert pooled_seed_sd([1, 4], ["A", "B"]) is None
    plateau = {("A", "p", 0): 1, ("A", "p", 1): 3, ("B", "p", 0): 4, ("B", "p", 1): 6,
               ("B", "p", 2): 8}
    observations = [(u, 28, v) for u, v in plateau.items()]
    observations += [(u, 4, v - 1.0) for u, v in plateau.items()]
    curve = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY)
    assert curve.margin == pytest.approx(expected) and curve.margin_source == "seed noise"
    assert curve.effective_regime == 4  # 1.0 below the plateau is within 1.83


def test_regime_distribution_of_two_clusters_by_hand():
    """Two clusters, one seed each, margin 0.1. At 2 steps cluster A is 0.05 below its
    plateau, cluster B 0.5 below. Resamples: AA (1/4) -> mean difference -0.05, regime 2;
    AB (1/2) -> -0.275 and BB (1/4) -> -0.5, regime 4. So P(regime 2) = 1/4, the mode is 4,
    the 5th percentile is 2 and the 95th is 4; the point estimate (-0.275) is 4."""
    observations = [(("A", "p", 0), 1, 0.0), (("A", "p", 0), 2, 0.95), (("A", "p", 0), 4, 1.0),
                    (("B", "p", 0), 1, 0.0), (("B", "p", 0), 2, 0.5), (("B", "p", 0), 4, 1.0)]
    resamples = 4000
    curve = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY, margin=0.1, resamples=resamples, seed=7)
    assert curve.effective_regime == 4
    assert curve.regime_mode == 4 and curve.regime_interval == [2, 4]
    shares = dict((int(s), p) for s, p in curve.regime_distribution)
    # binomial standard error of a share of 1/4 over the resamples; 5 of them
    assert shares[2] == pytest.approx(0.25, abs=5 * math.sqrt(0.25 * 0.75 / resamples))
    assert shares[2] + shares[4] == pytest.approx(1.0)


def test_vectorised_knee_equals_the_scalar_kneedle():
    rng = np.random.default_rng(14)
    x = np.array(STEPS, dtype=float)
    rows = [1 - np.exp(-x / rng.uniform(0.5, 12)) + rng.normal(0, 0.03, size=x.size)
            for _ in range(400)]
    rows += [np.full(x.size, 0.3), np.array([0.1, 0.1, 0.1, 0.5, 0.5, 0.5]),
             np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])]
    curves = np.array(rows)
    for higher in (True, False):
        vectorised = _knees(STEPS, curves if higher else -curves, higher_is_better=higher)
        for i, curve in enumerate(curves):
            expected = knee(STEPS, list(curve if higher else -curve), higher_is_better=higher)
            got = vectorised[i]
            assert (expected is None and math.isnan(got)) or expected == got, (i, higher)


def test_knee_distribution_of_identical_clusters_is_the_knee():
    curve_values = [0.20, 0.45, 0.58, 0.61, 0.62, 0.62]
    observations = [((f"r{c}", "p", s), step, v + 0.01 * c)
                    for c in range(4) for s in range(2) for step, v in zip(STEPS, curve_values)]
    curve = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY, margin=0.02)
    expected = knee(STEPS, curve_values, higher_is_better=True)
    assert curve.knee == expected and curve.knee_mode == expected
    assert curve.knee_interval == [expected, expected] and curve.knee_none_share == 0.0


def test_a_curve_flat_within_the_margin_has_no_knee():
    values = [0.589, 0.590, 0.5905, 0.591]  # Kneedle alone finds a knee in this noise
    assert knee([1, 2, 4, 8], values, higher_is_better=True) is not None
    observations = [((f"r{c}", "p", s), n, v) for c in range(3) for s in range(2)
                    for n, v in zip([1, 2, 4, 8], values)]
    curve = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY, margin=0.02)
    assert curve.knee is None and curve.knee_interval is None
    assert curve.knee_none_share == 1.0
    assert any("no knee" in note for note in curve.notes)


# ------------------------------------------------------------------ missing scores
def test_share_scored_and_the_missing_policies():
    # at 4 steps: seeds 0, 1 scored (0.6, 0.8), seed 2 attempted but unscored (no face),
    # seed 3 never attempted (absent); at 8 steps all three attempted are scored
    observations = [(("r", "p", 0), 4, 0.6), (("r", "p", 1), 4, 0.8), (("r", "p", 2), 4, None),
                    (("r", "p", 0), 8, 0.7), (("r", "p", 1), 8, 0.9), (("r", "p", 2), 8, 0.5)]
    dropped = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                      info=IDENTITY)
    assert dropped.attempted == [3, 3] and dropped.scored == [2, 3]
    assert dropped.scored_share == [pytest.approx(2 / 3), 1.0]
    assert dropped.mean[0] == pytest.approx(0.7) and dropped.n[0] == 2
    # paired difference only over seeds scored at both: (0.6-0.7 + 0.8-0.9) / 2
    assert dropped.difference[0] == pytest.approx(-0.1) and dropped.pairs[0] == 2
    worst = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY, missing="worst", fill=-1.0,
                                    fill_source="metric_info")
    assert worst.mean[0] == pytest.approx((0.6 + 0.8 - 1.0) / 3) and worst.n[0] == 3
    assert worst.difference[0] == pytest.approx((-0.1 - 0.1 + (-1.0 - 0.5)) / 3)
    assert worst.scored == [2, 3] and worst.missing_fill == -1.0
    # the margin is the metric's own noise: scored values only, whatever the policy
    assert worst.margin == dropped.margin == pytest.approx(np.std([0.7, 0.9, 0.5], ddof=1))


def test_nothing_scored_at_the_plateau_means_no_regime():
    observations = [(("r", "p", s), 4, 0.5 + 0.01 * s) for s in range(3)]
    observations += [(("r", "p", s), 8, None) for s in range(3)]
    curve = curve_from_observations(observations, backbone="b", setting="s", metric="m",
                                    info=IDENTITY, margin=0.1)
    assert curve.mean[1] is None and curve.scored_share == [1.0, 0.0]
    assert curve.effective_regime is None and "largest step count" in curve.regime_note


def test_missing_worst_uses_the_recorded_worst_else_the_worst_observed():
    rows = [row(seed=s, steps=n, scores={"identity": v, "style": w})
            for s, (n, v, w) in enumerate([(4, 0.5, 0.3), (4, None, None), (8, 0.6, 0.9),
                                           (8, 0.7, 0.2)])]
    info = {"identity": IDENTITY,
            "style": {"higher_is_better": True, "kind": "style", "worst": None}}
    result = analyse(rows, metric_info=info, adapter_kinds={"ad": "identity"}, missing="worst")
    curves = {c.metric: c for c in result.curves}
    assert curves["identity"].missing_fill == -1.0
    assert curves["identity"].missing_fill_source == "metric_info"
    assert curves["identity"].mean[0] == pytest.approx((0.5 - 1.0) / 2)
    # style has no recorded worst: the lowest style value in the sweep (higher is better)
    assert curves["style"].missing_fill == 0.2
    assert curves["style"].missing_fill_source == "observed"
    assert curves["style"].mean[0] == pytest.approx((0.3 + 0.2) / 2)
    with pytest.raises(ValueError, match="missing"):
        analyse(rows, metric_info=info, missing="zero")


# -------------------------------------------------------- direction, kinds, recommendation
def _sweep(metrics, adapter="ad", seeds=(0, 1, 2), clusters=2, backbone="b", **extra):
    rng = np.random.default_rng(20)
    curve = dict(zip(STEPS, [0.20, 0.45, 0.58, 0.61, 0.62, 0.62]))
    out = []
    for c in range(clusters):
        for s in seeds:
            for n in STEPS:
                scores = {m: curve[n] + rng.normal(0, 0.01) for m in metrics}
                out.append(row(backbone=backbone, adapter=adapter, reference=f"r{c}", seed=s,
                               steps=n, scores=scores, **extra))
    return out


def test_no_kind_matched_metric_means_no_recommendation_and_says_what_is_missing():
    rows = _sweep(["sharpness", "contrast"])
    result = analyse(rows, metric_info={"sharpness": SHARPNESS, "contrast": CONTRAST},
                     adapter_kinds={"ad": "identity"})
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["recommendation"] is None
    reason = data["recommendation_reason"]
    assert "no identity metric was scored" in reason and "sharpness" in reason
    assert "contrast" in reason
    assert result.fidelity_metric == {} and result.pareto == {}
    # diagnostics still get their own curve, regime and knee
    sharp = next(c for c in result.curves if c.metric == "sharpness")
    assert sharp.effective_regime is not None


def test_kind_matched_recommendation_carries_the_regime_interval():
    rows = _sweep(["identity", "sharpness"])
    result = analyse(rows, metric_info={"identity": IDENTITY, "sharpness": SHARPNESS},
                     adapter_kinds={"ad": "identity"})
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    rec = data["recommendation"]
    assert rec["metric"] == "identity" and rec["metric_kind"] == "identity"
    curve = next(c for c in result.curves if c.metric == "identity")
    assert rec["steps"] == curve.effective_regime
    low, high = rec["regime_interval"]
    assert [low, high] == curve.regime_interval and low <= high
    assert rec["regime_mode"] == curve.regime_mode
    assert data["fidelity_metric"] == {"b|ad": "identity"}
    assert data["recommendation_reason"] == rec["reason"]


@pytest.mark.parametrize(("adapter", "kind", "metric", "metric_kind"), [
    ("style-ip", "style", "csd", "style"),
    ("object-ip", "object", "dino", "object"),
    ("none", None, "clip-t", "text"),
])
def test_fidelity_follows_the_adapter_kind(adapter, kind, metric, metric_kind):
    info = {metric: {"higher_is_better": True, "kind": metric_kind},
            "identity": IDENTITY, "sharpness": SHARPNESS}
    rows = _sweep([metric, "identity", "sharpness"], adapter=adapter)
    result = analyse(rows, metric_info=info, adapter_kinds={adapter: kind, "none": None})
    assert result.recommendation is not None and result.recommendation["metric"] == metric


def test_several_settings_give_a_mapping_and_unknown_adapter_kinds_are_not_guessed():
    rows = _sweep(["identity"]) + _sweep(["identity"], adapter="mystery")
    result = analyse(rows, metric_info={"identity": IDENTITY}, adapter_kinds={"ad": "identity"})
    assert set(result.recommendation) == {"b|ad", "b|mystery"}
    assert result.recommendation["b|ad"]["metric"] == "identity"
    assert result.recommendation["b|mystery"] is None
    assert "kind of adapter 'mystery' is not recorded" in result.recommendation_reason


def test_unknown_direction_shows_means_but_no_regime_knee_or_recommendation():
    rows = _sweep(["identity"])
    result = analyse(rows, metric_info={}, adapter_kinds={"ad": "identity"})
    (curve,) = result.curves
    assert curve.direction == "unknown" and curve.higher_is_better is None
    assert curve.mean[0] is not None and curve.ci_low[0] is not None
    assert curve.effective_regime is None and curve.knee is None and curve.knee_interval is None
    assert "direction unknown" in curve.regime_note
    assert result.recommendation is None and result.pareto == {}
    assert result.metrics["identity"]["direction"] == "unknown"
    # a kind without a direction is no better
    result = analyse(rows, metric_info={"identity": {"kind": "identity",
                                                     "higher_is_better": None}},
                     adapter_kinds={"ad": "identity"})
    assert result.recommendation is None and "unknown" in result.recommendation_reason


# ------------------------------------------------------------------ confounds and windows
def test_windows_that_never_open_are_excluded_and_counted():
    rows = _sweep(["identity"], seeds=(0, 1))
    closed = [row(reference="r0", seed=9, steps=n, scores={"identity": 0.0},
                  adapter_active_steps=0, start=0.5, end=1.0) for n in (1, 2)]
    # the same setting label as the closed cells, opened from 4 steps on
    opened = [row(reference=r, seed=s, steps=n, scores={"identity": 0.6}, start=0.5, end=1.0)
              for r in ("r0", "r1") for s in (0, 1) for n in (4, 8)]
    flagged = [dict(r, confounds=["schedule_starts_far_from_noise"]) for r in rows
               if r["steps"] == 1]
    others = [r for r in rows if r["steps"] != 1]
    result = analyse(others + flagged + closed + opened, metric_info={"identity": IDENTITY},
                     adapter_kinds={"ad": "identity"})
    windowed = next(c for c in result.curves if c.adapter == "ad [window 0.5-1]")
    assert windowed.steps == [4, 8]  # the closed cells at 1 and 2 steps are not in the curve
    assert windowed.excluded_window_never_opens == [0, 0]
    counts = {(c["setting"], c["steps"], c["flag"]): (c["cells"], c["of_cells"])
              for c in result.confounds}
    assert counts[("ad [window 0.5-1]", 1, "window_never_opens")] == (1, 1)
    assert counts[("ad [window 0.5-1]", 2, "window_never_opens")] == (1, 1)
    assert counts[("ad", 1, "schedule_starts_far_from_noise")] == (4, 4)
    assert not any(c["steps"] != 1 and c["flag"] == "schedule_starts_far_from_noise"
                   for c in result.confounds)
    # the engine's own flag counts the same, once
    assert confound_counts([dict(closed[0], confounds=["window_never_opens"])])[0]["cells"] == 1


def test_ablation_and_swap_deltas_are_clustered_paired_and_skip_closed_windows():
    off = [row(adapter="none", reference=f"r{c}", seed=s, steps=4,
               scores={"identity": 0.1 * c + 0.01 * s}) for c in range(3) for s in range(2)]
    on = [row(reference=f"r{c}", seed=s, steps=4, scores={"identity": 0.1 * c + 0.01 * s + 0.2})
          for c in range(3) for s in range(2)]
    closed = [row(reference="r0", seed=5, steps=4, scores={"identity": 0.0},
                  adapter_active_steps=0)]
    twin = [row(adapter="none", reference="r0", seed=5, steps=4, scores={"identity": 0.0})]
    (delta,) = ablation_deltas(off + on + closed + twin, metric_info={"identity": IDENTITY})
    assert delta["n"] == 6 and delta["clusters"] == 3 and delta["resampling"] == "clusters"
    assert delta["mean"] == pytest.approx(0.2)
    assert delta["ci_low"] == pytest.approx(0.2) and delta["from_adapter"] is True
    assert delta["excluded_window_never_opens"] == 1
    # direction unknown: a delta, but no claim where it comes from
    (unknown,) = ablation_deltas(off + on, metric_info={})
    assert unknown["higher_is_better"] is None and unknown["from_adapter"] is None
    # swap: one pair has no interval
    src = [row(backbone="dev", steps=28, scores={"identity": 0.5})]
    dst = [row(backbone="fast", steps=4, scores={"identity": 0.55})]
    swap = swap_comparison(src + dst, [], source="dev", target="fast",
                           metric_info={"identity": IDENTITY})
    assert swap["metrics"]["identity"]["mean"] == pytest.approx(0.05)
    assert swap["metrics"]["identity"]["ci_low"] is None
    assert swap["metrics"]["identity"]["ci_note"] == N_TOO_SMALL


# ------------------------------------------------------------------ latency
def _latency(steps, median, q1=None, q3=None, repeats=5, **extra):
    return {"backbone": "b", "adapter": "ad", "scale": None, "start": 0.0, "end": 1.0,
            "steps": steps, "batch": 1, "height": 64, "width": 64, "total_s": median,
            "total_q1_s": q1, "total_q3_s": q3, "denoise_s": median * 0.9, "repeats": repeats,
            "method": "measured", "fit": None, **extra}


def test_latency_medians_iqr_budget_and_pareto():
    assert latency_summary(_latency(4, 1.0, 0.9, 1.2))["iqr_s"] == pytest.approx(0.3)
    one = latency_summary(_latency(4, 1.0, 1.0, 1.0, repeats=1))
    assert one["iqr_s"] is None and one["note"] == N_TOO_SMALL
    fitted = latency_summary(_latency(8, 2.0, method="fitted", fit={
        "fixed_s": 0.4, "per_step_s": 0.2, "residuals_s": {"8": 0.01}}))
    assert fitted["residual_s"] == 0.01 and fitted["per_step_s"] == 0.2 and fitted["note"] is None
    # old stores: only the first columns
    old = {"backbone": "b", "adapter": "ad", "steps": 4, "height": 64, "width": 64,
           "total_s": 1.0, "denoise_s": 0.9, "repeats": 3, "device": "cpu", "start": 0.0,
           "end": 1.0}
    assert latency_summary(old)["median_s"] == 1.0 and latency_summary(old)["iqr_s"] is None

    rows = _sweep(["identity"])
    lat = [_latency(n, 0.1 * n, 0.09 * n, 0.11 * n) for n in STEPS]
    free = analyse(rows, lat, metric_info={"identity": IDENTITY}, adapter_kinds={"ad":
                                                                                 "identity"})
    regime = free.recommendation["steps"]
    assert free.recommendation["latency_s"] == pytest.approx(0.1 * regime)
    assert free.latency["b|ad"][regime]["median_s"] == pytest.approx(0.1 * regime)
    assert [p[0] for p in free.pareto["b|ad"]] == sorted(p[0] for p in free.pareto["b|ad"])
    tight = analyse(rows, lat, metric_info={"identity": IDENTITY},
                    adapter_kinds={"ad": "identity"}, latency_budget=0.1 * regime - 0.01)
    assert tight.recommendation is None and "latency" in tight.recommendation_reason


# ------------------------------------------------------------------ scale and output
def test_analysis_json_is_strict_json_and_a_few_hundred_cells_are_fast():
    rows = _sweep(["identity", "sharpness"], clusters=8, seeds=(0, 1, 2, 3, 4))  # 480 cells
    start = time.perf_counter()
    result = analyse(rows, metric_info={"identity": IDENTITY, "sharpness": SHARPNESS},
                     adapter_kinds={"ad": "identity"})
    elapsed = time.perf_counter() - start
    assert len(result.curves) == 2 and elapsed < 2.0  # two curves: well under 1 s each
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert {"curves", "latency", "pareto", "recommendations", "recommendation",
            "recommendation_reason", "fidelity_metric", "confounds", "ablations",
            "trajectories", "probes", "metrics", "metric_info_source",
            "adapter_kinds_source", "options", "notes"} <= set(data)
    assert analyse(rows, metric_info={"identity": IDENTITY},
                   adapter_kinds={"ad": "identity"}).to_dict() == \
        analyse(rows, metric_info={"identity": IDENTITY},
                adapter_kinds={"ad": "identity"}).to_dict()  # deterministic


# ------------------------------------------------------------------ through a real store
def _store_with(tmp_path, rows, *, metrics, adapters):
    from adapterswap.sweep.store import RunStore

    store = RunStore(tmp_path)
    if hasattr(store, "begin_run"):
        store.begin_run(spec={}, versions={}, code_hash="x", weights={}, reference_hashes={},
                        device="cpu", dtype="float32", metrics=metrics, adapters=adapters,
                        cell_keys=[r["key"] for r in rows], argv=["test"])
    for r in rows:
        config = {k: r[k] for k in ("backbone", "adapter", "scale", "start", "end",
                                    "reference", "prompt", "seed", "steps", "height",
                                    "width", "guidance_scale")}
        store.record_cell(r["key"], config, status="done", scores=r["scores"],
                          extra={"adapter_active_steps": r["adapter_active_steps"],
                                 "confounds": r["confounds"]})
    store.close()


def test_report_reads_the_newest_run_unless_all_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from adapterswap.sweep.report import build_report
    from adapterswap.sweep.store import RunStore

    if not hasattr(RunStore, "current_keys"):
        pytest.skip("this store records no runs")
    old = _sweep(["identity"], seeds=(0, 1))
    new = _sweep(["identity"], seeds=(0, 1), backbone="b2")
    _store_with(tmp_path, old, metrics={"identity": IDENTITY}, adapters={"ad": "identity"})
    _store_with(tmp_path, new, metrics={"identity": IDENTITY}, adapters={"ad": "identity"})
    build_report(tmp_path, fraction=0.9, margin=0.05, missing="worst")
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert {c["backbone"] for c in data["curves"]} == {"b2"}
    assert data["metric_info_source"] == "store"
    assert data["options"]["margin"] == 0.05 and data["options"]["missing"] == "worst"
    assert any("fraction" in note and "ignored" in note for note in data["notes"])
    assert all(c["margin_source"] == "option" for c in data["curves"])
    build_report(tmp_path, all_runs=True)
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert {c["backbone"] for c in data["curves"]} == {"b", "b2"}
    assert set(data["recommendation"]) == {"b|ad", "b2|ad"}


def test_report_of_a_one_seed_sweep_shows_no_interval_and_no_recommendation(tmp_path):
    pytest.importorskip("matplotlib")
    from adapterswap.sweep.report import build_report

    rows = [row(steps=n, scores={"sharpness": 10.0 * n, "contrast": 0.1 * n}) for n in STEPS]
    rows[0]["scores"]["sharpness"] = None  # attempted, not scored
    rows.append(row(steps=2, seed=0, start=0.9, end=1.0, adapter_active_steps=0,
                    scores={"sharpness": 1.0}, key="closed"))
    _store_with(tmp_path, rows, metrics={"sharpness": SHARPNESS, "contrast": CONTRAST},
                adapters={"ad": "identity", "none": None})
    html = build_report(tmp_path).read_text()
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["recommendation"] is None and data["recommendation_reason"]
    assert "identity" in data["recommendation_reason"]
    for curve in data["curves"]:
        assert all(v is None for v in curve["ci_low"] + curve["ci_high"])
        assert curve["regime_interval"] is None and curve["knee_interval"] is None
    sharp = next(c for c in data["curves"] if c["metric"] == "sharpness" and
                 c["adapter"] == "ad")
    assert sharp["scored"][0] == 0 and sharp["attempted"][0] == 1
    assert N_TOO_SMALL in html and "No recommendation" in html
    assert "- (0/1)" in html  # no mean, and the share scored beside it
    assert "Confounded cells" in html and "window_never_opens" in html
    assert any(c["flag"] == "window_never_opens" for c in data["confounds"])
    interval = re.compile(r"\[[-+0-9.e]+, [-+0-9.e]+\]")
    assert not interval.search(html)  # no "[low, high]" anywhere in the page
