"""Synthetic pair-level data with a known true share, for checking interval coverage.

Each scenario draws per-pair gaps g_i and effects e_i = s * g_i + noise_i with E[noise] = 0, so the
population ratio of sums E[e]/E[g] equals the true share s whatever the noise distribution.
"""

from __future__ import annotations

import numpy as np

TRUE_SHARE = 0.4

SCENARIOS: dict[str, str] = {
    "normal": "gamma(4, 0.5) gaps, normal noise (sd 0.5)",
    "t3": "gamma(4, 0.5) gaps, Student-t(3) noise: heavy tails",
    "lognormal": "lognormal(0, 0.75) gaps (skewed), noise growing with the gap",
    "small_gap": "normal(0.5, 0.5) gaps: small, a third of them negative",
    "contaminated": "gamma(2, 1) gaps, 10% of pairs with 7x noise: outliers",
}


def simulate(scenario: str, n_pairs: int, rng: np.random.Generator, share: float = TRUE_SHARE):
    """(effects [n], gaps [n]) for one synthetic dataset of the given scenario."""
    if scenario == "normal":
        gaps = rng.gamma(4.0, 0.5, n_pairs)
        noise = rng.normal(0.0, 0.5, n_pairs)
    elif scenario == "t3":
        gaps = rng.gamma(4.0, 0.5, n_pairs)
        noise = 0.4 * rng.standard_t(3, n_pairs)
    elif scenario == "lognormal":
        gaps = rng.lognormal(0.0, 0.75, n_pairs)
        noise = rng.normal(0.0, 0.4, n_pairs) * np.sqrt(gaps)
    elif scenario == "small_gap":
        gaps = rng.normal(0.5, 0.5, n_pairs)
        noise = rng.normal(0.0, 0.3, n_pairs)
    elif scenario == "contaminated":
        gaps = rng.gamma(2.0, 1.0, n_pairs)
        noise = np.where(rng.random(n_pairs) < 0.1, rng.normal(0, 2.0, n_pairs), rng.normal(0, 0.3, n_pairs))
    else:
        raise ValueError(f"unknown scenario '{scenario}'; choose from {', '.join(SCENARIOS)}")
    return share * gaps + noise, gaps


def perturbed_report(report, scale: float, rng: np.random.Generator):
    """A copy of an audit report whose every per-pair effect (exact zeros included) moved by independent uniform
    noise in [-scale, scale]: what another CPU's float rounding does, at ``scale`` = a few noise floors."""
    out = report.model_copy(deep=True)
    for c in out.components:
        c.effects = [None if v is None else v + float(rng.uniform(-scale, scale)) for v in c.effects]
    return out
