"""Statistics over pairs: ratio-of-sums shares with bootstrap CIs, gap CIs and Wilson rate intervals."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats


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


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """Resample index arrays [..., m] -> how often each pair was drawn [..., n] (float64)."""
    flat = indices.reshape(-1, indices.shape[-1])
    counts = np.zeros((flat.shape[0], n))
    np.add.at(counts, (np.arange(flat.shape[0])[:, None], flat), 1.0)
    return counts.reshape(*indices.shape[:-1], n)


def ratio_of_sums(effects: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """share = sum_i effect_i / sum_i gap_i, for effects [C, N] and gaps [N] -> [C]."""
    return effects.sum(axis=-1) / gaps.sum()


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
) -> Interval:
    """Bootstrap (over pairs) CIs for ratio-of-sums shares of many components at once.

    Pairs are resampled with replacement; each resample recomputes sum(effect)/sum(gap) for every
    component from the same drawn pairs (scipy.stats.bootstrap on pair indices, vectorised through a
    count matrix so memory is components x batch, not components x batch x pairs). With ``expand`` the
    level passed to scipy is :func:`expanded_level` (small-sample correction; see benchmarks/coverage.py).
    """
    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    gaps = np.asarray(gaps, dtype=np.float64)
    n = gaps.shape[0]
    if effects.shape[1] != n:
        raise ValueError(f"effects have {effects.shape[1]} pairs, gaps have {n}")
    estimate = ratio_of_sums(effects, gaps)
    low = np.full(effects.shape[0], np.nan)
    high = np.full(effects.shape[0], np.nan)
    fw_low, fw_high = estimate.copy(), estimate.copy()
    # A component that never moves the score has share exactly 0 in every resample.
    constant = np.all(effects == 0.0, axis=1)
    low[constant] = high[constant] = 0.0
    todo = np.flatnonzero(~constant)
    if todo.size and n >= 2:
        sub = effects[todo]

        def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            w = _counts(np.asarray(idx), n)  # [..., n]
            return np.moveaxis((w @ sub.T) / (w @ gaps)[..., None], -1, 0)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate resamples surface as NaN, handled below
            result = stats.bootstrap(
                (np.arange(n),),
                statistic,
                n_resamples=n_resamples,
                batch=max(1, min(n_resamples, 2_000_000 // max(1, todo.size))),
                vectorized=True,
                confidence_level=expanded_level(level, n) if expand else level,
                method=method,
                rng=np.random.default_rng(seed),
            )
        lo, hi = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
        bad = ~(np.isfinite(lo) & np.isfinite(hi))
        if bad.any() and method.lower() == "bca":
            # BCa is undefined when the jackknife has no spread; the percentile interval still is.
            dist = np.atleast_2d(result.bootstrap_distribution)[bad]
            tail = (1 - (expanded_level(level, n) if expand else level)) / 2
            lo[bad] = np.quantile(dist, tail, axis=-1)
            hi[bad] = np.quantile(dist, 1 - tail, axis=-1)
        low[todo], high[todo] = lo, hi
        fw_low[todo], fw_high[todo] = _max_t_band(estimate[todo], np.atleast_2d(result.bootstrap_distribution), level)
    return Interval(estimate, low, high, fw_low, fw_high)


def _max_t_band(estimate: np.ndarray, dist: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous intervals estimate ± q·se from the bootstrap distribution [C, B] of C statistics.

    q is the ``level`` quantile of max_c |T*_c − T̂_c| / se_c over resamples (the max-t method): the band
    covers all C true values at once with probability ``level``, under the bootstrap approximation.
    """
    se = dist.std(axis=1, ddof=1)
    spread = se > 0
    if not spread.any():
        return estimate.copy(), estimate.copy()
    t = np.abs(dist[spread] - estimate[spread, None]) / se[spread, None]
    q = float(np.quantile(t.max(axis=0), level))
    half = np.where(spread, q * se, 0.0)
    return estimate - half, estimate + half


def mean_interval(
    values: np.ndarray, level: float = 0.95, n_resamples: int = 2000, method: str = "BCa", seed: int = 0
) -> Interval:
    """Bootstrap CI of the mean of per-pair values (used for the harmful-benign gap)."""
    values = np.asarray(values, dtype=np.float64)
    estimate = np.asarray(values.mean())
    if values.size < 2 or np.all(values == values[0]):
        return Interval(estimate, estimate.copy(), estimate.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.bootstrap(
            (values,), np.mean, n_resamples=n_resamples, confidence_level=level, method=method,
            rng=np.random.default_rng(seed),
        )
    return Interval(estimate, np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high))


def wilson_interval(successes: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (scipy.stats.binomtest)."""
    if total == 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(successes, total).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)
