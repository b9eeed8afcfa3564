"""Bootstrap shares and intervals against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from refusal_eval.stats import (
    expanded_level,
    fisher_exact_2x2,
    holm,
    mean_interval,
    ratio_of_sums,
    share_intervals,
    wilson_interval,
)


def synthetic(n: int, components: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(4.0, 0.5, n)
    true_share = np.linspace(0.1, 0.7, components)
    effects = true_share[:, None] * gaps + rng.normal(0, 0.4, (components, n))
    return effects, gaps


def test_ratio_of_sums_is_not_mean_of_ratios():
    effects = np.array([[1.0, 0.001]])
    gaps = np.array([2.0, 0.0001])
    assert ratio_of_sums(effects, gaps)[0] == (1.001 / 2.0001)


def test_vectorised_intervals_match_scipy_paired_bootstrap_per_component():
    effects, gaps = synthetic(40)
    for expand in (True, False):
        ours = share_intervals(effects, gaps, n_resamples=1500, seed=7, expand=expand)
        level = expanded_level(0.95, 40) if expand else 0.95
        for k in range(effects.shape[0]):
            ref = stats.bootstrap(
                (effects[k], gaps), lambda e, g, axis=-1: e.sum(axis) / g.sum(axis), paired=True, vectorized=True,
                n_resamples=1500, method="BCa", confidence_level=level, rng=np.random.default_rng(7),
            )
            assert math.isclose(ours.low[k], ref.confidence_interval.low, rel_tol=1e-9)
            assert math.isclose(ours.high[k], ref.confidence_interval.high, rel_tol=1e-9)
            assert math.isclose(ours.estimate[k], effects[k].sum() / gaps.sum(), rel_tol=1e-12)


def test_expanded_level_matches_t_quantile_widening():
    n = 40
    z = stats.norm.ppf(0.5 + expanded_level(0.95, n) / 2)
    assert math.isclose(z, math.sqrt(n / (n - 1)) * stats.t.ppf(0.975, n - 1), rel_tol=1e-9)
    assert expanded_level(0.95, 40) > 0.955
    assert math.isclose(expanded_level(0.95, 10**7), 0.95, abs_tol=1e-6)


def test_familywise_band_is_wider_and_covers_jointly():
    effects, gaps = synthetic(60, components=30, seed=3)
    iv = share_intervals(effects, gaps, n_resamples=2000, seed=0)
    assert np.all(iv.fw_low <= iv.low + 1e-12) and np.all(iv.fw_high >= iv.high - 1e-12)
    assert np.all(iv.fw_low <= iv.estimate) and np.all(iv.estimate <= iv.fw_high)
    # joint coverage over repeated datasets: all 30 true shares inside at once in >= ~90% of datasets
    true = np.linspace(0.1, 0.7, 30)
    joint = []
    for seed in range(60):
        e, g = synthetic(60, components=30, seed=100 + seed)
        band = share_intervals(e, g, n_resamples=1000, seed=seed)
        joint.append(bool(np.all((band.fw_low <= true) & (true <= band.fw_high))))
    assert np.mean(joint) >= 0.88


def test_interval_contains_estimate_and_narrows_with_more_pairs():
    widths = []
    for n in (20, 80, 320):
        effects, gaps = synthetic(n, seed=n)
        iv = share_intervals(effects, gaps, n_resamples=1000, seed=0)
        assert np.all(iv.low <= iv.estimate) and np.all(iv.estimate <= iv.high)
        widths.append(float(np.mean(iv.high - iv.low)))
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < widths[0] / 2.5  # ~ 1/sqrt(n): a 16x larger sample gives ~4x narrower


def test_percentile_method_and_zero_components():
    effects, gaps = synthetic(30)
    effects[0] = 0.0
    effects[1] = gaps  # share exactly 1 in every resample
    iv = share_intervals(effects, gaps, n_resamples=500, method="percentile")
    assert iv.low[0] == iv.high[0] == iv.estimate[0] == 0.0
    assert np.allclose([iv.low[1], iv.high[1], iv.estimate[1]], 1.0)
    assert np.all(np.isfinite(iv.low)) and np.all(np.isfinite(iv.high))


def test_same_seed_same_interval():
    effects, gaps = synthetic(25)
    a = share_intervals(effects, gaps, n_resamples=700, seed=3)
    b = share_intervals(effects, gaps, n_resamples=700, seed=3)
    assert np.array_equal(a.low, b.low) and np.array_equal(a.high, b.high)


def test_mean_interval_covers_mean():
    values = np.random.default_rng(1).normal(2.0, 1.0, 50)
    iv = mean_interval(values, n_resamples=1000)
    assert iv.low < values.mean() < iv.high
    assert iv.low > 1.3 and iv.high < 2.7


def test_wilson_closed_form():
    k, n, z = 17, 20, stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = wilson_interval(k, n)
    assert math.isclose(low, centre - half, rel_tol=1e-9) and math.isclose(high, centre + half, rel_tol=1e-9)


def test_closed_form_jackknife_gives_scipys_bca_interval():
    """share_intervals computes BCa's jackknife in closed form; scipy.stats.bootstrap with a plain ratio-of-sums
    statistic (its own jackknife) on the same resamples gives the same intervals, and mean_interval equals
    scipy's bootstrap of np.mean."""
    rng = np.random.default_rng(7)
    n = 23
    gaps = rng.gamma(3, 0.7, n)
    effects = 0.4 * gaps + rng.normal(0, 0.6, (3, n))
    fast = share_intervals(effects, gaps, n_resamples=999, seed=5, expand=False)
    for c in range(3):
        ref = stats.bootstrap((effects[c], gaps), lambda e, g, axis=-1: e.sum(axis) / g.sum(axis), paired=True,
                            vectorized=True, n_resamples=999, confidence_level=0.95, method="BCa",
                            rng=np.random.default_rng(5))
        assert fast.low[c] == pytest.approx(ref.confidence_interval.low, rel=1e-9)
        assert fast.high[c] == pytest.approx(ref.confidence_interval.high, rel=1e-9)
    values = rng.normal(1.0, 2.0, 40)
    ours = mean_interval(values, 0.9, 1500, "BCa", 3)
    ref = stats.bootstrap((values,), np.mean, n_resamples=1500, confidence_level=0.9, method="BCa",
                        rng=np.random.default_rng(3))
    assert float(ours.low) == pytest.approx(ref.confidence_interval.low, rel=1e-9)
    assert float(ours.high) == pytest.approx(ref.confidence_interval.high, rel=1e-9)


