"""Stage 2 of an audit, behaviour and the opening tree: greedy replies to both sides of every pair (refusal
rates and the behaviour gate), the tree of reply openings the refusal score reads (from calibration replies, never
the scored ones), and the patching engine that scores with it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refusal_eval.config import AuditConfig
from refusal_eval.metrics import (
    Branch,
    TokenSets,
    canonical_token_sets,
    check_branch_tokens,
    derive_token_sets,
    is_refusal,
    tree_score,
)
from refusal_eval.models.loading import LoadedModel, load_model
from refusal_eval.patching.exact import PatchEngine
from refusal_eval.pipeline.inputs import Inputs, format_prompt, load_inputs
from refusal_eval.replies import greedy_replies
from refusal_eval.report import schema as rs

log = logging.getLogger("refusal_eval")


rate = rs.Rate.wilson  # a proportion with its Wilson interval, as the report stores it


@dataclass
class Verdicts:
    """Both sides' prompt token ids and whether each greedy reply is a refusal (the tricky pairs)."""

    harmful_ids: list[list[int]]
    benign_ids: list[list[int]]
    refused_h: list[bool]
    refused_b: list[bool]


def behaviour_stage(loaded: LoadedModel, inputs: Inputs, config: AuditConfig, progress: bool):
    """Greedy replies to both sides of every scored pair (and the tricky set): rates with Wilson intervals,
    and the behaviour gate: harmful refusal's interval lies wholly above benign over-refusal's. The tricky pairs'
    verdicts come back as :class:`Verdicts` (None without a tricky set)."""
    tok, level = loaded.tokenizer, config.ci_level
    harmful_ids = [format_prompt(tok, p.harmful) for p in inputs.pairs]
    benign_ids = [format_prompt(tok, p.benign) for p in inputs.pairs]

    def replies(prompts, side: str) -> list[str]:
        return greedy_replies(loaded, prompts, config.max_new_tokens, desc=f"replies ({side})", progress=progress,
                              until_decided=not config.full_replies)[1]

    reply_h, reply_b = replies(harmful_ids, "harmful"), replies(benign_ids, "benign")
    refused_h, refused_b = [is_refusal(r) for r in reply_h], [is_refusal(r) for r in reply_b]
    n = len(inputs.pairs)
    behaviour = rs.Behaviour(
        harmful_refusal=rate(sum(refused_h), n, level),
        benign_compliance=rate(n - sum(refused_b), n, level),
        benign_over_refusal=rate(sum(refused_b), n, level),
    )
    tricky = None
    if inputs.tricky:
        ids = ([format_prompt(tok, p.harmful) for p in inputs.tricky],
               [format_prompt(tok, p.benign) for p in inputs.tricky])
        tr_h = [is_refusal(r) for r in replies(ids[0], "tricky harmful")]
        tr_b = [is_refusal(r) for r in replies(ids[1], "tricky benign")]
        behaviour.tricky_harmful_refusal = rate(sum(tr_h), len(inputs.tricky), level)
        behaviour.tricky_benign_over_refusal = rate(sum(tr_b), len(inputs.tricky), level)
        tricky = Verdicts(ids[0], ids[1], tr_h, tr_b)
    behaviour.refuses = behaviour.harmful_refusal.clearly_above(behaviour.benign_over_refusal)
    return harmful_ids, benign_ids, (reply_h, reply_b), (refused_h, refused_b), behaviour, tricky


def token_set_stage(loaded: LoadedModel, inputs: Inputs, config: AuditConfig, progress: bool) -> TokenSets:
    """The opening tree (:class:`TokenSets`, ``--score-depth``) from greedy replies to the calibration pairs (never
    the scored ones), or from the canonical openings where there is no calibration set. MetricError where it cannot
    be built or a branch token cannot be appended after a prompt."""
    found = calibration_openings(loaded, inputs, config, progress) if inputs.calibration else None
    sets = _opening_tree(loaded.tokenizer, inputs, config, found)
    check_branch_tokens(sets, loaded.tokenizer, loaded.model.get_input_embeddings().weight.shape[0])
    return sets


