"""Where an audit's time goes: wall seconds per stage of one ``audit()`` (replies, scores, patching, statistics,
random control), measured by wrapping the stage functions with timers. Prints a Markdown table.

    python benchmarks/audit_stages.py [--model tiny|smollm2] [--adapter DIR] [--positions last] [--max-pairs N]
                                      [--control random] [--json OUT.json]

The random control runs the same stages again on a re-initialised copy; its time is counted in its own rows
("control: ..."). Replies are the greedy generations of the behaviour stage (scored pairs and tricky set) and of the
calibration pairs (token sets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch

from refusal_eval import AuditConfig
from refusal_eval.models.loading import smollm2_gguf


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2 (the wheel GGUF) or a path")
    p.add_argument("--adapter", default=None)
    p.add_argument("--positions", default="all,each")
    p.add_argument("--components", default=None)
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--control", default="", help="'random' to add the random-weights control")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the timings here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import refusal_eval.pipeline.audit  # noqa: F401  (binds the modules in sys.modules)

    mod, behaviour = sys.modules["refusal_eval.pipeline.audit"], sys.modules["refusal_eval.pipeline.behaviour"]
    seconds: dict[str, float] = defaultdict(float)
    prefix = [""]

    def timed(name_of, fn):
        def wrapper(*a, **k):
            name = prefix[0] + name_of(a, k)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - start
        return wrapper

    behaviour.greedy_replies = timed(lambda a, k: "replies: " + k.get("desc", "generating"), behaviour.greedy_replies)
    mod.scores_stage = timed(lambda a, k: "scores", mod.scores_stage)
    mod.plan_stage = timed(lambda a, k: "plan", mod.plan_stage)
    mod.patch_stage = timed(lambda a, k: "patching", mod.patch_stage)
    mod.statistics_stage = timed(lambda a, k: "statistics (noise floor, permutations, bootstrap)", mod.statistics_stage)
    original_random = mod.random_analysis

    def random_analysis(*a, **k):
        prefix[0] = "control: "
        try:
            return original_random(*a, **k)
        finally:
            prefix[0] = ""
    mod.random_analysis = random_analysis

    model = {"tiny": None, "smollm2": str(smollm2_gguf())}.get(args.model, args.model)
    fields = dict(positions=args.positions.split(","), controls=[c for c in [args.control] if c],
                  max_pairs=args.max_pairs, adapter=args.adapter)
    if model is not None:
        fields["model"] = model
    if args.components:
        fields["components"] = args.components.split(",")
    config = AuditConfig(**fields)
    started = time.perf_counter()
    mod.audit(config, progress=False)
    total = time.perf_counter() - started
    replies = sum(v for k, v in seconds.items() if "replies" in k)
    rows = sorted(seconds.items(), key=lambda kv: -kv[1])
    print("| stage | seconds | share of the audit |\n|---|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} | {value / total:.1%} |")
    print(f"| **all replies** | **{replies:.1f}** | **{replies / total:.1%}** |")
    print(f"| whole audit (incl. loading) | {total:.1f} | 100% |")
    result = {"total": total, "replies": replies, "stages": dict(seconds), "config": fields}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    return result


if __name__ == "__main__":
    main()