def test_holm_against_its_definition_and_a_worked_example():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; made non-decreasing: 0.04 -> 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(3)
    for _ in range(50):
        p = rng.uniform(0, 0.2, int(rng.integers(1, 12)))
        # The step-down rule in words: reject the k smallest while each p_(j) <= alpha / (m - j), j < k.
        for alpha in (0.01, 0.05, 0.1):
            order, m = np.sort(p), len(p)
            k = 0
            while k < m and order[k] <= alpha / (m - k):
                k += 1
            assert int((holm(p) <= alpha).sum()) == k
    assert list(holm([])) == [] and holm([0.9, 0.8])[0] == 1.0


def test_holm_controls_the_familywise_error_over_eleven_null_categories():
    """Eleven categories with no change (uniform p-values): the chance that any is called changed stays at or below
    0.05 (about 1 - (1 - 0.05/11)^11 = 0.049 when independent); without adjustment it would be about 0.43."""
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(20000, 11))
    adjusted = np.array([holm(row) for row in p])
    any_rejected = (adjusted < 0.05).any(1).mean()
    assert any_rejected <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 20000)
    assert (p < 0.05).any(1).mean() > 0.4


def test_fisher_exact_against_a_hypergeometric_sum():
    def naive(a, n_a, b, n_b):
        total = a + b
        probs = {x: math.comb(n_a, x) * math.comb(n_b, total - x) / math.comb(n_a + n_b, total)
                 for x in range(max(0, total - n_b), min(n_a, total) + 1)}
        return min(1.0, sum(q for q in probs.values() if q <= probs[a] * (1 + 1e-7)))

    for args in ((6, 7, 0, 7), (5, 7, 2, 7), (3, 10, 3, 10), (0, 4, 4, 4), (12, 40, 25, 38)):
        assert fisher_exact_2x2(*args) == pytest.approx(naive(*args), rel=1e-9)
