"""Sign-flip permutation test against naive enumeration, and its error rates / power in simulation."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from refusal_eval import stats as stats_module
from refusal_eval.stats import PermutationResult, sign_flip_test


def naive_exact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marginal and max-T p-values by looping over every sign vector (float arithmetic, continuous data)."""
    values = np.atleast_2d(values)
    n_rows, n = values.shape
    z_obs = [abs(sum(row)) / math.sqrt(sum(v * v for v in row)) for row in values.tolist()]
    hits = [0] * n_rows
    hits_fw = [0] * n_rows
    total = 0
    for signs in itertools.product((1.0, -1.0), repeat=n):
        z = [abs(sum(s * v for s, v in zip(signs, row, strict=True))) / math.sqrt(sum(v * v for v in row))
             for row in values.tolist()]
        top = max(z)
        for c in range(n_rows):
            hits[c] += z[c] >= z_obs[c] - 1e-9
            hits_fw[c] += top >= z_obs[c] - 1e-9
        total += 1
    return np.array(hits) / total, np.array(hits_fw) / total


def naive_exact_rational(rows: list[list[int]]) -> tuple[list[Fraction], list[Fraction]]:
    """Same, in exact rational arithmetic on integer data (compares z^2 = (s.v)^2 / |v|^2): ties are exact."""
    n = len(rows[0])
    z2_obs = [Fraction(sum(r) ** 2, sum(v * v for v in r)) for r in rows]
    hits = [0] * len(rows)
    hits_fw = [0] * len(rows)
    for signs in itertools.product((1, -1), repeat=n):
        z2 = [Fraction(sum(s * v for s, v in zip(signs, r, strict=True)) ** 2, sum(v * v for v in r)) for r in rows]
        top = max(z2)
        for c in range(len(rows)):
            hits[c] += z2[c] >= z2_obs[c]
            hits_fw[c] += top >= z2_obs[c]
    total = 2**n
    return [Fraction(h, total) for h in hits], [Fraction(h, total) for h in hits_fw]


def test_exact_enumeration_matches_naive_loop_over_all_sign_vectors():
    rng = np.random.default_rng(3)
    values = rng.normal(0.4, 1.0, (5, 6))
    values[1] = rng.standard_t(3, 6) + 2.0  # a strongly shifted row
    result = sign_flip_test(values, n_permutations=10_000, seed=1)
    assert isinstance(result, PermutationResult)
    assert result.exact and result.n_permutations == 64
    p, p_fw = naive_exact(values)
    np.testing.assert_allclose(result.p, p, rtol=0, atol=1e-15)
    np.testing.assert_allclose(result.p_familywise, p_fw, rtol=0, atol=1e-15)
    for c in range(values.shape[0]):
        assert math.isclose(result.statistic[c], abs(values[c].sum()) / np.linalg.norm(values[c]), rel_tol=1e-12)


def test_exact_enumeration_counts_ties_exactly_on_integer_data():
    # Integer rows with many equal |values|: most sign vectors tie with others; floating rounding must not drop them.
    rows = [[1, 1, 1, -1, 1, 1], [3, -1, 2, 2, -3, 1], [2, 2, 2, 2, 2, 2], [1, -1, 1, -1, 1, -1], [5, 1, 1, 1, 1, 1]]
    result = sign_flip_test(np.array(rows, dtype=np.float64), n_permutations=64)
    assert result.exact
    p, p_fw = naive_exact_rational(rows)
    assert [Fraction(x).limit_denominator(64) for x in result.p] == p
    assert [Fraction(x).limit_denominator(64) for x in result.p_familywise] == p_fw
    # Row [1,-1,1,-1,1,-1] sums to 0: every sign vector is at least as extreme.
    assert result.p[3] == 1.0


