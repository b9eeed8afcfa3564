"""Statistics over pairs: ratio-of-sums shares with bootstrap CIs, gap CIs and Wilson rate intervals."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.stats import mstats


@dataclass
class Interval:
    """Point estimate with a confidence interval (arrays when vectorised over components).

    ``fw_low``/``fw_high``: family-wise (simultaneous) interval over all components of the call, when
    computed: every true share lies inside its family-wise interval with probability ``level`` jointly.
    """

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    fw_low: np.ndarray | None = None
    fw_high: np.ndarray | None = None


# What float rounding could move, so that no verdict depends on it (another CPU, thread count or batch layout moves
# effects by about one identity-patch noise floor). Fixed in advance, never fitted to a model:
# - NOISE_MARGIN: rounding is taken to reach 10 times the audit's largest measured noise floor;
# - NEGLIGIBLE: a component that moves no pair's score by more than 0.1% of the mean |gap| (share at most 0.001)
#   is negligible: never significant and outside every family-wise maximum;
# - NUMERIC_ZERO: the floor assumed where none was measured (float32 keeps about 7 digits).
NOISE_MARGIN = 10.0
NEGLIGIBLE = 1e-3
NUMERIC_ZERO = 1e-6
# Largest resample batch, in count-matrix entries (resamples x pairs): 2**24 float64s = 128 MiB.
_BATCH_ELEMENTS = 2**24


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """Resample index arrays [..., m] -> how often each pair was drawn [..., n] (float64)."""
    flat = indices.reshape(-1, indices.shape[-1])
    counts = np.zeros((flat.shape[0], n))
    np.add.at(counts, (np.arange(flat.shape[0])[:, None], flat), 1.0)
    return counts.reshape(*indices.shape[:-1], n)


def ratio_of_sums(effects: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """share = sum_i effect_i / sum_i gap_i, for effects [C, N] and gaps [N] -> [C].

    A NaN effect means the component was not patched on that pair (all-position patches need sides of equal
    token length): that pair then counts in neither the component's effect sum nor its gap sum.
    """
    patched = np.isfinite(effects)
    if patched.all():
        return effects.sum(axis=-1) / gaps.sum()
    return np.where(patched, effects, 0.0).sum(axis=-1) / (patched * gaps).sum(axis=-1)


@dataclass(frozen=True)
class Resolution:
    """The audit's resolution: ``effect`` (score units), the largest per-pair score change that counts as
    negligible; ``share`` (share units), the margin by which a family-wise interval must clear 0 to count."""

    effect: float
    share: float


def resolution(gaps: np.ndarray, floor_max: float | None) -> Resolution:
    """:class:`Resolution` from the pairs' gaps and the largest measured noise floor (None: not measured).

    ``effect`` = max(NOISE_MARGIN × floor, NEGLIGIBLE × mean |gap|), ``share`` = NOISE_MARGIN × floor / mean |gap|.
    Perturbing every effect by a few floors then leaves every decision that uses them unchanged, unless a quantity
    lies within those few floors of its threshold."""
    gaps = np.asarray(gaps, dtype=np.float64)
    scale = float(np.abs(gaps).mean()) if gaps.size else 0.0
    noise = NOISE_MARGIN * (NUMERIC_ZERO * scale if floor_max is None else float(floor_max))
    return Resolution(effect=max(noise, NEGLIGIBLE * scale), share=noise / scale if scale > 0 else 0.0)

def beyond_noise(effects: np.ndarray, tolerance: float) -> np.ndarray:
    """[C] rows that move some pair's score by more than ``tolerance`` (NaN: not patched on that pair)."""
    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    return np.abs(np.where(np.isfinite(effects), effects, 0.0)).max(axis=1, initial=0.0) > tolerance


def varies_beyond_noise(effects: np.ndarray, gaps: np.ndarray, tolerance: float) -> np.ndarray:
    """[C] rows whose effects depart from their own constant share (e_i = s·g_i) by more than ``tolerance`` on some
    pair. Resamples of any other row give the same ratio of sums up to rounding (zero effects, or a patch of the
    whole input with share 1 on every pair): their studentised bootstrap values are rounding noise, so they must
    stay out of a max-t quantile."""
    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    gaps = np.asarray(gaps, dtype=np.float64)
    share = ratio_of_sums(effects, gaps)
    with np.errstate(invalid="ignore"):
        residual = effects - np.where(np.isfinite(share), share, 0.0)[:, None] * gaps[None, :]
    return np.abs(np.where(np.isfinite(residual), residual, 0.0)).max(axis=1, initial=0.0) > tolerance


