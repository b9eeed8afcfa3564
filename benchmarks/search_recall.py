"""Recall and precision of an audit against a reference audit of the same model and pairs (issue 26): every
non-trivial component significant in the reference with |share| >= 0.02 must be patched, and significant, in the
other (recall 1.0 is the target); precision is the fraction of the other's significant components that the
reference also finds significant, among the cells the reference patched. Only kinds of both grids count (a
reference at ``--positions last`` checks the last-position part of an adaptive default audit).

    python benchmarks/search_recall.py REFERENCE.json AUDIT.json
"""

from __future__ import annotations

import argparse

from refusal_eval.report.kinds import load_report
from refusal_eval.report.schema import AuditReport

LARGE = 0.02  # the search's BOUND_SHARE: the size the recall target is about


def recall(reference: AuditReport, other: AuditReport) -> dict:
    """Counts and the lists behind them; cells of the reference outside the other's grid are left out."""
    ref = {c.id: c for c in reference.components if c.trivial is None}
    got = {c.id: c for c in other.components if c.trivial is None}
    wanted = [i for i, c in ref.items() if c.significant and c.share is not None and abs(c.share) >= LARGE]
    # a cell the other audit could have patched: a kind of its grid (the default positions hold every position)
    kinds = set(other.config.get("components") or ())
    wanted = [i for i in wanted if ref[i].kind in kinds]
    missed = [i for i in wanted if i not in got]
    not_significant = [i for i in wanted if i in got and not got[i].significant]
    found = [i for i, c in got.items() if c.significant and i in ref]
    false = [i for i in found if not ref[i].significant]
    return {"wanted": len(wanted), "patched": len(wanted) - len(missed),
            "significant": len(wanted) - len(missed) - len(not_significant), "missed": missed,
            "not_significant": not_significant, "other_significant_in_reference_grid": len(found),
            "precision_misses": false,
            "precision": (len(found) - len(false)) / len(found) if found else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference")
    parser.add_argument("audit")
    args = parser.parse_args(argv)
    r = recall(load_report(args.reference), load_report(args.audit))
    w = r["wanted"]
    print(f"reference: {w} non-trivial significant cells at |share| >= {LARGE} in both grids")
    print(f"recall (patched): {r['patched']}/{w}; recall (significant): {r['significant']}/{w}")
    print(f"precision: {r['precision']} ({r['other_significant_in_reference_grid']} significant in the audit "
          f"and in the reference grid)")
    for key in ("missed", "not_significant", "precision_misses"):
        if r[key]:
            print(f"{key}: {', '.join(r[key][:20])}{' ...' if len(r[key]) > 20 else ''}")


if __name__ == "__main__":
    main()