def test_monte_carlo_p_values_approach_exact_ones():
    rng = np.random.default_rng(11)
    values = rng.normal(0.5, 1.0, (6, 10))
    exact_p, exact_fw = naive_exact(values)
    # N=10 has 1024 sign vectors; asking for fewer forces Monte Carlo.
    mc = sign_flip_test(values, n_permutations=1000, seed=5)
    assert not mc.exact and mc.n_permutations == 1000
    tol = 4 * np.sqrt(exact_p * (1 - exact_p) / 1000) + 2 / 1001  # 4 binomial SDs + the +1 correction
    assert np.all(np.abs(mc.p - exact_p) <= np.maximum(tol, 0.02))
    # With more draws (N=13: 8192 sign vectors, B=8000) the agreement is within 0.02 for every row.
    values = rng.normal(0.3, 1.0, (6, 13))
    mc = sign_flip_test(values, n_permutations=8000, seed=2)
    exact = sign_flip_test(values, n_permutations=8192)
    assert exact.exact and not mc.exact
    exact_p, exact_fw = naive_exact(values)
    np.testing.assert_allclose(exact.p, exact_p, atol=1e-15)
    np.testing.assert_allclose(exact.p_familywise, exact_fw, atol=1e-15)
    assert np.max(np.abs(mc.p - exact_p)) < 0.02
    assert np.max(np.abs(mc.p_familywise - exact_fw)) < 0.02


def null_rows(rng: np.random.Generator, kind: str, size: tuple[int, ...]) -> np.ndarray:
    return rng.normal(0.0, 1.0, size) if kind == "normal" else rng.standard_t(3, size)


@pytest.mark.parametrize("kind", ["normal", "t3"])
def test_marginal_false_positive_rate_is_nominal_under_symmetric_null(kind):
    # 500 independent null datasets of N=20 pairs. Observed fraction with p < 0.05 (seeded, deterministic):
    # normal 0.052, Student-t(3) 0.062 (with 4000 datasets each: 0.043 and 0.054). Binomial SD at 0.05 is ~0.0097,
    # so [0.02, 0.08] is a ±3 SD band.
    rng = np.random.default_rng(100 if kind == "normal" else 200)
    rejections = 0
    for k in range(500):
        result = sign_flip_test(null_rows(rng, kind, (20,)), n_permutations=999, seed=k)
        assert not result.exact
        rejections += bool(result.p[0] < 0.05)
    rate = rejections / 500
    assert 0.02 <= rate <= 0.08, rate


def test_familywise_error_rate_is_controlled_over_50_null_rows():
    # 200 datasets of C=50 independent null rows, N=20. Observed (seeded): any p_fw < 0.05 in 0.040 of datasets
    # (0.039 of 1000 normal datasets in a longer run), whereas uncorrected p < 0.05 somewhere in 0.93 of them
    # (1 - 0.95^50 = 0.92 expected).
    rng = np.random.default_rng(7)
    any_fw = any_marginal = 0
    for k in range(200):
        values = null_rows(rng, "normal" if k % 2 else "t3", (50, 20))
        result = sign_flip_test(values, n_permutations=999, seed=k)
        any_fw += bool(np.any(result.p_familywise < 0.05))
        any_marginal += bool(np.any(result.p < 0.05))
    assert any_fw / 200 <= 0.08, any_fw / 200
    assert any_marginal / 200 >= 0.8, any_marginal / 200  # the correction is what keeps the family-wise rate down


def test_power_against_a_unit_shift_matches_the_t_test():
    # z = sqrt(N)|t| / sqrt(N - 1 + t^2) is monotone in the one-sample t statistic, so the sign-flip test should
    # have the power of the t-test: for a shift of 1 SD with N=20 at alpha=0.01 that is 0.932 (noncentral t), not 1.
    # Observed (seeded): 0.9225 of 400 shifted rows have p < 0.01 (binomial SD ~0.013).
    n = 20
    rng = np.random.default_rng(21)
    values = rng.normal(1.0, 1.0, (400, n))
    result = sign_flip_test(values, n_permutations=10_000, seed=0)
    t = stats.ttest_1samp(values, 0.0, axis=1).statistic
    np.testing.assert_allclose(result.statistic, np.sqrt(n) * np.abs(t) / np.sqrt(n - 1 + t**2), rtol=1e-12)
    critical = stats.t.ppf(0.995, n - 1)
    power = stats.nct.sf(critical, n - 1, np.sqrt(n)) + stats.nct.cdf(-critical, n - 1, np.sqrt(n))
    assert abs(np.mean(result.p < 0.01) - power) < 0.05
    assert np.mean(result.p < 0.01) > 0.85
    # A 2 SD shift (t-test power ~1 - 1e-6) is detected in every row, also family-wise over 50 rows.
    strong = sign_flip_test(rng.normal(2.0, 1.0, (50, n)), n_permutations=10_000, seed=0)
    assert np.all(strong.p < 0.01)
    assert np.all(strong.p_familywise < 0.01)