def expanded_level(level: float, n: int) -> float:
    """Confidence level to ask the bootstrap for so that its interval has nominal ``level`` coverage.

    Bootstrap intervals are too narrow in small samples (they use the plug-in variance, divisor n, and
    normal rather than t quantiles). Hesterberg's expansion widens them to match a t interval:
    the z-quantile becomes sqrt(n / (n - 1)) * t_{n-1} quantile.
    """
    if n < 3:
        return level
    z = np.sqrt(n / (n - 1)) * stats.t.ppf(0.5 + level / 2, df=n - 1)
    return float(1 - 2 * stats.norm.sf(z))


def share_intervals(
    effects: np.ndarray,
    gaps: np.ndarray,
    level: float = 0.95,
    n_resamples: int = 2000,
    method: str = "BCa",
    seed: int = 0,
    expand: bool = True,
    outside_family: np.ndarray | None = None,
    tolerance: float | None = None,
) -> Interval:
    """Bootstrap (over pairs) CIs for ratio-of-sums shares of many components at once.

    Pairs are resampled with replacement; each resample recomputes sum(effect)/sum(gap) for every
    component from the same drawn pairs (scipy.stats.bootstrap on pair indices, vectorised through a
    count matrix so memory is components x batch, not components x batch x pairs). With ``expand`` the
    level passed to scipy is :func:`expanded_level` (small-sample correction; see benchmarks/coverage.py).
    NaN effects mark pairs a component was not patched on (see :func:`ratio_of_sums`); each component's
    resampled share then sums only its own pairs' effects and gaps, and ``expand`` uses the fewest pairs.

    Every interval holds its estimate, and the family-wise band ``fw_low``/``fw_high`` (max-t over the
    components) always holds the marginal interval: a simultaneous band is never narrower. Components flagged in
    ``outside_family`` (negligible effects), and those whose effects never depart from a constant share by more
    than ``tolerance`` (:func:`varies_beyond_noise`; the audit's :attr:`Resolution.effect`, by default rounding:
    ``NUMERIC_ZERO`` times the mean |gap|),
    have studentised resamples of rounding noise: they stay out of the max-t quantile so they cannot move the other
    components' bands, and their band is their marginal interval.
    """
    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    gaps = np.asarray(gaps, dtype=np.float64)
    n = gaps.shape[0]
    if effects.shape[1] != n:
        raise ValueError(f"effects have {effects.shape[1]} pairs, gaps have {n}")
    estimate = ratio_of_sums(effects, gaps)
    patched = np.isfinite(effects)
    masked = not patched.all()
    effects = np.where(patched, effects, 0.0)
    low = np.full(effects.shape[0], np.nan)
    high = np.full(effects.shape[0], np.nan)
    fw_low, fw_high = estimate.copy(), estimate.copy()
    # A component that never moves the score has share exactly 0 in every resample.
    constant = np.all(effects == 0.0, axis=1)
    low[constant] = high[constant] = 0.0
    todo = np.flatnonzero(~constant)
    if masked and todo.size:
        n_min = int(patched[todo].sum(axis=1).min())
        level_asked = expanded_level(level, n_min) if expand else level
    else:
        level_asked = expanded_level(level, n) if expand else level
    if todo.size and n >= 2:
        sub = effects[todo]
        sub_gaps = (patched[todo] * gaps).T if masked else gaps  # [n, C] per-component gap columns, or [n]

        sum_e, sum_g = sub.sum(axis=1), (sub_gaps.sum(axis=0) if masked else gaps.sum())

        def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            idx = np.asarray(idx)
            if idx.shape[-1] == n - 1:
                # scipy's BCa jackknife: every pair but one. Closed form (S - e_i) / (G - g_i), O(n C) in all,
                # instead of n count vectors of length n (O(n^2 C) time, n^2 memory).
                out = n * (n - 1) // 2 - idx.sum(axis=-1)  # the left-out pair of each row
                left = sub_gaps[out] if masked else gaps[out][..., None]
                return np.moveaxis((sum_e - sub.T[out]) / (sum_g - left), -1, 0)
            w = _counts(idx, n)  # [..., n]
            denominator = (w @ sub_gaps) if masked else (w @ gaps)[..., None]
            return np.moveaxis((w @ sub.T) / denominator, -1, 0)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate resamples surface as NaN, handled below
            result = stats.bootstrap(
                (np.arange(n),),
                statistic,
                n_resamples=n_resamples,
                batch=max(1, min(n_resamples, 2_000_000 // max(1, todo.size), _BATCH_ELEMENTS // n)),
                vectorized=True,
                confidence_level=level_asked,
                method=method,
                rng=np.random.default_rng(seed),
            )
        lo, hi = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
        bad = ~(np.isfinite(lo) & np.isfinite(hi))
        if bad.any() and method.lower() == "bca":
            # BCa is undefined when the jackknife has no spread; the percentile interval still is.
            dist = np.atleast_2d(result.bootstrap_distribution)[bad]
            tail = (1 - level_asked) / 2
            lo[bad] = np.quantile(dist, tail, axis=-1)
            hi[bad] = np.quantile(dist, 1 - tail, axis=-1)
        low[todo], high[todo] = lo, hi
        dist = np.atleast_2d(result.bootstrap_distribution)
        family = np.ones(todo.size, dtype=bool) if outside_family is None else ~np.asarray(outside_family)[todo]
        if tolerance is None:
            tolerance = NUMERIC_ZERO * float(np.abs(gaps).mean())
        family &= varies_beyond_noise(np.where(patched[todo], sub, np.nan), gaps, tolerance)
        if family.any():
            fw_low[todo[family]], fw_high[todo[family]] = _max_t_band(estimate[todo[family]], dist[family], level)
        fw_low[todo[~family]], fw_high[todo[~family]] = low[todo[~family]], high[todo[~family]]
    defined = np.isfinite(low) & np.isfinite(high)
    low[defined] = np.minimum(low[defined], estimate[defined])
    high[defined] = np.maximum(high[defined], estimate[defined])
    fw_low[defined] = np.minimum(fw_low[defined], low[defined])
    fw_high[defined] = np.maximum(fw_high[defined], high[defined])
    return Interval(estimate, low, high, fw_low, fw_high)


def _max_t_band(estimate: np.ndarray, dist: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous intervals estimate ± q·se from the bootstrap distribution [C, B] of C statistics.

    q is the ``level`` quantile (Harrell-Davis) of max_c |T*_c − T̂_c| / se_c over resamples (the max-t method): the band
    covers all C true values at once with probability ``level``, under the bootstrap approximation.
    """
    se = dist.std(axis=1, ddof=1)
    spread = se > 0
    if not spread.any():
        return estimate.copy(), estimate.copy()
    t = np.abs(dist[spread] - estimate[spread, None]) / se[spread, None]
    # Harrell-Davis: a weighted mean of every order statistic, so a small move of the resampled maxima moves q a little
    # (one order statistic can jump when the maximum is held by a component with few pairs carrying its effect).
    q = float(mstats.hdquantiles(t.max(axis=0), [level])[0])
    half = np.where(spread, q * se, 0.0)
    return estimate - half, estimate + half


def mean_interval(
    values: np.ndarray, level: float = 0.95, n_resamples: int = 2000, method: str = "BCa", seed: int = 0
) -> Interval:
    """Bootstrap CI of the mean of per-pair values (used for the harmful-benign gap).

    The mean is the ratio of sums sum(v) / sum(1), so this is :func:`share_intervals` with unit denominators (the
    same resamples as ``scipy.stats.bootstrap((values,), np.mean)``, with its jackknife in closed form)."""
    values = np.asarray(values, dtype=np.float64)
    estimate = np.asarray(values.mean())
    if values.size < 2 or np.all(values == values[0]):
        return Interval(estimate, estimate.copy(), estimate.copy())
    iv = share_intervals(values[None, :], np.ones(values.size), level, n_resamples, method, seed, expand=False)
    return Interval(estimate, np.asarray(iv.low[0]), np.asarray(iv.high[0]))


def wilson_interval(successes: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (scipy.stats.binomtest)."""
    if total == 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(successes, total).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


# --- Does the score track the model's refusals? -------------------------------------------------------------------

# Fixed before any organism or model was audited with it (issue 24): a score whose AUROC interval lies wholly below
# this does not track the model's refusals, and its shares are undefined.
MIN_SCORE_AUROC = 0.75


@dataclass
class AurocResult:
    """How well per-prompt scores rank refused prompts above answered ones (None where undefined)."""

    auroc: float | None
    ci_low: float | None
    ci_high: float | None
    point_biserial: float | None
    p_point_biserial: float | None
    n_refused: int
    n_answered: int


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half: the Mann-Whitney U over n1·n0."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def score_auroc(scores: np.ndarray, refused: np.ndarray, groups: np.ndarray, level: float = 0.95,
                n_resamples: int = 2000, seed: int = 0) -> AurocResult:
    """AUROC of the scores as a predictor of the refusal verdicts, with a percentile bootstrap CI that resamples
    ``groups`` (pairs: both prompts of a pair are drawn together), and the point-biserial correlation
    (``scipy.stats.pointbiserialr``). Undefined (None) when every prompt has the same verdict; resamples with one
    verdict only are left out of the interval."""
    scores, refused = np.asarray(scores, dtype=np.float64), np.asarray(refused, dtype=bool)
    groups = np.asarray(groups)
    n1, n0 = int(refused.sum()), int((~refused).sum())
    if n1 == 0 or n0 == 0:
        return AurocResult(None, None, None, None, None, n1, n0)
    labels, index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(index == k) for k in range(labels.size)]

    def statistic(idx: np.ndarray) -> float:
        rows = np.concatenate([members[k] for k in np.asarray(idx, dtype=np.int64)])
        return auroc(scores[rows], refused[rows])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples with one verdict only are NaN, left out below
        result = stats.bootstrap((np.arange(labels.size),), statistic, n_resamples=n_resamples, vectorized=False,
                                 method="percentile", confidence_level=level, rng=np.random.default_rng(seed))
    values = np.asarray(result.bootstrap_distribution, dtype=np.float64)
    values = values[np.isfinite(values)]
    tail = (1 - level) / 2
    point = auroc(scores, refused)
    low, high = (np.quantile(values, [tail, 1 - tail]) if values.size else (point, point))
    if np.ptp(scores) > 0:
        r, p = stats.pointbiserialr(refused.astype(float), scores)
        r, p = float(r), float(p)
    else:
        r = p = None
    return AurocResult(point, float(min(low, point)), float(max(high, point)), r, p, n1, n0)


# --- Sign-flip permutation test -------------------------------------------------------------------------------------

# Peak working set of the permutation test is about this many float64s (components x sign vectors per chunk):
# 2**25 * 8 bytes = 256 MiB. Tests lower it to check that chunking does not change results.
_CHUNK_ELEMENTS = 2**25
# Relative/absolute slack when counting z* >= z, so that the identity sign vector and exact ties always count even
# after floating-point rounding (|u @ s| and |u @ 1| can differ in the last bits for mathematically equal values).
_TIE_RTOL = 1e-12
_TIE_ATOL = 1e-12


@dataclass
class PermutationResult:
    """Sign-flip permutation test of C rows of paired values (one entry per row).

    ``statistic``: z_c = |sum_i v_ci| / sqrt(sum_i v_ci^2). ``p``: marginal two-sided p-value of each row.
    ``p_familywise``: Westfall-Young single-step max-T p-value, valid simultaneously over all C rows (reject rows
    with ``p_familywise < alpha`` to keep the family-wise error rate at alpha). ``n_permutations``: number of sign
    vectors actually used (2^N when ``exact``). ``exact``: all 2^N sign vectors were enumerated.
    """

    statistic: np.ndarray
    p: np.ndarray
    p_familywise: np.ndarray
    n_permutations: int
    exact: bool
    seed: int


def _sign_chunks(n: int, n_permutations: int, seed: int, chunk: int, exact: bool):
    """Yield float64 sign matrices [b, n] (entries +-1) covering all sign vectors of the test, ``chunk`` at a time.

    Monte Carlo signs come from one packed-bit draw made up front (B * ceil(N/8) bytes), so the vectors, and hence
    the p-values, do not depend on how they are chunked.
    """
    if exact:
        total = 2**n
        bits = np.arange(n, dtype=np.int64)
        for start in range(0, total, chunk):
            k = np.arange(start, min(start + chunk, total), dtype=np.int64)
            yield 1.0 - 2.0 * ((k[:, None] >> bits) & 1).astype(np.float64)
        return
    packed = np.random.default_rng(seed).integers(0, 256, size=(n_permutations, (n + 7) // 8), dtype=np.uint8)
    for start in range(0, n_permutations, chunk):
        bits = np.unpackbits(packed[start : start + chunk], axis=1, count=n)
        yield 1.0 - 2.0 * bits.astype(np.float64)


def sign_flip_test(values: np.ndarray, n_permutations: int = 10_000, seed: int = 0,
                   family: np.ndarray | None = None) -> PermutationResult:
    """Test whether each row of paired values [C, N] (or [N]) is centred away from zero, without normality.

    Under the null that a component does nothing, the harmful and benign labels within a pair are exchangeable;
    swapping them flips the sign of that pair's value. So the null distribution of the studentised statistic
    z_c = |sum_i s_i v_ci| / sqrt(sum_i v_ci^2) is obtained by random sign vectors s (the denominator is unchanged
    by sign flips, which makes rows comparable for the max-T family-wise correction). The same sign vectors are
    used for every row, so ``p_familywise`` (Westfall-Young single-step max-T) controls the family-wise error
    rate over the rows. When 2^N <= ``n_permutations`` all sign vectors are enumerated and p-values are exact.
    Rows that are identically zero get z = 0 and p = p_familywise = 1. ``family`` (a mask over rows, default all)
    limits the max-T to those rows: z is scale-free, so rows of rounding noise would enter the maximum as freely as
    real effects and move every family-wise p; rows outside the family get p_familywise = 1 (not tested).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2:
        raise ValueError(f"values must be [N] or [C, N], got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite")
    if n_permutations < 1:
        raise ValueError("n_permutations must be >= 1")
    n_rows, n = values.shape
    in_family = np.ones(n_rows, dtype=bool) if family is None else np.asarray(family, dtype=bool)
    norm = np.sqrt(np.einsum("ij,ij->i", values, values))
    nonzero = norm > 0
    unit = np.zeros_like(values)
    unit[nonzero] = values[nonzero] / norm[nonzero, None]  # zero rows stay 0: their z* is 0 for every s
    statistic = np.abs(unit.sum(axis=1))
    threshold = statistic * (1 - _TIE_RTOL) - _TIE_ATOL

    exact = n < 63 and 2**n <= n_permutations
    used = 2**n if exact else int(n_permutations)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_rows, n))
    count = np.zeros(n_rows, dtype=np.int64)
    maxima = np.empty(used)
    done = 0
    for signs in _sign_chunks(n, used, seed, chunk, exact):
        z = unit @ signs.T  # [C, b]
        np.abs(z, out=z)
        count += np.count_nonzero(z >= threshold[:, None], axis=1)
        if in_family.all():
            maxima[done : done + signs.shape[0]] = z.max(axis=0) if n_rows else 0.0
        else:
            maxima[done : done + signs.shape[0]] = z[in_family].max(axis=0) if in_family.any() else 0.0
        done += signs.shape[0]
        del z  # free this chunk before the next matmul allocates its own (peak stays one chunk)
    maxima.sort()
    count_fw = used - np.searchsorted(maxima, threshold, side="left")  # #{b: max_c z*_cb >= threshold_c}
    if exact:
        p, p_fw = count / used, count_fw / used
    else:
        p, p_fw = (1 + count) / (used + 1), (1 + count_fw) / (used + 1)
    p[~nonzero] = 1.0
    p_fw[~(nonzero & in_family)] = 1.0
    return PermutationResult(
        statistic=statistic, p=np.minimum(p, 1.0), p_familywise=np.minimum(p_fw, 1.0), n_permutations=used,
        exact=bool(exact), seed=int(seed),
    )


# --- Heterogeneity of shares across pairs and categories ------------------------------------------------------------


@dataclass
class CategoryShare:
    """Ratio-of-sums share within one category of pairs, with a bootstrap CI from :func:`share_intervals`.

    ``share`` is None when the category's gap is not separated from 0 (the bootstrap interval of its mean gap does
    not lie above 0; a single pair's gap must be above 0). ``ci_low``/``ci_high`` are both None when there is no
    interval: fewer than 2 pairs, no share, or an endpoint that is not finite (resamples whose gaps sum to 0).
    """

    n_pairs: int
    share: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass
class Heterogeneity:
    """How evenly one component's share is spread over pairs and categories (plain floats / None, JSON-ready).

    ``share``: the full ratio-of-sums share (None when the gaps sum to 0). ``by_category``: the share within each
    category. ``loo_min``/``loo_max``: smallest/largest share with one pair left out (None when no leave-one-out
    share is defined). ``largest_pair_fraction``: max_i e_i * sign(S) / |S| for the net effect S = sum_i e_i, i.e. the
    fraction of the net effect carried by the single pair contributing most in its direction (None when S = 0), at
    ``largest_pair_index``. ``ratio_quantiles``: 10%, 50%, 90% quantiles of the per-pair ratios e_i / g_i over pairs
    with g_i != 0 (None when there are none).
    """

    share: float | None
    by_category: dict[str, CategoryShare]
    loo_min: float | None
    loo_max: float | None
    largest_pair_fraction: float | None
    largest_pair_index: int | None
    ratio_quantiles: tuple[float, float, float] | None
    concentrated: bool


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _is_concentrated(
    share: float | None, loo_min: float | None, loo_max: float | None, largest_fraction: float | None
) -> bool:
    """True when a single pair can make or break the share.

    That is: (a) the full share is non-zero but leaving out one pair gives a share of the opposite sign or exactly 0
    (the leave-one-out range reaches across 0 while the full share does not), or (b) one pair carries more than half
    of the net effect (``largest_pair_fraction > 0.5``).
    """
    crosses = False
    if share is not None and loo_min is not None and loo_max is not None:
        crosses = (share > 0 and loo_min <= 0) or (share < 0 and loo_max >= 0)
    return bool(crosses or (largest_fraction is not None and largest_fraction > 0.5))


def share_heterogeneity(
    effects: np.ndarray,
    gaps: np.ndarray,
    categories: Sequence[str],
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> list[Heterogeneity]:
    """Per-component diagnostics that a share is not carried by one pair or one category (one entry per row).

    A ratio-of-sums share with a tight bootstrap CI can still come from a single outlier pair or a single category
    of prompts; leave-one-out shares, the largest single-pair fraction of the net effect, the spread of per-pair
    ratios and per-category shares (with :func:`share_intervals` CIs on that category's pairs) expose that. All
    leave-one-out shares are computed in closed form: (S - e_i) / (G - g_i).
    """
    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    gaps = np.asarray(gaps, dtype=np.float64)
    n_rows, n = effects.shape
    if gaps.shape != (n,):
        raise ValueError(f"effects have {n} pairs, gaps have shape {gaps.shape}")
    if len(categories) != n:
        raise ValueError(f"effects have {n} pairs, categories have {len(categories)}")
    labels = np.asarray([str(c) for c in categories], dtype=object)

    net = effects.sum(axis=1)  # [C]
    gap_sum = float(gaps.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        share = net / gap_sum if gap_sum != 0 else np.full(n_rows, np.nan)
        loo = (net[:, None] - effects) / (gap_sum - gaps)[None, :]  # [C, N]; inf/nan where G - g_i == 0
    loo[:, (gap_sum - gaps) == 0] = np.nan
    defined = np.isfinite(loo).any(axis=1) if n else np.zeros(n_rows, dtype=bool)
    loo_min = np.full(n_rows, np.nan)
    loo_max = np.full(n_rows, np.nan)
    if defined.any():
        loo_min[defined] = np.nanmin(loo[defined], axis=1)
        loo_max[defined] = np.nanmax(loo[defined], axis=1)

    direction = np.sign(net)
    directed = effects * direction[:, None]
    largest_index = directed.argmax(axis=1) if n else np.zeros(n_rows, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        largest_fraction = directed[np.arange(n_rows), largest_index] / np.abs(net) if n else np.full(n_rows, np.nan)

    has_gap = gaps != 0
    if has_gap.any():
        ratios = effects[:, has_gap] / gaps[has_gap]
        quantiles = np.quantile(ratios, [0.1, 0.5, 0.9], axis=1).T  # [C, 3]
    else:
        quantiles = None

    by_category: list[dict[str, CategoryShare]] = [{} for _ in range(n_rows)]
    for name in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == name)
        cat_effects, cat_gaps = effects[:, idx], gaps[idx]
        cat_gap_sum = float(cat_gaps.sum())
        # As for the whole audit, a share of a gap not shown to be above 0 would be noise (a ratio over a sum near 0:
        # thousands, and moved by float rounding): the category's share is defined only when the bootstrap interval
        # of its mean gap lies above 0.
        separated = cat_gap_sum != 0 and float(mean_interval(cat_gaps, level, n_resamples, seed=seed).low) > 0
        cat_share = cat_effects.sum(axis=1) / cat_gap_sum if separated else np.full(n_rows, np.nan)
        low = high = np.full(n_rows, np.nan)
        if idx.size >= 2 and separated:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # resamples of only zero-gap pairs are NaN
                ci = share_intervals(cat_effects, cat_gaps, level=level, n_resamples=n_resamples, seed=seed)
            low, high = np.asarray(ci.low, dtype=np.float64), np.asarray(ci.high, dtype=np.float64)
            half = ~(np.isfinite(low) & np.isfinite(high))
            low[half] = high[half] = np.nan  # an interval with one undefined end is reported as no interval
        for c in range(n_rows):
            by_category[c][name] = CategoryShare(
                n_pairs=int(idx.size), share=_finite_or_none(cat_share[c]), ci_low=_finite_or_none(low[c]),
                ci_high=_finite_or_none(high[c]),
            )

    results = []
    for c in range(n_rows):
        full = _finite_or_none(share[c])
        lo, hi = _finite_or_none(loo_min[c]), _finite_or_none(loo_max[c])
        fraction = _finite_or_none(largest_fraction[c]) if net[c] != 0 else None
        q = None if quantiles is None else (float(quantiles[c, 0]), float(quantiles[c, 1]), float(quantiles[c, 2]))
        results.append(
            Heterogeneity(
                share=full, by_category=by_category[c], loo_min=lo, loo_max=hi, largest_pair_fraction=fraction,
                largest_pair_index=int(largest_index[c]) if fraction is not None else None,
                ratio_quantiles=q,
                concentrated=_is_concentrated(full, lo, hi, fraction),
            )
        )
    return results


# -- comparisons of two audits (used by compare.py) ----------------------------------------------------


def _bootstrap_rows(data: tuple, statistic, n_rows: int, level: float, n_resamples: int, method: str,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scipy.stats.bootstrap of a vector statistic [n_rows]; BCa falls back to percentile where undefined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate rows surface as NaN, handled below
        result = stats.bootstrap(
            data, statistic, n_resamples=n_resamples, batch=max(1, min(n_resamples, 2_000_000 // max(1, n_rows))),
            vectorized=True, paired=False, confidence_level=level, method=method, rng=np.random.default_rng(seed),
        )
    low = np.atleast_1d(np.asarray(result.confidence_interval.low, dtype=np.float64)).copy()
    high = np.atleast_1d(np.asarray(result.confidence_interval.high, dtype=np.float64)).copy()
    dist = np.atleast_2d(result.bootstrap_distribution)
    bad = ~(np.isfinite(low) & np.isfinite(high))
    if bad.any():
        tail = (1 - level) / 2
        low[bad] = np.quantile(dist[bad], tail, axis=-1)
        high[bad] = np.quantile(dist[bad], 1 - tail, axis=-1)
    return low, high, dist


def share_difference_intervals(
    effects_a: np.ndarray, gaps_a: np.ndarray, effects_b: np.ndarray, gaps_b: np.ndarray, paired: bool,
    level: float = 0.95, n_resamples: int = 2000, method: str = "BCa", seed: int = 0,
    resolution_a: Resolution | None = None, resolution_b: Resolution | None = None,
) -> dict[str, np.ndarray]:
    """Shares in A and B and their difference B − A, with bootstrap CIs, for C components at once.

    effects_a [C, nA], gaps_a [nA], effects_b [C, nB], gaps_b [nB]. ``paired`` (nA == nB, same pairs in the
    same order): one draw of pair indices per resample serves A and B, as ``scipy.stats.bootstrap(...,
    paired=True)`` would; otherwise A's and B's pairs are drawn independently (two-sample bootstrap).
    Resampled indices become count weights (``_counts``), so each resample costs two matrix products.
    The max-t band is taken over the components whose effects vary beyond each side's :func:`resolution` in A or
    in B (:func:`varies_beyond_noise`; default: rounding only); the others' change is negligible in every resample
    and their band is their marginal interval, as in :func:`share_intervals`. Returns arrays keyed share_a,
    share_a_low, share_a_high, share_b*, diff, ci_low, ci_high, fw_low, fw_high and ``measured`` (the component
    moves some pair by more than its side's resolution in A or in B).
    """
    ea, eb = np.atleast_2d(np.asarray(effects_a, np.float64)), np.atleast_2d(np.asarray(effects_b, np.float64))
    ga, gb = np.asarray(gaps_a, np.float64), np.asarray(gaps_b, np.float64)
    na, nb = ga.shape[0], gb.shape[0]
    if ea.shape != (ea.shape[0], na) or eb.shape != (ea.shape[0], nb):
        raise ValueError(f"effects {ea.shape}/{eb.shape} do not match gaps ({na}, {nb})")
    if paired and na != nb:
        raise ValueError("a paired comparison needs the same pairs on both sides")
    # NaN effects: pairs a component was not patched on (mixed alignment); they count in neither its effect nor
    # its gap sums, so every component has its own gap columns.
    ma, mb = np.isfinite(ea), np.isfinite(eb)
    ea, eb = np.where(ma, ea, 0.0), np.where(mb, eb, 0.0)
    masked = not (ma.all() and mb.all())
    Ga, Gb = (ma * ga).T, (mb * gb).T  # [n, C]
    sa, sb = (ea.sum(1) / Ga.sum(0), eb.sum(1) / Gb.sum(0)) if masked else (ea.sum(1) / ga.sum(), eb.sum(1) / gb.sum())
    out = {"share_a": sa, "share_b": sb, "diff": sb - sa}
    for key in ("share_a", "share_b", "diff"):
        out[key + "_low"], out[key + "_high"] = out[key].copy(), out[key].copy()
    out["fw_low"], out["fw_high"] = out["diff"].copy(), out["diff"].copy()
    ta = NUMERIC_ZERO * float(np.abs(ga).mean()) if resolution_a is None else resolution_a.effect
    tb = NUMERIC_ZERO * float(np.abs(gb).mean()) if resolution_b is None else resolution_b.effect
    out["measured"] = beyond_noise(np.where(ma, ea, np.nan), ta) | beyond_noise(np.where(mb, eb, np.nan), tb)
    # Rows that cannot vary: a share whose effects are all 0 is 0 in every resample; with paired identical
    # inputs the difference is exactly 0 in every resample.
    va = np.flatnonzero(~np.all(ea == 0.0, axis=1))
    vb = np.flatnonzero(~np.all(eb == 0.0, axis=1))
    same = paired and np.array_equal(ga, gb) and np.array_equal(ma, mb)
    vd = np.flatnonzero(~(np.all(ea == eb, axis=1) if same else np.zeros(ea.shape[0], bool)) &
                        ~(np.all(ea == 0.0, axis=1) & np.all(eb == 0.0, axis=1)))
    if (min(na, nb) < 2) or not (va.size or vb.size or vd.size):
        return out
    A, B, Ad, Bd = ea[va].T, eb[vb].T, ea[vd].T, eb[vd].T

    def rows(wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
        if masked:
            da, db = (wa @ Ga[:, va], wb @ Gb[:, vb]), (wa @ Ga[:, vd], wb @ Gb[:, vd])
        else:
            one_a, one_b = (wa @ ga)[..., None], (wb @ gb)[..., None]
            da, db = (one_a, one_b), (one_a, one_b)
        stacked = np.concatenate([(wa @ A) / da[0], (wb @ B) / da[1], (wb @ Bd) / db[1] - (wa @ Ad) / db[0]],
                                 axis=-1)
        return np.moveaxis(stacked, -1, 0)

    if paired:
        def statistic(idx, axis=-1):
            w = _counts(np.asarray(idx), na)
            return rows(w, w)
        data: tuple = (np.arange(na),)
    else:
        def statistic(ia, ib, axis=-1):
            return rows(_counts(np.asarray(ia), na), _counts(np.asarray(ib), nb))
        data = (np.arange(na), np.arange(nb))
    n_rows = va.size + vb.size + vd.size
    low, high, dist = _bootstrap_rows(data, statistic, n_rows, level, n_resamples, method, seed)
    parts = np.cumsum([0, va.size, vb.size, vd.size])
    for key, index, k in (("share_a", va, 0), ("share_b", vb, 1), ("diff", vd, 2)):
        sl = slice(parts[k], parts[k + 1])
        out[key + "_low"][index], out[key + "_high"][index] = low[sl], high[sl]
    d_dist = dist[parts[2]:]
    family = (varies_beyond_noise(np.where(ma, ea, np.nan)[vd], ga, ta)
              | varies_beyond_noise(np.where(mb, eb, np.nan)[vd], gb, tb))
    if family.any():
        out["fw_low"][vd[family]], out["fw_high"][vd[family]] = _max_t_band(out["diff"][vd[family]], d_dist[family],
                                                                            level)
    rest = vd[~family]
    out["fw_low"][rest], out["fw_high"][rest] = out["diff_low"][rest], out["diff_high"][rest]
    # A simultaneous band is never narrower than the marginal interval, and both hold the estimate.
    out["fw_low"] = np.minimum(out["fw_low"], np.minimum(out["diff_low"], out["diff"]))
    out["fw_high"] = np.maximum(out["fw_high"], np.maximum(out["diff_high"], out["diff"]))
    return out


def newcombe_difference(s_a: int, n_a: int, s_b: int, n_b: int, level: float = 0.95) -> tuple[float, float, float]:
    """Rate difference B − A with Newcombe's hybrid-score (method 10) interval from two Wilson intervals."""
    if n_a == 0 or n_b == 0:
        return float("nan"), float("nan"), float("nan")
    pa, pb = s_a / n_a, s_b / n_b
    la, ua = wilson_interval(s_a, n_a, level)
    lb, ub = wilson_interval(s_b, n_b, level)
    d = pb - pa
    return d, d - float(np.hypot(pb - lb, ua - pa)), d + float(np.hypot(ub - pb, pa - la))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control over the family, any dependence): sorted
    ascending, the k-th smallest (k from 0) is multiplied by (m - k), made non-decreasing, capped at 1."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (len(p) - np.arange(len(p))) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def fisher_exact_2x2(successes_a: int, n_a: int, successes_b: int, n_b: int) -> float:
    """Two-sided Fisher exact p-value that two independent samples share one rate (``scipy.stats.fisher_exact``)."""
    table = [[successes_a, n_a - successes_a], [successes_b, n_b - successes_b]]
    return float(stats.fisher_exact(table).pvalue)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact McNemar test: two-sided binomial test of the discordant counts against 1/2."""
    if a_only + b_only == 0:
        return 1.0
    return float(stats.binomtest(b_only, a_only + b_only, 0.5).pvalue)


def two_sample_mean_difference(a: np.ndarray, b: np.ndarray, level: float, n_resamples: int, method: str,
                               seed: int) -> tuple[float, float]:
    """Bootstrap CI of mean(b) - mean(a) for independent samples (each resampled on its own); the point
    difference twice when either sample has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        d = float(np.mean(b) - np.mean(a))
        return d, d
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.bootstrap((a, b), lambda x, y, axis=-1: y.mean(axis) - x.mean(axis), n_resamples=n_resamples,
                                 confidence_level=level, method=method, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