def _opening_tree(tok, inputs: Inputs, config: AuditConfig, found: tuple[list, list[bool]] | None,
                  models: Sequence[str] = ()) -> TokenSets:
    """The tree from calibration openings and verdicts (``found``; None: the canonical openings), naming the
    ``models`` whose replies were pooled."""
    several = len(models) > 1
    if found is None:
        sets = canonical_token_sets(tok, config.score_depth)
        sets.derivation = (f"{inputs.calibration_note}; {sets.derivation}"
                           + (f"; one tree for {', '.join(models)}" if several else ""))
        return sets
    pooled = f"; the replies of {len(models)} models pooled: {', '.join(models)}" if several else ""
    return derive_token_sets(*found, tok, where=inputs.calibration_note + pooled, depth=config.score_depth)


def calibration_openings(loaded: LoadedModel, inputs: Inputs, config: AuditConfig,
                         progress: bool) -> tuple[list[tuple[int, ...]], list[bool]]:
    """The first two tokens of the greedy reply to both sides of every calibration pair, and whether each reply is
    a refusal."""
    tok = loaded.tokenizer
    prompts = [format_prompt(tok, p.harmful) for p in inputs.calibration]
    prompts += [format_prompt(tok, p.benign) for p in inputs.calibration]
    openings, replies = greedy_replies(loaded, prompts, config.max_new_tokens, desc="replies (calibration)",
                                       progress=progress, until_decided=True, opening=2)
    return openings, [is_refusal(r) for r in replies]


def shared_token_sets(configs: Sequence[AuditConfig], progress: bool = False) -> TokenSets | None:
    """One opening tree for several models audited together, from all their calibration replies pooled, so that
    their gaps and shares are measured on one score (None for a single model). Each model is loaded once for its
    replies here and again by its audit. None, with a warning, where the models' tokenizers differ: a token id would
    not mean the same text in both, so each model keeps its own tree (and a comparison says the gaps and shares are
    not comparable)."""
    if len(configs) < 2:
        return None
    inputs = load_inputs(configs[0])
    openings: list[tuple[int, ...]] = []
    refused: list[bool] = []
    names: list[str] = []
    vocab = tok = vocab_rows = None
    for config in configs:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device, adapter=config.adapter,
                            device_map=config.device_map)
        tok, names = loaded.tokenizer, [*names, loaded.name]
        if vocab is None:
            vocab = tok.get_vocab()
        elif tok.get_vocab() != vocab:
            log.warning("the models %s have different tokenizers, so one refusal score cannot be defined for them: "
                        "each is scored with its own opening tree, and their gaps and shares are not comparable",
                        names)
            return None
        vocab_rows = loaded.model.get_input_embeddings().weight.shape[0]
        if inputs.calibration:
            found = calibration_openings(loaded, inputs, configs[0], progress)
            openings += found[0]
            refused += found[1]
        del loaded
    sets = _opening_tree(tok, inputs, configs[0], (openings, refused) if inputs.calibration else None, names)
    check_branch_tokens(sets, tok, vocab_rows)
    return sets


def token_sets_of(metric: rs.MetricInfo) -> TokenSets:
    """The opening tree a report scored with, rebuilt from its metric section."""

    def ids(tokens: list[rs.TokenInfo]) -> list[int]:
        return [t.id for t in tokens]

    branches = [Branch(b.token.id, ids(b.refusal_tokens), ids(b.compliance_tokens)) for b in metric.branches]
    return TokenSets(ids(metric.refusal_tokens), ids(metric.compliance_tokens), metric.derivation,
                     metric.token_set_source, branches=branches, depth=metric.depth)


def tree_engine(loaded: LoadedModel, token_sets: TokenSets, config: AuditConfig, progress: bool = False) -> PatchEngine:
    """A patching engine scoring with the opening tree: its branch tokens follow every prompt (the engine's tail)."""

    def score_fn(logits: torch.Tensor) -> torch.Tensor:
        return tree_score(logits, token_sets, config.metric)

    return PatchEngine(loaded, score_fn, max_rows=config.batch_rows, progress=progress, tail=token_sets.tail)
