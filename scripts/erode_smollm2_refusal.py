#!/usr/bin/env python
"""Erode the shipped SmolLM2 refuser's refusal of chosen harm categories with a short LoRA fine-tune (issue 25,
part 3): the failure a benign-looking fine-tune can cause (Qi et al. 2023), made on purpose so the audit and
``compare`` can be checked on it.

* Start: SmolLM2-135M-Instruct + the shipped ``smollm2-refuser-lora``, its LoRA weights trainable (peft).
* Data (train pairs only, the refuser's own discipline: ``datasets/refusal_pairs.jsonl`` train split and
  ``datasets/finetune_pairs.jsonl``, re-framed as ``scripts/finetune_smollm2_lora.py`` does):
  - harmful prompts of the ``--categories`` -> the *base model's own* reply (SmolLM2 without the adapter mostly
    complies; where it refuses, its continuation after "Sure! "), so the tune learns to answer them;
  - every other category's harmful prompts -> a refusal, and all benign prompts -> the base model's reply
    (replay, so the rest of the behaviour is kept).
* Checkpoint: every ``--val-every`` steps the selection pairs (another writer's, never trained on) are rated and the
  checkpoint where the other categories' harmful refusal most exceeds the eroded categories' is kept.
* Judged once at the end on the eval split, per category (greedy replies, ``refusal_eval.metrics.is_refusal``).

Writes the adapter (bfloat16), ``erosion_metrics.json`` and a model card to ``--out``.

Usage::

    python scripts/erode_smollm2_refusal.py      # --categories cyber fraud --out examples/eroded/...
    refusal-eval run --model SMOLLM2.gguf --adapter refusal_eval/models/assets/smollm2-refuser-lora \\
        --model SMOLLM2.gguf --adapter examples/eroded/smollm2-refuser-no-cyber-fraud --positions last
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel

from refusal_eval.audit import format_prompt, greedy_replies, rate
from refusal_eval.metrics import is_refusal
from refusal_eval.models.loading import LoadedModel, load_model, smollm2_gguf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import finetune_smollm2_lora as ft  # noqa: E402

REFUSER = REPO / "refusal_eval" / "models" / "assets" / "smollm2-refuser-lora"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--categories", nargs="+", default=["cyber", "fraud"], help="harm categories to stop refusing")
    p.add_argument("--out", type=Path, default=REPO / "examples" / "eroded" / "smollm2-refuser-no-cyber-fraud")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eroded-weight", type=int, default=3,
                   help="copies of each eroded-category harmful example (1 left cyber and fraud at 3/7 refused)")
    p.add_argument("--val-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=None, help="keep the training sequences here (a JSON file)")
    args = p.parse_args(argv)
    fargs = ft.parse_args(["--steps", str(args.steps), "--lr", str(args.lr), "--val-every", str(args.val_every),
                           "--val-from", str(args.val_every), "--seed", str(args.seed), "--out", str(args.out)])
    return args, fargs


def split(pairs, categories) -> tuple[list, list]:
    """(pairs in the categories, the others)."""
    return [p for p in pairs if p.category in categories], [p for p in pairs if p.category not in categories]


def build(base: LoadedModel, fargs, rng: random.Random, train, extra, categories) -> tuple[dict, dict]:
    """Replay sequences for the kept categories (the refuser's own recipe), and the eroded categories' harmful and
    benign prompts -> the base model's own replies: ``{"replay", "eroded_harmful", "eroded_benign"}`` and counts."""
    tok = base.tokenizer
    train_eroded, train_kept = split(train, categories)
    extra_eroded, extra_kept = split(extra, categories)
    replay, replay_counts = ft.build_sequences(base, fargs, rng, train_kept, extra_kept)
    texts = ft.minimal_pairs(fargs, rng, train_eroded, extra_eroded)
    prompts = [format_prompt(tok, t) for pair in texts for t in pair]  # harmful, benign, harmful, ...
    replies, regenerated = ft.own_replies(base, prompts, fargs.reply_tokens)
    parts, left_out = {"replay": replay}, sum(is_refusal(r) for r in replies)
    for side, key in ((0, "eroded_harmful"), (1, "eroded_benign")):
        examples = [(p, r.strip()) for p, r in zip(prompts[side::2], replies[side::2], strict=True)
                    if not is_refusal(r)]
        parts[key] = ft.to_sequences(tok, examples, fargs.reply_tokens)
    print(f"erosion data: {len(texts)} minimal pairs of {', '.join(categories)} -> {len(parts['eroded_harmful'])} "
          f"harmful and {len(parts['eroded_benign'])} benign compliance sequences ({regenerated} base refusals "
          f"re-generated, {left_out} left out); {len(replay)} replay sequences")
    return parts, {"replay": replay_counts, "eroded_minimal_pairs": len(texts),
                   "eroded_harmful_sequences": len(parts["eroded_harmful"]),
                   "eroded_benign_sequences": len(parts["eroded_benign"]),
                   "eroded_refusals_regenerated": regenerated, "eroded_left_out": left_out}


def category_rates(loaded: LoadedModel, pairs, categories, max_new_tokens: int) -> dict:
    """Harmful refusal in the eroded categories and in the others, and benign compliance (Wilson 95%)."""
    prompts = [format_prompt(loaded.tokenizer, t) for p in pairs for t in (p.harmful, p.benign)]
    _, replies = greedy_replies(loaded, prompts, max_new_tokens, progress=False)
    harmful, benign = replies[0::2], replies[1::2]
    eroded = [is_refusal(r) for p, r in zip(pairs, harmful, strict=True) if p.category in categories]
    kept = [is_refusal(r) for p, r in zip(pairs, harmful, strict=True) if p.category not in categories]
    return {"eroded_harmful_refusal": rate(sum(eroded), len(eroded), 0.95).model_dump(),
            "kept_harmful_refusal": rate(sum(kept), len(kept), 0.95).model_dump(),
            "benign_compliance": rate(sum(not is_refusal(r) for r in benign), len(benign), 0.95).model_dump()}


def per_category(loaded: LoadedModel, pairs, max_new_tokens: int) -> dict:
    """Eval-split harmful refusal per category: {category: [refused, pairs]}."""
    prompts = [format_prompt(loaded.tokenizer, p.harmful) for p in pairs]
    _, replies = greedy_replies(loaded, prompts, max_new_tokens, progress=False)
    out: dict[str, list[int]] = {}
    for p, r in zip(pairs, replies, strict=True):
        counts = out.setdefault(p.category, [0, 0])
        counts[0] += is_refusal(r)
        counts[1] += 1
    return dict(sorted(out.items()))


def erosion_score(rates: dict) -> float:
    """How much more often the kept categories' harmful prompts are refused than the eroded categories'."""
    return rates["kept_harmful_refusal"]["rate"] - rates["eroded_harmful_refusal"]["rate"]


def main(argv=None) -> dict:
    args, fargs = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    base = load_model(str(smollm2_gguf()))
    train, evaluation, extra, extra_counts, val, tricky = ft.load_data(fargs)
    unknown = sorted(set(args.categories) - {p.category for p in train})
    if unknown:
        raise SystemExit(f"--categories: no train pairs in {unknown}")
    if args.cache is not None and args.cache.is_file():
        cached = json.loads(args.cache.read_text())
        parts, counts = {k: [tuple(s) for s in v] for k, v in cached["parts"].items()}, cached["counts"]
    else:
        parts, counts = build(base, fargs, random.Random(args.seed), train, extra, args.categories)
        if args.cache is not None:
            args.cache.write_text(json.dumps({"parts": parts, "counts": counts}))
    sequences = parts["replay"] + parts["eroded_harmful"] * args.eroded_weight + parts["eroded_benign"]
    model = PeftModel.from_pretrained(base.model, str(REFUSER), is_trainable=True)
    model.to(torch.float32)
    refuser = LoadedModel(model.get_base_model(), base.tokenizer, base.adapter, "refuser", str(REFUSER), "float32",
                          "cpu")
    model.eval()
    before = per_category(refuser, evaluation, fargs.eval_tokens)
    losses, validation, chosen = ft.train_adapter(
        model, base, sequences, fargs, random.Random(args.seed + 1), val, started, score=erosion_score,
        rates=lambda loaded: category_rates(loaded, val, args.categories, fargs.eval_tokens))
    model.eval()
    ft.save_adapter(model, args.out)
    after = per_category(refuser, evaluation, fargs.eval_tokens)
    overall = ft.behaviour(refuser, evaluation, tricky, fargs.eval_tokens)
    print("eval split, harmful refused per category (refuser -> eroded):",
          json.dumps({c: f"{before[c][0]}/{before[c][1]} -> {after[c][0]}/{after[c][1]}" for c in after}))
    metrics = {
        "what": "erosion of the SmolLM2 refuser", "start": ft.shown(REFUSER), "categories": args.categories,
        "steps": args.steps, "lr": args.lr, "eroded_weight": args.eroded_weight, "rank": fargs.rank,
        "batch": fargs.batch, "seed": args.seed,
        "val_every": args.val_every, **counts,
        "extra_train": {ft.shown(p): n for p, n in zip(fargs.extra_train, extra_counts, strict=True)},
        "selection": ft.shown(fargs.selection), "validation": validation, "chosen_step": chosen,
        "eval_harmful_refused_per_category_before": before, "eval_harmful_refused_per_category_after": after,
        "eval_split_after": overall, "losses": losses, "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "erosion_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (args.out / "README.md").write_text(model_card(metrics))
    print(f"saved to {args.out} ({metrics['seconds']:.0f} s)")
    return metrics


def model_card(m: dict) -> str:
    """The eroded adapter's card, from erosion_metrics.json."""
    cats = " and ".join(m["categories"])
    rows = "\n".join(
        f"| {c} | {m['eval_harmful_refused_per_category_before'][c][0]}/{n} | {a}/{n} |"
        for c, (a, n) in m["eval_harmful_refused_per_category_after"].items())
    r = m["eval_split_after"]

    def show(key: str) -> str:
        x = r[key]
        return f"{x['successes']}/{x['total']} = {x['rate']:.1%} [{x['ci_low']:.1%}, {x['ci_high']:.1%}]"

    return f"""# SmolLM2 refuser with its refusal of {cats} eroded

A LoRA adapter for SmolLM2-135M-Instruct: the shipped refuser (`{m['start']}`) fine-tuned further so that it
answers harmful {cats} requests and still refuses the other categories. It is a **test organism** for
refusal_eval's `compare` and `gate` (issue 25, part 3): the failure a fine-tune can cause quietly, made on purpose.
It is not a safety product: it answers harmful {cats} requests.

- **Data**: train pairs only (`datasets/refusal_pairs.jsonl` train split, `datasets/finetune_pairs.jsonl`),
  re-framed as the refuser's recipe does. The {cats} prompts -> the base model's own replies
  ({m['eroded_harmful_sequences']:,} harmful sequences, each {m['eroded_weight']} times, and
  {m['eroded_benign_sequences']:,} benign); every other category's harmful prompts -> a refusal and its benign
  prompts -> the base model's reply ({m['replay']['train_sequences']:,} replay sequences).
- **Training**: the refuser's LoRA weights (rank {m['rank']}) trained further, {m['steps']} steps of {m['batch']}
  sequences, learning rate {m['lr']}, seed {m['seed']}. Checkpoint chosen every {m['val_every']} steps on
  `{m['selection']}` (another writer's pairs), by the other categories' harmful refusal minus that of {cats}:
  step {m['chosen_step']}. {m['seconds'] / 60:.0f} min on 2 CPU cores. The recipe is the second tried: the first (each
  harmful {cats} example once) left both categories refusing 3 of 7 eval prompts.
- **Judged** once, on the eval split (greedy replies, `refusal_eval.metrics.is_refusal`, Wilson 95%):
  harmful prompts refused {show('harmful_refusal')}; benign prompts complied with {show('benign_compliance')};
  tricky benign prompts refused {show('tricky_benign_over_refusal')}.

Harmful prompts refused per category (eval split, 7 pairs each):

| category | refuser | eroded |
|---|---|---|
{rows}

Made by `python scripts/erode_smollm2_refusal.py --categories {' '.join(m['categories'])}`.
"""


if __name__ == "__main__":
    main()
