"""Nominal 95% share intervals cover a known true share 93-97% of the time on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from refusal_eval.simulation import TRUE_SHARE, simulate
from refusal_eval.stats import share_intervals

# Scenario, pairs: light and heavy tails, skewed and small gaps. benchmarks/coverage.py tabulates more
# regimes, including the outlier-contaminated one where a pair bootstrap under-covers (BENCHMARKS.md).
DESIGN = [("normal", 40), ("t3", 60), ("lognormal", 60), ("small_gap", 80)]
PER_SCENARIO = 250


def covered(scenario: str, n_pairs: int, seed: int, method: str) -> list[bool]:
    rng = np.random.default_rng(seed)
    hits = []
    for k in range(PER_SCENARIO):
        effects, gaps = simulate(scenario, n_pairs, rng)
        iv = share_intervals(effects[None], gaps, n_resamples=999, seed=k, method=method)
        hits.append(bool(iv.low[0] <= TRUE_SHARE <= iv.high[0]))
    return hits


@pytest.mark.slow
@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_intervals_cover_nominally_over_1000_datasets(method):
    hits = {name: covered(name, n, seed=i, method=method) for i, (name, n) in enumerate(DESIGN)}
    pooled = float(np.mean([h for v in hits.values() for h in v]))
    assert 0.93 <= pooled <= 0.97, f"pooled coverage {pooled:.3f}; per scenario " + str(
        {k: float(np.mean(v)) for k, v in hits.items()}
    )
    for name, values in hits.items():
        assert np.mean(values) >= 0.90, (name, np.mean(values))


def test_simulation_truth_is_the_population_ratio():
    effects, gaps = simulate("lognormal", 400_000, np.random.default_rng(0))
    assert abs(effects.sum() / gaps.sum() - TRUE_SHARE) < 0.01
