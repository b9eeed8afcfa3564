"""Share heterogeneity (per category, leave-one-out, largest pair) against naive per-pair loops."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import numpy as np
import pytest

from refusal_eval.stats import CategoryShare, Heterogeneity, share_heterogeneity, share_intervals

CATEGORIES = ["weapons", "cyber", "drugs", "cyber", "weapons", "fraud", "drugs", "cyber", "weapons", "drugs", "cyber"]


def synthetic(components: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = len(CATEGORIES)
    gaps = rng.gamma(4.0, 0.5, n)
    effects = np.linspace(-0.3, 0.6, components)[:, None] * gaps + rng.normal(0, 0.3, (components, n))
    return effects, gaps


def test_leave_one_out_largest_pair_and_ratio_quantiles_match_naive_loops():
    effects, gaps = synthetic()
    results = share_heterogeneity(effects, gaps, CATEGORIES, n_resamples=300)
    assert len(results) == effects.shape[0]
    for row, result in zip(effects.tolist(), results, strict=True):
        assert isinstance(result, Heterogeneity)
        g = gaps.tolist()
        assert math.isclose(result.share, sum(row) / sum(g), rel_tol=1e-12)
        loo = []
        for i in range(len(row)):
            loo.append(sum(row[:i] + row[i + 1 :]) / sum(g[:i] + g[i + 1 :]))
        assert math.isclose(result.loo_min, min(loo), rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(result.loo_max, max(loo), rel_tol=1e-12, abs_tol=1e-15)
        net = sum(row)
        best_i, best = None, -math.inf
        for i, e in enumerate(row):
            contribution = e if net > 0 else -e
            if contribution > best:
                best_i, best = i, contribution
        assert result.largest_pair_index == best_i
        assert math.isclose(result.largest_pair_fraction, best / abs(net), rel_tol=1e-12)
        deciles = statistics.quantiles([e / gi for e, gi in zip(row, g, strict=True)], n=10, method="inclusive")
        expected = (deciles[0], deciles[4], deciles[8])
        assert len(result.ratio_quantiles) == 3
        for a, b in zip(result.ratio_quantiles, expected, strict=True):
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def test_category_shares_are_ratios_of_sums_with_bootstrap_cis():
    effects, gaps = synthetic()
    results = share_heterogeneity(effects, gaps, CATEGORIES, n_resamples=300, seed=4)
    for c, result in enumerate(results):
        sums: dict[str, list[float]] = {}
        for e, g, name in zip(effects[c].tolist(), gaps.tolist(), CATEGORIES, strict=True):
            acc = sums.setdefault(name, [0.0, 0.0, 0])
            acc[0] += e
            acc[1] += g
            acc[2] += 1
        assert set(result.by_category) == set(sums)
        for name, (e_sum, g_sum, count) in sums.items():
            cat = result.by_category[name]
            assert isinstance(cat, CategoryShare)
            assert cat.n_pairs == count
            assert math.isclose(cat.share, e_sum / g_sum, rel_tol=1e-12)
            if count < 2:
                assert cat.ci_low is None and cat.ci_high is None
            else:
                idx = [i for i, x in enumerate(CATEGORIES) if x == name]
                ref = share_intervals(effects[c : c + 1, idx], gaps[idx], n_resamples=300, seed=4)
                assert math.isclose(cat.ci_low, float(ref.low[0]), rel_tol=1e-9)
                assert math.isclose(cat.ci_high, float(ref.high[0]), rel_tol=1e-9)
                assert cat.ci_low <= cat.share <= cat.ci_high
    assert results[0].by_category["fraud"].n_pairs == 1  # the single-pair category has no CI (checked above)


def test_one_pair_carrying_everything_is_concentrated():
    n = 12
    gaps = np.ones(n)
    spike = np.zeros(n)
    spike[7] = 5.0
    result = share_heterogeneity(spike[None, :], gaps, ["a"] * n, n_resamples=200)[0]
    assert result.share == 5.0 / 12
    assert result.loo_min == 0.0  # leaving out pair 7 leaves no effect at all
    assert result.largest_pair_index == 7 and result.largest_pair_fraction == 1.0
    assert result.concentrated


def test_majority_pair_and_sign_reversal_are_each_enough_to_flag():
    n = 10
    gaps = np.ones(n)
    # One pair carries 2 / 2.9 = 69% of the net effect, but every leave-one-out share stays positive.
    majority = np.array([0.1] * 9 + [2.0])
    # Net effect 0.5; leaving out the first pair gives share -2.5/9: the sign depends on one pair.
    reversal = np.array([3.0, -1.0, -1.0, -0.5] + [0.0] * 6)
    first, second = share_heterogeneity(np.vstack([majority, reversal]), gaps, ["a"] * n, n_resamples=200)
    assert first.loo_min > 0 and math.isclose(first.largest_pair_fraction, 2.0 / 2.9, rel_tol=1e-12)
    assert first.concentrated
    assert second.loo_min < 0 < second.share
    assert second.concentrated


def test_homogeneous_effects_are_not_concentrated():
    rng = np.random.default_rng(5)
    n = 40
    gaps = rng.gamma(4.0, 0.5, n)
    effects = 0.4 * gaps + rng.normal(0, 0.05, (3, n))
    effects[2] *= -1  # a homogeneous negative share is not concentrated either
    for result in share_heterogeneity(effects, gaps, ["a", "b", "c", "d"] * 10, n_resamples=200):
        assert not result.concentrated
        assert result.largest_pair_fraction < 0.1
        assert result.loo_min * result.loo_max > 0


def test_undefined_values_are_none_and_results_serialise_to_strict_json():
    gaps = np.array([1.0, -1.0, 2.0, 0.0, 1.5])
    effects = np.array([[0.5, 0.2, 1.0, 0.3, 0.4], [0.0] * 5])
    categories = ["zero-gap", "zero-gap", "b", "b", "c"]
    results = share_heterogeneity(effects, gaps, categories, n_resamples=200)
    moving, still = results
    # The "zero-gap" category's gaps sum to 0: no share, no CI.
    assert moving.by_category["zero-gap"] == CategoryShare(n_pairs=2, share=None, ci_low=None, ci_high=None)
    assert moving.by_category["c"].ci_low is None and moving.by_category["c"].ci_high is None  # one pair
    # Category "b" has gaps (2, 0): its mean gap is not shown to be above 0, so it has no share (a ratio over a sum
    # that may be 0), and no interval.
    assert moving.by_category["b"] == CategoryShare(n_pairs=2, share=None, ci_low=None, ci_high=None)
    # Per-pair ratios skip the pair with gap 0.
    ratios = [0.5 / 1.0, 0.2 / -1.0, 1.0 / 2.0, 0.4 / 1.5]
    deciles = statistics.quantiles(ratios, n=10, method="inclusive")
    assert np.allclose(moving.ratio_quantiles, (deciles[0], deciles[4], deciles[8]), rtol=1e-12)
    # An all-zero row: share 0 with no net effect to apportion, nothing concentrated.
    assert still.share == 0.0 and still.largest_pair_fraction is None and still.largest_pair_index is None
    assert not still.concentrated
    for result in results:
        json.dumps(dataclasses.asdict(result), allow_nan=False)
    # Gaps summing to zero overall leave the full share undefined.
    flat = share_heterogeneity(np.array([[1.0, 2.0]]), np.array([1.0, -1.0]), ["a", "a"], n_resamples=50)[0]
    assert flat.share is None and flat.by_category["a"].share is None


def test_a_category_whose_gap_is_not_above_zero_has_no_share():
    """A category's gaps near 0 (sum 0.2 here) would make its share a ratio over almost nothing, thousands and moved by
    rounding: undefined unless the bootstrap interval of the category's mean gap lies above 0."""
    gaps = np.array([3.0, 2.5, 3.5, 2.8, 0.1, -0.2, 0.15, 0.15])
    effects = 0.5 * gaps[None, :] + np.array([[0.1, -0.1, 0.05, 0.0, 0.3, -0.2, 0.1, 0.2]])
    (result,) = share_heterogeneity(effects, gaps, ["up"] * 4 + ["near0"] * 4, n_resamples=500)
    up = result.by_category["up"]
    assert up.share == pytest.approx(effects[0, :4].sum() / gaps[:4].sum()) and up.ci_low < up.share < up.ci_high
    assert result.by_category["near0"] == CategoryShare(n_pairs=4, share=None, ci_low=None, ci_high=None)
    assert result.share == pytest.approx(effects.sum() / gaps.sum())
