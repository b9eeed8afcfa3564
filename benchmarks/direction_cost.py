"""The refusal direction's cost beside the patching audit's (issue 27): wall time of ``analyse`` (replies, scores,
search, statistics) and of the direction stage on the same model and pairs, the stage split into its parts
(selection, the chosen direction on the patched pairs, the per-layer candidates, cosines, greedy replies), with the
selection's two shortcuts (the ranking, the cached template prefix) and without.

    python benchmarks/direction_cost.py                                    # SmolLM2 + the shipped refusal LoRA
    python benchmarks/direction_cost.py --model tiny --full-selection      # the tiny refuser, also Arditi's full one

Prints Markdown rows; timings compare within one run only (ratios).
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

from refusal_eval import AuditConfig
from refusal_eval import direction as D
from refusal_eval.audit import analyse, load_inputs
from refusal_eval.models.loading import load_model, smollm2_gguf
from refusal_eval.pipeline import refusal_direction as RD

LORA = "refusal_eval/models/assets/smollm2-refuser-lora"


@contextmanager
def timed(parts: dict[str, float]):
    """Wall time of the direction module's steps while open, summed per step into ``parts``."""
    names = {"select_direction": "selection", "variant_effects": "effects (chosen; per-layer candidates)",
             "direction_cosines": "cosines", "refusal_after_ablation": "replies (ablated)",
             "refusal_after_addition": "replies (added)"}
    saved = {name: getattr(D, name) for name in names}

    def wrap(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[names[name]] = parts.get(names[name], 0.0) + time.perf_counter() - start
        return run

    for name, fn in saved.items():
        setattr(D, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(D, name, fn)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--positions", default="last",
                        help="the audit's --positions (the README's SmolLM2 audits: last)")
    parser.add_argument("--full-selection", action="store_true",
                        help="also time Arditi's selection with every candidate measured (slow on SmolLM2)")
    parser.add_argument("--no-prefix", action="store_true", help="also time the selection without the prefix cache")
    args = parser.parse_args(argv)
    model, adapter = (str(smollm2_gguf()), LORA) if args.model == "smollm2" else (None, None)
    config = AuditConfig(model=model, adapter=adapter, positions=args.positions.split(","))
    inputs = load_inputs(config)
    loaded = load_model(model, adapter=adapter)
    start = time.perf_counter()
    a = analyse(loaded, inputs, config, progress=False)
    seconds = time.perf_counter() - start
    parts: dict[str, float] = {}
    start = time.perf_counter()
    with timed(parts):
        found = RD.direction_stage(a, inputs, config)
    stage = time.perf_counter() - start
    s = found.selection
    print(f"{loaded.name}: {len(inputs.calibration)} calibration pairs, {a.engine.loaded.n_layers} layers x "
          f"{len(s.positions)} positions = {len(s.candidates)} candidates, {sum(c.checked for c in s.candidates)} "
          f"measured in full; chosen: layer {s.direction.layer if s.direction else None}; reason: {found.reason}")
    print("| part | seconds | × analyse |\n|---|---|---|")
    print(f"| analyse (patching audit, --positions {args.positions}) | {seconds:.1f} | 1 |")
    print(f"| direction stage | {stage:.1f} | {stage / seconds:.2f} |")
    for name, value in parts.items():
        print(f"| — {name} | {value:.1f} | {value / seconds:.2f} |")
    variants = []
    if args.no_prefix:
        variants.append(("selection without the prefix cache", {"_prefix_plan": lambda e, p, seqs: (None, seqs)}))
    if args.full_selection:
        variants.append(("Arditi's selection, every candidate measured", {"RANK_PAIRS": 10**6, "CHECK_BATCH": 10**6}))
    for label, patch in variants:
        saved = {name: getattr(D, name) for name in patch}
        for name, value in patch.items():
            setattr(D, name, value)
        try:
            start = time.perf_counter()
            other, _, _ = RD._select(a, inputs, config)
            value = time.perf_counter() - start
        finally:
            for name, fn in saved.items():
                setattr(D, name, fn)
        same = (other.direction.layer, other.direction.position) == (s.direction.layer, s.direction.position) \
            if other.direction and s.direction else other.direction is s.direction
        print(f"| {label} | {value:.1f} | {value / seconds:.2f} | (same choice: {same})")


if __name__ == "__main__":
    main()
