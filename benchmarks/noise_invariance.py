"""Do verdicts survive float noise? Every per-pair effect of a committed example report is moved by independent
uniform noise of up to ``--floors`` times the report's largest noise floor (what another CPU's rounding does is
about one floor), under ``--seeds`` seeds; the audit's significance and a comparison's significant changes are
recomputed from the report's numbers. Prints one Markdown row per report or comparison (table in BENCHMARKS.md).

    python benchmarks/noise_invariance.py [--seeds 20] [--floors 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from refusal_eval.audit import significance
from refusal_eval.compare import _effects_matrix, _gaps, compare_reports
from refusal_eval.config import AuditConfig
from refusal_eval.report.kinds import load_report
from refusal_eval.simulation import perturbed_report

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "reports"
AUDITS = ["tiny-refuser", "tiny-refuser-no-drugs", "SmolLM2-135M-Instruct.Q4_1+smollm2-refuser-lora"]
COMPARISONS = [("tiny-refuser", "tiny-refuser-no-drugs")]


def audit_row(name: str, seeds: int, floors: float) -> str:
    r = load_report(EXAMPLES / name / "report.json")
    config = AuditConfig(**{k: v for k, v in r.config.items() if k in AuditConfig.model_fields})
    effects, gaps = _effects_matrix(r.components), _gaps(r, r.used_pair_ids)
    floor, measured = r.controls.noise_floor.rule_bound, r.controls.noise_floor.max_abs
    res, _, base, sig = significance(effects, gaps, floor, True, config)
    rng, flips, moved = np.random.default_rng(0), 0, 0.0
    for _ in range(seeds):
        noisy = effects + rng.uniform(-floors * measured, floors * measured, effects.shape)
        _, _, iv, s = significance(noisy, gaps, floor, True, config)
        flips += int((s != sig).sum())
        moved = max(moved, *(float(np.nanmax(np.abs(getattr(iv, k) - getattr(base, k))))
                             for k in ("fw_low", "fw_high")))
    return (f"| audit `{name}` | {floor:.1e} | {res.effect:.3g} | {int(sig.sum())} of {sig.size} | {flips} | "
            f"{moved:.1e} |")


def comparison_row(a_name: str, b_name: str, seeds: int, floors: float) -> str:
    a, b = (load_report(EXAMPLES / n / "report.json") for n in (a_name, b_name))
    floor = max(a.controls.noise_floor.max_abs, b.controls.noise_floor.max_abs)
    base = compare_reports(a, b)
    sig = np.array([c.significant for c in base.components])
    flips, moved = 0, 0.0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        noisy = compare_reports(perturbed_report(a, floors * floor, rng), perturbed_report(b, floors * floor, rng))
        flips += int((np.array([c.significant for c in noisy.components]) != sig).sum())
        moved = max(moved, *(max(abs(x.fw_low - y.fw_low), abs(x.fw_high - y.fw_high))
                             for x, y in zip(base.components, noisy.components, strict=True)))
    return (f"| compare `{a_name}` → `{b_name}` | {floor:.1e} | per report | {int(sig.sum())} of {sig.size} | "
            f"{flips} | {moved:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--floors", type=float, default=3.0)
    args = parser.parse_args()
    print(f"{args.seeds} seeds, every effect moved by up to {args.floors:g} noise floors\n")
    print("| report | largest floor | resolution | significant | verdict flips (all seeds) | "
          "largest family-wise bound move |")
    print("|---|---|---|---|---|---|")
    for name in AUDITS:
        print(audit_row(name, args.seeds, args.floors))
    for a, b in COMPARISONS:
        print(comparison_row(a, b, args.seeds, args.floors))


if __name__ == "__main__":
    main()
