"""False positives on random-weight models: the default audit of networks with no refusal circuit.

For each architecture and seed, a random-weight model with the tiny-refuser's chat tokenizer is audited with the
default options (eval split, calibration token sets, every guard on). A correct audit reports no separated gap
and no significant component. Prints one Markdown row per model and the totals (table in BENCHMARKS.md).

    python benchmarks/null_models.py [--seeds 0,1,2,3,4] [--init-range 0.02] [--legacy]

``--legacy`` also re-scores each model the way schema-1.0 reports did (token sets from the scored replies,
wrong-sign pairs dropped, a gap above 0 enough): the false positives the guards remove.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from refusal_eval import AuditConfig, audit
from refusal_eval.null_models import ARCHITECTURES, save_random_chat_model
from refusal_eval.stats import mean_interval


def legacy_gap(report) -> tuple[float, float, int]:
    """The 1.0 rules' gap on the same scores: pairs with m(harmful) <= m(benign) dropped (the token sets are not
    re-derived here, so this understates the old false-positive rate)."""
    gaps = np.array([p.m_harmful - p.m_benign for p in report.pairs if p.used])
    kept = gaps[gaps > 0]
    if kept.size < 2:
        return float("nan"), float("nan"), int(kept.size)
    ci = mean_interval(kept, report.stats.level, report.stats.n_resamples, report.stats.method, report.stats.seed)
    return float(ci.low), float(ci.high), int(kept.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--init-range", type=float, default=None,
                        help="initializer_range of the random weights (default: the architecture's own)")
    parser.add_argument("--legacy", action="store_true")
    args = parser.parse_args()
    print("| architecture | seed | harmful refused | benign refused | gap [95% CI] | verdict | gap p | "
          "significant | significant (shares forced) | permutation fw p < 0.05 | seconds |"
          + (" 1.0 rules: gap CI (pairs kept) |" if args.legacy else ""))
    print("|---" * (11 + args.legacy) + "|")
    separated = flagged = runs = 0
    for arch in args.architectures.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            with tempfile.TemporaryDirectory() as folder:
                path = save_random_chat_model(f"{folder}/random-{arch}-{seed}", arch, seed,
                                              init_range=args.init_range)
                started = time.perf_counter()
                config = AuditConfig(model=str(path))
                report = audit(config, progress=False)
                forced = audit(config.model_copy(update={"force_shares": True}), progress=False)
                seconds = time.perf_counter() - started
            g = report.gap
            n_sig = sum(bool(c.significant) for c in report.components)
            n_forced = sum(bool(c.significant) for c in forced.components)
            runs += 1
            separated += g.separated
            flagged += n_sig > 0
            row = (f"| {arch} | {seed} | {report.behaviour.harmful_refusal.successes}/{report.dataset.n_pairs} | "
                   f"{report.behaviour.benign_over_refusal.successes}/{report.dataset.n_pairs} | {g.mean:.4f} "
                   f"[{g.ci_low:.4f}, {g.ci_high:.4f}] | {g.verdict} | {g.p_permutation:.3g} | {n_sig} | {n_forced} | "
                   f"{report.controls.permutation.n_components_p_below} | {seconds:.0f} |")
            if args.legacy:
                low, high, kept = legacy_gap(report)
                row += f" [{low:.4f}, {high:.4f}] ({kept}) |"
            print(row, flush=True)
    print(f"\n{runs} runs: separated gap in {separated}, any significant component in {flagged}")


if __name__ == "__main__":
    main()
