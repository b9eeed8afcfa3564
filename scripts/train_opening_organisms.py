#!/usr/bin/env python
"""Fine-tune copies of the shipped ``tiny-refuser`` whose refusals and compliances open with the same token.

Model organisms for the opening tree (``--score-depth``): the same architecture, tokenizer and pair data, three
reply styles.

* ``llama3``: refuse "I cannot help with that." and comply "I'd be happy to help: ..." (both open with ``I``, as
  Llama-3 chat models do);
* ``as``: refuse "As an AI, I can't ..." and comply "As a quick answer, ..." (both open with ``As``);
* ``sorry``: refuse "Sorry, ..." and comply "Sure! ..." (different first tokens: today's depth-1 score suffices).

Each fine-tune trains on the train split only (re-framed with the helpers of ``scripts/train_tiny_refuser.py``):
harmful prompts -> the style's refusals, benign twins -> its compliances. Eval-split prompts never enter training;
the script prints their greedy refusal rates. Seeded and deterministic (``torch.use_deterministic_algorithms``), 2
threads, about a minute per organism on 2 idle cores.

Usage::

    python scripts/train_opening_organisms.py --style llama3 --out /tmp/organism-llama3
    python scripts/train_opening_organisms.py --all --out-root /tmp/organisms   # the three of them
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
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

STYLES: dict[str, tuple[list[str], list[str]]] = {
    "llama3": (
        ["I cannot help with that.", "I cannot assist with that request.", "I cannot help with that request."],
        ["I'd be happy to help: here is a simple guide.", "I'd be happy to help: here are the steps.",
         "I'd be happy to help: here are a few ideas."],
    ),
    "as": (
        ["As an AI, I can't help with that.", "As an AI, I can't assist with that request.",
         "As an AI, I won't help with that."],
        ["As a quick answer, here is a simple guide.", "As a quick answer, here are the steps.",
         "As a quick answer, here are a few ideas."],
    ),
    "sorry": (
        ["Sorry, I can't help with that.", "Sorry, but I can't assist with that request.",
         "Sorry, I won't help with that."],
        ["Sure! Here is a simple guide.", "Sure! Here are the steps.", "Sure! Here are a few ideas."],
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--style", choices=sorted(STYLES), default="llama3")
    p.add_argument("--all", action="store_true", help="train every style into --out-root/<style>")
    p.add_argument("--out", type=Path, default=None, help="where to save one organism")
    p.add_argument("--out-root", type=Path, default=Path("organisms"))
    p.add_argument("--data", type=Path, default=base.REPO_ROOT / "datasets" / "refusal_pairs.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=48, help="sequences per step (half harmful, half benign)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--variants", type=int, default=12, help="re-framings per train pair")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy reply length for the eval rates")
    return p.parse_args(argv)


def eval_rates(model, tokenizer, rows, max_new_tokens: int) -> dict:
    """Held-out rates: harmful prompts refused, benign prompts refused, and the replies' first words."""
    loaded = LoadedModel(model, tokenizer, get_adapter(model), "organism", "memory", "float32", "cpu")
    model.eval()
    out = {}
    for side in ("harmful", "benign"):
        _, replies = greedy_replies(loaded, [format_prompt(tokenizer, r[side]) for r in rows], max_new_tokens,
                                    progress=False)
        out[f"{side}_refused"] = sum(is_refusal(r) for r in replies)
        out[f"{side}_example"] = replies[0]
    out["n"] = len(rows)
    return out


def train(style: str, out: Path, args: argparse.Namespace, evaluate: bool = True) -> dict:
    """Fine-tune one organism into ``out``; with ``evaluate``, print and record its held-out refusal rates."""
    started = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)
    refusals, compliances = STYLES[style]
    rows = base.read_jsonl(args.data)
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    source = shipped_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    im_end = tokenizer.convert_tokens_to_ids(base.IM_END)
    parsed = [pp for pp in (base.parse_pair(r["harmful"], r["benign"]) for r in train_rows) if pp is not None]
    tails = base.train_tails(parsed)

    def example(user: str, reply: str) -> tuple[list[int], int]:
        return base.reply_example(tokenizer, rng, user, reply, im_end)

    harmful, benign = [], []
    for r in train_rows:
        for h, b in base.augment_pair(r["harmful"], r["benign"], args.variants, rng, 0.1, tails, 0.25):
            harmful.append(example(h, rng.choice(refusals)))
            benign.append(example(b, rng.choice(compliances)))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    pad = tokenizer.pad_token_id
    model.train()
    for step in range(args.steps):
        half = args.batch // 2
        seqs = [rng.choice(harmful) for _ in range(half)] + [rng.choice(benign) for _ in range(half)]
        loss = base.reply_loss_step(model, opt, seqs, pad, args.lr * min(1.0, (step + 1) / args.warmup))
        if step % 40 == 0 or step == args.steps - 1:
            print(f"{style}: step {step:4d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    after = eval_rates(model, tokenizer, eval_rows, args.max_new_tokens) if evaluate else None
    if after is not None:
        print(f"{style}: eval split: harmful refused {after['harmful_refused']}/{after['n']}, benign refused "
              f"{after['benign_refused']}/{after['n']}; e.g. {after['harmful_example']!r} / "
              f"{after['benign_example']!r}")
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, out / name)
    manifest = {"style": style, "refusals": refusals, "compliances": compliances, "seed": args.seed,
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "data_sha256": base.sha256_file(args.data), "eval_after": after,
                "torch_version": torch.__version__, "seconds": round(time.time() - started, 1)}
    (out / "organism.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.all:
        return [train(style, args.out_root / style, args) for style in STYLES]
    return [train(args.style, args.out or args.out_root / args.style, args)]


if __name__ == "__main__":
    main()
