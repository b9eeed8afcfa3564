"""Time the vectorised share bootstrap: components x resamples, BCa and percentile; prints a table.

    python benchmarks/bench_bootstrap.py
"""

from __future__ import annotations

import time

import numpy as np

from refusal_eval.stats import share_intervals


def main() -> None:
    rng = np.random.default_rng(0)
    n_pairs = 77  # the shipped eval split
    gaps = rng.gamma(4.0, 0.5, n_pairs)
    print("| components | resamples | pairs | method | seconds |\n|---|---|---|---|---|")
    for components, resamples in [(100, 10_000), (1_000, 2_000), (1_000, 10_000), (3_000, 2_000)]:
        effects = rng.normal(0.3, 1.0, (components, n_pairs)) * gaps
        for method in ("BCa", "percentile"):
            start = time.perf_counter()
            share_intervals(effects, gaps, n_resamples=resamples, method=method)
            print(f"| {components} | {resamples} | {n_pairs} | {method} | {time.perf_counter() - start:.2f} |")


if __name__ == "__main__":
    main()