def test_all_zero_rows_have_p_one_and_do_not_change_other_rows():
    rng = np.random.default_rng(4)
    values = rng.normal(0.3, 1.0, (8, 20))
    base = sign_flip_test(values, n_permutations=2000, seed=9)
    padded = np.vstack([np.zeros((3, 20)), values, np.zeros((2, 20))])
    result = sign_flip_test(padded, n_permutations=2000, seed=9)
    zero = [0, 1, 2, 11, 12]
    assert np.all(result.statistic[zero] == 0.0)
    assert np.all(result.p[zero] == 1.0) and np.all(result.p_familywise[zero] == 1.0)
    np.testing.assert_array_equal(result.p[3:11], base.p)
    np.testing.assert_array_equal(result.p_familywise[3:11], base.p_familywise)
    # All rows zero, exact and Monte Carlo.
    for n in (5, 20):
        everything_zero = sign_flip_test(np.zeros((4, n)), n_permutations=1000)
        assert np.all(everything_zero.p == 1.0) and np.all(everything_zero.p_familywise == 1.0)


@pytest.mark.parametrize("n", [9, 25])  # exact (512 <= 1500) and Monte Carlo
def test_results_do_not_depend_on_chunk_size(monkeypatch, n):
    rng = np.random.default_rng(8)
    values = rng.normal(0.2, 1.0, (7, n))
    reference = sign_flip_test(values, n_permutations=1500, seed=3)
    assert reference.exact == (n == 9)
    for elements in (1, 7 * 13, 7 * 500, 10**9):  # 1, 13, 500 and all sign vectors per chunk
        monkeypatch.setattr(stats_module, "_CHUNK_ELEMENTS", elements)
        result = sign_flip_test(values, n_permutations=1500, seed=3)
        np.testing.assert_array_equal(result.p, reference.p)
        np.testing.assert_array_equal(result.p_familywise, reference.p_familywise)
        np.testing.assert_array_equal(result.statistic, reference.statistic)
    other_seed = sign_flip_test(values, n_permutations=1500, seed=4)
    assert n == 9 or not np.array_equal(other_seed.p, reference.p)


def test_minimum_p_values_with_all_positive_values():
    rng = np.random.default_rng(0)
    mc = sign_flip_test(rng.uniform(0.5, 2.0, (3, 30)), n_permutations=999, seed=0)
    assert not mc.exact
    np.testing.assert_array_equal(mc.p, np.full(3, 1 / 1000))
    np.testing.assert_array_equal(mc.p_familywise, np.full(3, 1 / 1000))
    exact = sign_flip_test(rng.uniform(0.5, 2.0, (3, 8)), n_permutations=10_000)
    assert exact.exact and exact.n_permutations == 256
    # Only the all-plus and all-minus sign vectors reach the observed |sum|.
    np.testing.assert_array_equal(exact.p, np.full(3, 2 / 256))
    np.testing.assert_array_equal(exact.p_familywise, np.full(3, 2 / 256))


def test_one_dimensional_input_is_one_row_and_bad_input_is_rejected():
    values = np.array([0.5, 1.0, -0.2, 0.8, 0.3, 1.1])
    one = sign_flip_test(values)
    two = sign_flip_test(values[None, :])
    assert one.p.shape == (1,)
    np.testing.assert_array_equal(one.p, two.p)
    with pytest.raises(ValueError):
        sign_flip_test(np.array([1.0, np.nan]))
    with pytest.raises(ValueError):
        sign_flip_test(values, n_permutations=0)
