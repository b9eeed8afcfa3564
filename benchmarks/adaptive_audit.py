"""Wall time of the model-touching stages of one audit (``analyse``: replies, scores, search or grid, statistics)
on a random-weight Llama of real dimensions, adaptive search against the exhaustive grid (issue 26's GPU target:
the adaptive audit of the random 8B model in at most 60 s on one H200).

A random model does not refuse, so its shares are forced (``force_shares``, as the random-weights control does): the
timing is the pipeline's, not a finding. Prints one Markdown row per search mode.

    python benchmarks/adaptive_audit.py --random-model 8b --device cuda --dtype bfloat16 [--search adaptive]
    python benchmarks/adaptive_audit.py --random-model tiny --max-pairs 8            # a CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_patching import RANDOM_MODELS, now, random_model  # noqa: E402

from refusal_eval import AuditConfig  # noqa: E402
from refusal_eval.audit import analyse, load_inputs  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-model", choices=sorted(RANDOM_MODELS), default="8b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-pairs", type=int, default=None, help="default: every eval pair")
    parser.add_argument("--search", default="adaptive,exhaustive", help="comma-separated modes, timed in this order")
    args = parser.parse_args(argv)
    loaded = random_model(args.random_model, args.dtype, args.device)
    config = AuditConfig(device=args.device, dtype=args.dtype, max_pairs=args.max_pairs, tricky="",
                         force_shares=True)
    inputs = load_inputs(config)
    print(f"random-llama-{args.random_model}, {args.dtype} on {args.device}")
    print("| search | cells patched / grid | steps | analyse (s) |\n|---|---|---|---|")
    for mode in args.search.split(","):
        start = now()
        a = analyse(loaded, inputs, config.model_copy(update={"search": mode}), progress=False)
        seconds = now() - start
        steps = ", ".join(f"{s.step} {s.patched}" for s in a.search.steps) or "every cell"
        print(f"| {mode} | {a.search.n_patched} / {a.search.n_grid} | {steps} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
