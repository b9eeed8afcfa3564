#!/usr/bin/env python
"""How far shares move between two audits of one model that differ in the score: depth 1 against depth 2.

Prints each report's tree, gap and AUROC, the Spearman rank correlation of the shares of every component with a
share in both (and of the writers alone: attention and MLP outputs and heads), the significant components in common,
and each report's top writers.

Usage::

    python benchmarks/score_depth.py DEPTH1/report.json DEPTH2/report.json
"""

from __future__ import annotations

import argparse

from scipy import stats

from refusal_eval.report.kinds import load_report

WRITERS = ("attn_out", "mlp_out", "head")


def describe(r) -> str:
    m, v = r.metric, r.score_validity
    branches = "; ".join(f"{b.token.text!r} ({b.token.count}) → refusal {[t.text for t in b.refusal_tokens]}, "
                         f"compliance {[t.text for t in b.compliance_tokens]}" for b in m.branches)
    auroc = "–" if v is None or v.auroc is None else f"{v.auroc:.3f} [{v.ci_low:.3f}, {v.ci_high:.3f}]"
    return (f"depth {m.depth}: refusal {[t.text for t in m.refusal_tokens]}, compliance "
            f"{[t.text for t in m.compliance_tokens]}" + (f"; {branches}" if branches else "")
            + f"\n  gap {r.gap.mean:.3f} [{r.gap.ci_low:.3f}, {r.gap.ci_high:.3f}]; AUROC {auroc}; "
            f"{sum(bool(c.significant) for c in r.components)} of {len(r.components)} significant")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shallow")
    p.add_argument("deep")
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args(argv)
    a, b = load_report(args.shallow), load_report(args.deep)
    print(f"A {describe(a)}\nB {describe(b)}")
    sa = {c.id: c for c in a.components if c.share is not None}
    sb = {c.id: c for c in b.components if c.share is not None}
    common = sorted(set(sa) & set(sb))
    for label, ids in (("all components", common), ("writers", [k for k in common if sa[k].kind in WRITERS])):
        rho = stats.spearmanr([sa[k].share for k in ids], [sb[k].share for k in ids]).statistic
        print(f"Spearman of shares, {label}: {rho:.3f} over {len(ids)}")
    sig_a = {k for k in common if sa[k].significant}
    sig_b = {k for k in common if sb[k].significant}
    print(f"significant: {len(sig_a)} in A, {len(sig_b)} in B, {len(sig_a & sig_b)} in both")
    for tag, shares in (("A", sa), ("B", sb)):
        top = sorted((k for k in common if shares[k].kind in WRITERS), key=lambda k: -shares[k].share)[: args.top]
        print(f"top writers {tag}: " + ", ".join(f"`{k}` {shares[k].share:.3f} [{shares[k].ci_low:.3f}, "
                                                 f"{shares[k].ci_high:.3f}]" for k in top))


if __name__ == "__main__":
    main()
