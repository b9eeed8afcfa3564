"""Scale in pairs: wall time and peak memory of one audit on 1k, 3k and 10k pairs.

The shipped eval pairs are repeated (fresh ids, same categories) to N pairs and audited on the tiny refuser with one
component kind at all positions (the setting of issue 11). Each size runs in its own process, so the peak resident
memory is that run's alone. Prints a Markdown table (recorded in BENCHMARKS.md).

    python benchmarks/scale.py [--sizes 1000,3000,10000] [--kind mlp_out]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from refusal_eval.data import shipped_dataset


def write_pairs(n: int, folder: Path) -> Path:
    rows = [json.loads(line) for line in open(shipped_dataset())]
    rows = [r for r in rows if r["split"] == "eval"]
    path = folder / f"pairs-{n}.jsonl"
    with open(path, "w") as out:
        for i in range(n):
            row = dict(rows[i % len(rows)], id=f"p{i:05d}", split="eval")
            out.write(json.dumps(row) + "\n")
    return path


def one(path: str, kind: str) -> None:
    """Child process: one audit; prints wall seconds and peak RSS (bytes) as JSON."""
    from refusal_eval import AuditConfig, audit

    started = time.perf_counter()
    report = audit(AuditConfig(dataset=path, tricky="", components=[kind], positions=["all"],
                               token_sets="canonical"), progress=False)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "pairs": report.dataset.n_used,
        "components": len(report.components)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,3000,10000")
    parser.add_argument("--kind", default="mlp_out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one(args.child, args.kind)
        return
    print("| pairs | components | wall s | s per 1k pairs | peak RSS MB |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            path = write_pairs(n, Path(tmp))
            out = subprocess.run([sys.executable, __file__, "--child", str(path), "--kind", args.kind],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"| {r['pairs']} | {r['components']} | {r['seconds']:.1f} | {1000 * r['seconds'] / n:.1f} | "
                  f"{r['peak'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
