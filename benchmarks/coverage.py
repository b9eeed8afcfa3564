"""Coverage of the share intervals on synthetic datasets with a known true share; prints a table.

    python benchmarks/coverage.py [--datasets 400] [--resamples 999]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from refusal_eval.simulation import SCENARIOS, TRUE_SHARE, simulate
from refusal_eval.stats import share_intervals

GRID = [("normal", 20), ("normal", 40), ("t3", 30), ("t3", 60), ("lognormal", 60), ("small_gap", 40),
        ("small_gap", 80), ("contaminated", 60), ("contaminated", 300)]


def coverage(scenario: str, n_pairs: int, datasets: int, resamples: int, method: str, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for k in range(datasets):
        effects, gaps = simulate(scenario, n_pairs, rng)
        iv = share_intervals(effects[None], gaps, n_resamples=resamples, method=method, seed=k)
        hits += bool(iv.low[0] <= TRUE_SHARE <= iv.high[0])
    return hits / datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=999)
    args = parser.parse_args()
    print(f"nominal 95% intervals, true share {TRUE_SHARE}, {args.datasets} datasets per row, "
          f"{args.resamples} resamples")
    print("| scenario | pairs | BCa coverage | percentile coverage | description |\n|---|---|---|---|---|")
    start = time.perf_counter()
    for scenario, n in GRID:
        bca = coverage(scenario, n, args.datasets, args.resamples, "BCa")
        pct = coverage(scenario, n, args.datasets, args.resamples, "percentile")
        print(f"| {scenario} | {n} | {bca:.1%} | {pct:.1%} | {SCENARIOS[scenario]} |")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
