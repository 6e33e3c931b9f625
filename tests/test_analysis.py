"""Analysis: bootstrap CIs, effective regime, Kneedle knee (against kneed), Pareto, deltas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adapterswap.sweep.analysis import (
    bootstrap_ci,
    effective_regime,
    knee,
    paired_delta,
    pareto_front,
)

STEPS = [1, 2, 4, 8, 16, 28]


def test_bootstrap_ci_brackets_the_mean_and_is_degenerate_for_constants():
    rng = np.random.default_rng(1)
    data = rng.normal(0.6, 0.05, size=40)
    low, high = bootstrap_ci(data)
    assert low < data.mean() < high and high - low < 0.05
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (0.3, 0.3)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_effective_regime_by_direction():
    identity = [0.20, 0.45, 0.58, 0.61, 0.62, 0.62]
    assert effective_regime(STEPS, identity, higher_is_better=True) == 8  # 0.58 < 0.95 * 0.62
    assert effective_regime(STEPS, identity, higher_is_better=True, fraction=0.9) == 4
    lpips = [0.70, 0.55, 0.47, 0.45, 0.44, 0.44]
    # lower is better: within 1/0.95 of the plateau 0.44 -> <= 0.4632
    assert effective_regime(STEPS, lpips, higher_is_better=False) == 8
    negative = [-1.0, -0.5, -0.1, -0.02, 0.0, 0.0]  # plateau 0: progress rule
    assert effective_regime(STEPS, negative, higher_is_better=True) == 8


@pytest.mark.parametrize("curve", [
    [0.20, 0.45, 0.58, 0.61, 0.62, 0.62],
    [0.1, 0.3, 0.5, 0.6, 0.65, 0.66],
    [0.0, 0.5, 0.8, 0.9, 0.95, 0.96],
])
def test_knee_matches_kneed(curve):
    kneed = pytest.importorskip("kneed")
    expected = kneed.KneeLocator(STEPS, curve, curve="concave", direction="increasing").knee
    assert knee(STEPS, curve, higher_is_better=True) == expected
    flipped = [1 - v for v in curve]  # lower-is-better version of the same curve
    assert knee(STEPS, flipped, higher_is_better=False) == expected


def test_pareto_front_drops_dominated_points():
    points = [(0.1, 0.5, 1), (0.2, 0.7, 2), (0.3, 0.65, 4), (0.4, 0.8, 8), (0.5, 0.8, 16)]
    assert pareto_front(points, higher_is_better=True) == [(0.1, 0.5, 1), (0.2, 0.7, 2),
                                                           (0.4, 0.8, 8)]


def test_paired_delta_pairs_by_key():
    a = {("r", "p", 0): 0.5, ("r", "p", 1): 0.6, ("r", "p", 2): 0.7}
    b = {("r", "p", 0): 0.55, ("r", "p", 1): 0.62, ("r", "p", 3): 9.0}
    delta = paired_delta(a, b)
    assert delta["n"] == 2 and delta["mean"] == pytest.approx(0.035)
    assert delta["ci_low"] <= delta["mean"] <= delta["ci_high"]
