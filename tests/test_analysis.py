"""Analysis: bootstrap CIs, effective regime (margin rule), Kneedle knee (against kneed), Pareto,
paired deltas. The statistics against scipy and hand computation: tests/test_statistics.py."""

from __future__ import annotations

import numpy as np
import pytest

from adapterswap.sweep.analysis import (
    N_TOO_SMALL,
    bootstrap_ci,
    effective_regime,
    knee,
    paired_delta,
    pareto_front,
)

STEPS = [1, 2, 4, 8, 16, 28]


def test_bootstrap_ci_brackets_the_mean_and_needs_two_values():
    rng = np.random.default_rng(1)
    data = rng.normal(0.6, 0.05, size=40)
    low, high = bootstrap_ci(data)
    assert low < data.mean() < high and high - low < 0.05
    # constant data: every resample has the same mean (a real zero width, n = 3)
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3))
    # one value, or nothing: no interval at all, never a zero-width one
    assert bootstrap_ci([0.3]) is None
    assert bootstrap_ci([0.3, None, float("nan")]) is None
    assert bootstrap_ci([]) is None


def test_bootstrap_ci_is_deterministic_for_a_seed():
    data = np.random.default_rng(2).normal(size=25)
    assert bootstrap_ci(data, seed=3) == bootstrap_ci(data, seed=3)
    assert bootstrap_ci(data, seed=3) != bootstrap_ci(data, seed=4)


def test_effective_regime_is_the_margin_rule_in_the_better_direction():
    # higher is better: differences from the plateau (28 steps)
    differences = [-0.42, -0.17, -0.04, -0.01, 0.0, 0.0]
    assert effective_regime(STEPS, differences, higher_is_better=True, margin=0.02) == 8
    assert effective_regime(STEPS, differences, higher_is_better=True, margin=0.05) == 4
    # lower is better (LPIPS): a step count may be at most ``margin`` above the plateau
    lpips = [0.26, 0.11, 0.03, 0.01, 0.0, 0.0]
    assert effective_regime(STEPS, lpips, higher_is_better=False, margin=0.02) == 8
    # better than the plateau is within the margin, whatever the margin
    better = [0.3, 0.2, 0.1, 0.0, 0.0, 0.0]
    assert effective_regime(STEPS, better, higher_is_better=True, margin=0.0) == 1
    # the margin is inclusive (0.5 - 0.6 is -0.09999999999999998 in floats)
    assert effective_regime([1, 2], [0.5 - 0.6, 0.0], higher_is_better=True, margin=0.1) == 1
    # steps without pairs (None) are skipped; the largest step count is always within
    assert effective_regime([1, 2, 4], [None, -1.0, 0.0], higher_is_better=True,
                            margin=0.1) == 4


def test_effective_regime_does_not_depend_on_the_plateau_sign():
    # the old plateau-ratio rule changed meaning with the plateau's sign; differences do not
    means = np.array([-1.0, -0.5, -0.1, -0.02, 0.0, 0.0])
    for shift in (-5.0, 0.0, 5.0):
        shifted = means + shift
        differences = list(shifted - shifted[-1])
        assert effective_regime(STEPS, differences, higher_is_better=True, margin=0.05) == 8


def test_effective_regime_refuses_a_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        effective_regime(STEPS, [0.0] * 6, higher_is_better=True, margin=-1.0)


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
    assert delta["clusters"] == 1 and delta["resampling"] == "seeds"  # one (reference, prompt)
    # two resamplable pairs: the interval is the range of the two deltas' possible means
    assert 0.02 - 1e-12 <= delta["ci_low"] <= delta["mean"] <= delta["ci_high"] <= 0.05 + 1e-12


def test_paired_delta_with_one_pair_has_no_interval():
    delta = paired_delta({("r", "p", 0): 0.5}, {("r", "p", 0): 0.7, ("r", "p", 1): 0.1})
    assert delta["n"] == 1 and delta["mean"] == pytest.approx(0.2)
    assert delta["ci_low"] is None and delta["ci_high"] is None
    assert delta["ci_note"] == N_TOO_SMALL
    empty = paired_delta({}, {})
    assert empty["n"] == 0 and empty["mean"] is None and empty["ci_low"] is None
