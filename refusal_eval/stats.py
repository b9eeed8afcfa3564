"""Statistics over pairs: ratio-of-sums shares with bootstrap CIs, gap CIs and Wilson rate intervals."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class Interval:
    """Point estimate with a confidence interval (arrays when vectorised over components)."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """Resample index arrays [..., m] -> how often each pair was drawn [..., n] (float64)."""
    flat = indices.reshape(-1, indices.shape[-1])
    counts = np.zeros((flat.shape[0], n))
    np.add.at(counts, (np.arange(flat.shape[0])[:, None], flat), 1.0)
    return counts.reshape(*indices.shape[:-1], n)


def ratio_of_sums(effects: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """share = sum_i effect_i / sum_i gap_i, for effects [C, N] and gaps [N] -> [C]."""
    return effects.sum(axis=-1) / gaps.sum()


def share_intervals(
    effects: np.ndarray,
    gaps: np.ndarray,
    level: float = 0.95,
    n_resamples: int = 2000,
    method: str = "BCa",
    seed: int = 0,
) -> Interval:
    """Bootstrap (over pairs) CIs for ratio-of-sums shares of many components at once.

    Pairs are resampled with replacement; each resample recomputes sum(effect)/sum(gap) for every
    component from the same drawn pairs (scipy.stats.bootstrap on pair indices, vectorised through a
    count matrix so memory is components x batch, not components x batch x pairs).
    """
    effects = np.atleast_2d(np.asarray(effects, dtype=np.float64))
    gaps = np.asarray(gaps, dtype=np.float64)
    n = gaps.shape[0]
    if effects.shape[1] != n:
        raise ValueError(f"effects have {effects.shape[1]} pairs, gaps have {n}")
    estimate = ratio_of_sums(effects, gaps)
    low = np.full(effects.shape[0], np.nan)
    high = np.full(effects.shape[0], np.nan)
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
                confidence_level=level,
                method=method,
                rng=np.random.default_rng(seed),
            )
        lo, hi = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
        bad = ~(np.isfinite(lo) & np.isfinite(hi))
        if bad.any() and method.lower() == "bca":
            # BCa is undefined when the jackknife has no spread; the percentile interval still is.
            dist = np.atleast_2d(result.bootstrap_distribution)[bad]
            tail = (1 - level) / 2
            lo[bad] = np.quantile(dist, tail, axis=-1)
            hi[bad] = np.quantile(dist, 1 - tail, axis=-1)
        low[todo], high[todo] = lo, hi
    return Interval(estimate, low, high)


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
