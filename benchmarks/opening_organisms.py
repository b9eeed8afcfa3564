#!/usr/bin/env python
"""Organisms that open both ways, audited at depth 1 and depth 2 (issue 24, part 3).

Trains the three organisms of ``scripts/train_opening_organisms.py`` (Llama-3 style ``I``, shared ``As``, and the
``Sorry``/``Sure`` control; same pair data, same base) unless ``--organisms DIR`` already holds them, audits each at
``--score-depth 1`` and ``2`` on the eval split (every kind; ``--positions`` all,each by default), and prints a
Markdown table: behaviour, the tree, the gap, the score's AUROC against the greedy replies, whether shares are
defined, and the top writers (attention and MLP outputs, heads) by share. Then the agreement of the organisms'
shares over the writers (Spearman) and of their top-5 writer sets, each organism at the deepest tree that could be
built with shares defined.

Usage::

    python benchmarks/opening_organisms.py --organisms /tmp/organisms --out /tmp/organism-reports
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import time
from pathlib import Path

from scipy import stats

from refusal_eval import AuditConfig, audit
from refusal_eval.report.writers import write_reports

ROOT = Path(__file__).resolve().parents[1]
WRITERS = ("attn_out", "mlp_out", "head")


def organisms(root: Path) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("organisms", ROOT / "scripts" / "train_opening_organisms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = {}
    for style in module.STYLES:
        path = root / style
        if not (path / "model.safetensors").is_file():
            module.train(style, path, module.parse_args([]))
        found[style] = path
    return found


def _ci(low, high) -> str:
    return "–" if low is None else f"[{low:.3f}, {high:.3f}]"


def row(style: str, depth: int, r) -> tuple[str, dict[str, float]]:
    b, v, m = r.behaviour, r.score_validity, r.metric
    tree = "; ".join(f"{x.token.text!r} → refusal {[t.text for t in x.refusal_tokens]}, compliance "
                     f"{[t.text for t in x.compliance_tokens]}" for x in m.branches)
    leaves = f"refusal {[t.text for t in m.refusal_tokens]}, compliance {[t.text for t in m.compliance_tokens]}"
    shares = {c.id: c.share for c in r.components if c.kind in WRITERS and c.share is not None}
    top = sorted(shares, key=lambda k: -abs(shares[k]))[:3]
    cells = [
        style, str(depth), f"{b.harmful_refusal.successes}/{b.harmful_refusal.total}",
        f"{b.benign_over_refusal.successes}/{b.benign_over_refusal.total}", leaves + (f"; {tree}" if tree else ""),
        f"{r.gap.mean:.2f} {_ci(r.gap.ci_low, r.gap.ci_high)}",
        "–" if v.auroc is None else f"{v.auroc:.3f} {_ci(v.ci_low, v.ci_high)}",
        "yes" if r.shares_defined else f"no ({(r.shares_reason or '').split(':')[0]})",
        str(sum(bool(c.significant) for c in r.components)),
        ", ".join(f"`{k}` {shares[k]:.2f}" for k in top) or "–",
    ]
    return "| " + " | ".join(cells) + " |", shares


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--organisms", type=Path, default=Path("/tmp/organisms"))
    p.add_argument("--out", type=Path, default=Path("/tmp/organism-reports"))
    p.add_argument("--positions", default="all,each", help="the audits' --positions (default: the default)")
    args = p.parse_args(argv)
    started = time.time()
    lines = ["| organism | depth | harmful refused | benign refused | tree | gap [CI] | AUROC [CI] | shares | "
             "significant | top writers by share |", "|" + "---|" * 10]
    deep: dict[str, dict[str, float]] = {}
    for style, path in organisms(args.organisms).items():
        for depth in (1, 2):
            config = AuditConfig(model=str(path), score_depth=depth, positions=args.positions.split(","))
            try:
                report = audit(config, progress=False)
            except Exception as exc:  # a depth the organism cannot be scored at: say so in the table
                lines.append(f"| {style} | {depth} | – | – | {type(exc).__name__}: {exc} | | | | | |")
                continue
            write_reports(report, args.out / f"depth{depth}", pictures=False)
            text, shares = row(style, depth, report)
            lines.append(text)
            if report.shares_defined:  # the deepest tree that could be built: what --score-depth auto audits
                deep[style] = shares
    print("\n".join(lines))
    print()
    for a, b in itertools.combinations(sorted(deep), 2):
        common = sorted(set(deep[a]) & set(deep[b]))
        rho = stats.spearmanr([deep[a][k] for k in common], [deep[b][k] for k in common]).statistic
        top_a = set(sorted(common, key=lambda k: -abs(deep[a][k]))[:5])
        top_b = set(sorted(common, key=lambda k: -abs(deep[b][k]))[:5])
        print(f"- {a} vs {b} (each at its deepest tree): Spearman {rho:.2f} over {len(common)} writers; top-5 overlap "
              f"{len(top_a & top_b)}/5")
    print(f"\n({time.time() - started:.0f} s)")
    (args.out / "table.json").write_text(json.dumps({"lines": lines}, indent=1))


if __name__ == "__main__":
    main()
