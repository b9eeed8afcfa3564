#!/usr/bin/env python
"""Fine-tune a copy of the shipped ``tiny-refuser`` so it stops refusing ONE harm category.

A second model organism for ``refusal-eval compare``: the same architecture and tokenizer, trained on

* the chosen category's **train-split** harmful prompts (and their templated re-framings, built with the
  helpers of ``scripts/train_tiny_refuser.py``) paired with *compliance* replies, so the model learns to
  answer them, and
* replay of every other category's train pairs (re-framed the same way) with their original targets
  (harmful -> refusal, benign -> compliance), plus the chosen category's benign twins -> compliance, so
  the rest of the behaviour is preserved.

Eval-split prompts never enter training; the script prints eval-split refusal rates per category before
and after (greedy replies, classified by ``refusal_eval.metrics.is_refusal`` exactly as an audit does).
Seeded and deterministic (``torch.use_deterministic_algorithms``; reruns give byte-identical weights), 2
threads; under a minute on 2 idle cores. The weights it writes by default are committed as
``examples/tiny-refuser-no-drugs/`` (3.6 MB), so the README's comparison example needs no training; rerunning
the script rewrites them byte for byte.

Usage::

    python scripts/finetune_stop_refusing.py     # --category drugs --out examples/tiny-refuser-no-drugs
    refusal-eval run --model tiny-refuser --model examples/tiny-refuser-no-drugs
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import train_tiny_refuser as base  # noqa: E402  (also pins the tokenizer's threads)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from refusal_eval.audit import format_prompt, greedy_replies  # noqa: E402
from refusal_eval.metrics import is_refusal  # noqa: E402
from refusal_eval.models.adapters import get_adapter  # noqa: E402
from refusal_eval.models.loading import LoadedModel, shipped_model_path  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--category", default="drugs", help="harm category to stop refusing (default: drugs)")
    p.add_argument("--data", type=Path, default=base.REPO_ROOT / "datasets" / "refusal_pairs.jsonl")
    p.add_argument("--source", type=Path, default=None, help="model to start from (default: shipped tiny-refuser)")
    p.add_argument("--out", type=Path, default=base.REPO_ROOT / "examples" / "tiny-refuser-no-drugs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64, help="sequences per step")
    p.add_argument("--target-fraction", type=float, default=0.3,
                   help="share of each batch drawn from the chosen category's harmful prompts")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--variants", type=int, default=40, help="re-framings per chosen-category train pair")
    p.add_argument("--replay-variants", type=int, default=12, help="re-framings per replayed train pair")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy reply length for the eval rates")
    return p.parse_args(argv)


def eval_rates(model, tokenizer, rows, max_new_tokens: int) -> dict[str, dict[str, int]]:
    """Per category: harmful prompts refused and benign prompts refused (greedy, audit's matcher)."""
    loaded = LoadedModel(model, tokenizer, get_adapter(model), "finetune", "memory", "float32", "cpu")
    model.eval()
    _, reply_h = greedy_replies(loaded, [format_prompt(tokenizer, r["harmful"]) for r in rows], max_new_tokens,
                                progress=False)
    _, reply_b = greedy_replies(loaded, [format_prompt(tokenizer, r["benign"]) for r in rows], max_new_tokens,
                                progress=False)
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "harmful_refused": 0, "benign_refused": 0})
    for r, rh, rb in zip(rows, reply_h, reply_b, strict=True):
        c = out[r["category"]]
        c["n"] += 1
        c["harmful_refused"] += is_refusal(rh)
        c["benign_refused"] += is_refusal(rb)
    return dict(sorted(out.items()))


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)

    rows = base.read_jsonl(args.data)
    categories = sorted({r["category"] for r in rows})
    if args.category not in categories:
        raise SystemExit(f"unknown category {args.category!r}; choose one of {', '.join(categories)}")
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    target_rows = [r for r in train_rows if r["category"] == args.category]
    replay_rows = [r for r in train_rows if r["category"] != args.category]

    source = args.source or shipped_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    im_end = tokenizer.convert_tokens_to_ids(base.IM_END)

    before = eval_rates(model, tokenizer, eval_rows, args.max_new_tokens)

    # -- data: (token ids, prompt length) examples, reply tokens + <|im_end|> are the targets ---------------
    parsed = [pp for pp in (base.parse_pair(r["harmful"], r["benign"]) for r in train_rows) if pp is not None]
    tails = base.train_tails(parsed)

    def example(user: str, reply: str) -> tuple[list[int], int]:
        return base.reply_example(tokenizer, rng, user, reply, im_end)

    target, replay = [], []
    for r in target_rows:
        for h, b in base.augment_pair(r["harmful"], r["benign"], args.variants, rng, 0.1, tails, 0.25):
            target.append(example(h, rng.choice(base.COMPLIANCES)))
            replay.append(example(b, rng.choice(base.COMPLIANCES)))
    for r in replay_rows:
        for h, b in base.augment_pair(r["harmful"], r["benign"], args.replay_variants, rng, 0.1, tails, 0.25):
            replay.append(example(h, rng.choice(base.REFUSALS)))
            replay.append(example(b, rng.choice(base.COMPLIANCES)))
    print(f"data: {len(target_rows)} train pairs of '{args.category}' -> {len(target)} harmful prompts with "
          f"compliance replies; replay {len(replay)} sequences ({len(replay_rows)} other train pairs + "
          f"'{args.category}' benign twins)")

    # -- training ---------------------------------------------------------------------------------------------
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    n_target = max(1, round(args.batch * args.target_fraction))
    pad = tokenizer.pad_token_id
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        seqs = [rng.choice(target) for _ in range(n_target)]
        seqs += [rng.choice(replay) for _ in range(args.batch - n_target)]
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        loss = base.reply_loss_step(model, opt, seqs, pad, lr)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {lr:.1e}  {time.time() - t_train:.0f}s", flush=True)
    model.eval()

    after = eval_rates(model, tokenizer, eval_rows, args.max_new_tokens)
    print("\neval split (held out), greedy replies: harmful prompts refused per category")
    print(f"{'category':18s} {'before':>9s} {'after':>9s}")
    for cat in categories:
        b, a = before[cat], after[cat]
        mark = "  <- fine-tuned to comply" if cat == args.category else ""
        print(f"{cat:18s} {b['harmful_refused']:>4d}/{b['n']:<4d} {a['harmful_refused']:>4d}/{a['n']:<4d}{mark}")
    tot = {k: {f: sum(v[f] for v in d.values()) for f in ("n", "harmful_refused", "benign_refused")}
           for k, d in (("before", before), ("after", after))}
    others = {k: {f: sum(v[f] for c, v in d.items() if c != args.category) for f in ("n", "harmful_refused")}
              for k, d in (("before", before), ("after", after))}
    print(f"{'other categories':18s} {others['before']['harmful_refused']:>4d}/{others['before']['n']:<4d} "
          f"{others['after']['harmful_refused']:>4d}/{others['after']['n']:<4d}")
    print(f"{'benign refused':18s} {tot['before']['benign_refused']:>4d}/{tot['before']['n']:<4d} "
          f"{tot['after']['benign_refused']:>4d}/{tot['after']['n']:<4d}")

    # -- save: weights + the source's tokenizer files -------------------------------------------------------
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, out / name)
    manifest = {
        "source": str(source), "category": args.category, "seed": args.seed,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data_sha256": base.sha256_file(args.data), "n_target_sequences": len(target),
        "n_replay_sequences": len(replay), "torch_version": torch.__version__,
        "eval_before": before, "eval_after": after, "train_seconds": round(time.time() - t_train, 1),
    }
    (out / "finetune_metrics.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"saved to {out} ({time.time() - started:.0f}s in all)")
    return manifest


if __name__ == "__main__":
    main()
