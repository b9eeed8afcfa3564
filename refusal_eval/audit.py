"""The audit pipeline, as stages: inputs -> behaviour -> token sets -> scores and gap -> effects -> statistics
-> controls -> report.

Each stage is a function of what the earlier ones produced. :func:`analyse` runs the model-touching stages on
one loaded model, so that the random-weights control (``--control random``) is the very same audit on a
re-initialised copy; :func:`audit` adds the inputs, the controls and the report around it.
"""

from __future__ import annotations

import logging
import platform
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from refusal_eval import __version__
from refusal_eval.config import AuditConfig
from refusal_eval.controls import (
    heterogeneity,
    last_position_finding,
    noise_floor_info,
    random_control,
    trivial_reason,
)
from refusal_eval.data.formats import PRESET_HUB_IDS, ColumnMap, load_pair_source
from refusal_eval.data.pairs import PromptPair, file_sha256, load_pairs, select_split, shipped_dataset
from refusal_eval.errors import DataError, MetricError
from refusal_eval.metrics import (
    Branch,
    TokenSets,
    canonical_token_sets,
    check_branch_tokens,
    derive_token_sets,
    is_refusal,
    tree_score,
)
from refusal_eval.models.loading import LoadedModel, check_device, load_model
from refusal_eval.patching.attribution import attribute
from refusal_eval.patching.components import Component, components_at
from refusal_eval.patching.exact import PairBatch, PatchEngine, build_pair_batch, noise_floor, with_tail
from refusal_eval.paths import portable
from refusal_eval.replies import greedy_replies, left_pad
from refusal_eval.report import schema as rs
from refusal_eval.resume import ResultsLog
from refusal_eval.stats import (
    MIN_SCORE_AUROC,
    Interval,
    PermutationResult,
    Resolution,
    _finite_or_none,
    beyond_noise,
    mean_interval,
    ratio_of_sums,
    resolution,
    score_auroc,
    share_intervals,
    sign_flip_test,
)

log = logging.getLogger("refusal_eval")


def format_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of one user turn through the model's chat template, ready for the first reply token."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of trailing tokens the two sequences share (the chat-template suffix and more)."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


rate = rs.Rate.wilson  # a proportion with its Wilson interval, as the report stores it


VERDICT_WORDS = {"separated": "is separated", "negligible": "is negligible", "inconclusive": "is inconclusive",
                 "includes_zero": "includes 0", "reversed": "is reversed"}


def gap_verdict(low: float, high: float, min_gap: float, p_value: float | None = None, alpha: float = 0.05) -> str:
    """'separated' (the interval lies above ``min_gap`` and the permutation test rejects 0), 'negligible' (above
    0, but not shown to reach ``min_gap``), 'inconclusive' (the interval lies above 0 but the permutation test
    cannot exclude 0: too few pairs for the bootstrap to be trusted), 'includes_zero', or 'reversed' (below 0:
    harmful prompts score lower)."""
    if low > 0 and p_value is not None and p_value >= alpha:
        return "inconclusive"
    if low >= min_gap and low > 0:
        return "separated"
    if low > 0:
        return "negligible"
    if high < 0:
        return "reversed"
    return "includes_zero"


# -- stage 1: inputs (everything read from disk before a model loads) ---------------------------------------------
@dataclass
class Inputs:
    """The scored pairs, the tricky-benign pairs and the calibration pairs of an audit."""

    dataset_path: Path
    fingerprint: str
    pairs: list[PromptPair]
    tricky_path: Path | None
    tricky: list[PromptPair]
    calibration_path: Path | None
    calibration: list[PromptPair]
    calibration_note: str
    notes: list[str] = field(default_factory=list)


def _calibration(
    config: AuditConfig, dataset_path: Path, everything: list[PromptPair], pairs: list[PromptPair]
) -> tuple[Path | None, list, str]:
    """Pairs whose replies choose the token sets: never a scored prompt (choosing them on the scored pairs
    manufactures a gap). --calibration FILE, else the dataset's other split (train for an eval audit)."""
    if config.token_sets == "canonical":
        return None, [], "canonical token sets requested (--token-sets canonical)"
    scored = {p.harmful.strip() for p in pairs} | {p.benign.strip() for p in pairs}
    if config.calibration:
        path = Path(config.calibration)
        candidates = load_pairs(path)
        where = f"--calibration {path}"
    else:
        other = {"eval": "train", "train": "eval"}.get(config.split)
        if other is None:
            return None, [], ("the whole dataset is scored (--split all), so no disjoint calibration pairs exist: "
                              "canonical token sets are used (pass --calibration FILE to derive them)")
        candidates = [p for p in everything if p.split == other]
        path, where = dataset_path, f"the {other} split of {dataset_path.name}"
        if not candidates:
            return None, [], (f"{dataset_path.name} has no {other} split to calibrate on: canonical token sets are "
                              "used (pass --calibration FILE to derive them)")
    kept = [p for p in candidates if p.harmful.strip() not in scored and p.benign.strip() not in scored]
    dropped = len(candidates) - len(kept)
    if not kept:
        raise DataError(f"{path}: every calibration pair shares a prompt with the scored pairs; calibration prompts "
                        "must be disjoint from the scored ones (use another file or --token-sets canonical)")
    if config.max_calibration_pairs:
        kept = kept[: config.max_calibration_pairs]
    note = f"{len(kept)} calibration pairs from {where}"
    if dropped:
        note += f" ({dropped} left out because they share a prompt with the scored pairs)"
    return path, kept, note


def load_inputs(config: AuditConfig) -> Inputs:
    """Read and validate every pair file the audit needs (errors name file and line, before any model work)."""
    dataset = config.dataset or (PRESET_HUB_IDS[config.preset] if config.preset else str(shipped_dataset()))
    dataset_path = Path(dataset)
    columns = ColumnMap(harmful=config.harmful_column, benign=config.benign_column, id=config.id_column,
                        category=config.category_column, split=config.split_column)
    source = load_pair_source(dataset, config.preset, columns, seed=config.seed)
    everything, notes = source.pairs, list(source.notes)
    if config.split != "all" and all(p.split is None for p in everything):
        notes.append(f"{dataset_path.name} has no split field: all {len(everything)} pairs are scored (--split "
                     f"{config.split} applies to files that mark their pairs)")
        pairs = everything
    else:
        pairs = select_split(everything, config.split, dataset_path)
    if config.max_pairs:
        pairs = pairs[: config.max_pairs]
    if config.tricky is None:
        tricky_path = shipped_dataset("tricky_benign.jsonl") if config.dataset is None and not config.preset else None
    else:
        tricky_path = Path(config.tricky) if config.tricky else None
    tricky = load_pairs(tricky_path) if tricky_path else []
    calibration_path, calibration, note = _calibration(config, dataset_path, everything, pairs)
    return Inputs(dataset_path, source.fingerprint, pairs, tricky_path, tricky, calibration_path, calibration, note,
                  notes)


# -- the model-touching stages ----------------------------------------------------------------------------------------
@dataclass
class Analysis:
    """What the stages computed for one model on the inputs (no report formatting)."""

    loaded: LoadedModel
    pairs: list[PromptPair]
    harmful_ids: list[list[int]]
    benign_ids: list[list[int]]
    replies: tuple[list[str], list[str]]
    refused: tuple[list[bool], list[bool]]
    behaviour: rs.Behaviour
    token_sets: TokenSets
    m_h: list[float]
    m_b: list[float]
    used: list[int]
    exclusions: list[rs.Exclusion]
    full_alignment: bool
    gap_all: rs.Gap
    gap: rs.Gap
    shares_defined: bool
    shares_reason: str
    validity: rs.ScoreValidity | None
    validity_tricky: rs.ScoreValidity | None
    engine: PatchEngine
    batch: PairBatch
    suffix: int
    components: list[Component]
    effects: np.ndarray
    approximate: np.ndarray
    attribution_info: rs.AttributionInfo | None
    permutation: PermutationResult
    intervals: Interval | None
    floor: np.ndarray | None
    resolution: Resolution
    significant: np.ndarray | None
    warnings: list[str] = field(default_factory=list)
    alignment: str = "full"
    on_full: np.ndarray | None = None  # [C] mixed alignment: the component was patched on equal-length pairs only
    full_cols: list[int] | None = None  # mixed alignment: columns of ``used`` whose sides have equal token length
    gap_full: rs.Gap | None = None  # mixed alignment: the gap over those pairs

    @property
    def gaps(self) -> np.ndarray:
        """[P] the patched pairs' gaps m_h - m_b, in the order of the effects' columns."""
        return np.array(self.m_h)[self.used] - np.array(self.m_b)[self.used]

    @property
    def largest_effect(self) -> np.ndarray:
        """[C] each component's largest |effect| over the pairs it was patched on."""
        return np.nanmax(np.abs(self.effects), axis=1)

    @property
    def refuses(self) -> bool:
        """The behaviour gate: harmful refusal's interval lies wholly above benign over-refusal's."""
        return bool(self.behaviour.refuses)

    @property
    def n_significant(self) -> int:
        return 0 if self.significant is None else int(self.significant.sum())


def check_prompt_lengths(loaded: LoadedModel, inputs: Inputs, config: AuditConfig) -> None:
    """DataError naming the pair when a chat-formatted prompt plus the reply would not fit the model's context
    (``max_position_embeddings``/``n_positions``); checked before any forward pass."""
    cfg = loaded.model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not limit:
        return
    room = int(limit) - config.max_new_tokens
    for what, pairs in (("pair", inputs.pairs), ("tricky pair", inputs.tricky),
                        ("calibration pair", inputs.calibration)):
        for pair in pairs:
            for side in ("harmful", "benign"):
                n = len(format_prompt(loaded.tokenizer, getattr(pair, side)))
                if n > room:
                    raise DataError(f"{what} {pair.id}: the {side} prompt is {n} tokens with the chat template; "
                                    f"with {config.max_new_tokens} reply tokens it exceeds the model's context of "
                                    f"{limit} positions. Shorten it or leave the pair out")


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


def _side_scores(engine: PatchEngine, seqs: list[list[int]], pad_id: int, desc: str = "scores",
                 progress: bool = False) -> list[float]:
    values: list[float] = []
    size = engine.rows(max(map(len, seqs), default=1))
    for start in tqdm(range(0, len(seqs), size), desc=desc, unit="batch", disable=not progress, leave=False):
        ids, mask = with_tail(*left_pad(seqs[start : start + size], pad_id), engine.tail)
        values.extend(engine.scores(ids, mask).tolist())
    return values


def _gap(values: np.ndarray, config: AuditConfig) -> rs.Gap:
    """The mean gap over these pairs: bootstrap CI, sign-flip permutation p and verdict."""
    p_value = float(sign_flip_test(values, config.n_permutations, config.seed).p[0])
    ci = mean_interval(values, config.ci_level, config.n_boot, config.ci_method, config.seed)
    verdict = gap_verdict(float(ci.low), float(ci.high), config.min_gap, p_value, 1 - config.ci_level)
    return rs.Gap(mean=float(ci.estimate), ci_low=float(ci.low), ci_high=float(ci.high), total=float(values.sum()),
                  separated=verdict == "separated", verdict=verdict, n_pairs=len(values), p_permutation=p_value)


def score_validity(m_h: Sequence[float], m_b: Sequence[float], refused_h: Sequence[bool], refused_b: Sequence[bool],
                   prompts: str, config: AuditConfig) -> rs.ScoreValidity:
    """Does the score track the refusals? AUROC (pair bootstrap CI) and point-biserial r of every prompt's score
    against its greedy reply's verdict, judged against ``stats.MIN_SCORE_AUROC`` (fixed before any model was audited
    with it)."""
    scores = np.concatenate([np.asarray(m_h, dtype=np.float64), np.asarray(m_b, dtype=np.float64)])
    refused = np.array(list(refused_h) + list(refused_b), dtype=bool)
    groups = np.concatenate([np.arange(len(m_h))] * 2)
    r = score_auroc(scores, refused, groups, config.ci_level, config.n_boot, config.seed)
    n, level = r.n_refused + r.n_answered, f"{config.ci_level:.0%}"
    if r.auroc is None:
        words = (f"undefined: all {n} prompts ({prompts}) were {'refused' if r.n_refused else 'answered'}, so there "
                 "is no refusal to predict")
        tracks = None
    else:
        tracks = not r.ci_high < MIN_SCORE_AUROC
        verdict = ("it tracks this model's refusals" if r.ci_low >= MIN_SCORE_AUROC else
                   f"it does not track this model's refusals (the interval lies below {MIN_SCORE_AUROC})"
                   if not tracks else f"it may not track this model's refusals (the interval reaches below "
                   f"{MIN_SCORE_AUROC})")
        pb = "" if r.point_biserial is None else f", point-biserial r {r.point_biserial:.2f}"
        words = (f"the refusal score ranks refused prompts above answered ones with AUROC {r.auroc:.3f} ({level} CI "
                 f"[{r.ci_low:.3f}, {r.ci_high:.3f}]) over {n} prompts ({prompts}: {r.n_refused} refused){pb}: "
                 f"{verdict}")
    return rs.ScoreValidity(prompts=prompts, n_refused=r.n_refused, n_answered=r.n_answered, auroc=r.auroc,
                            ci_low=r.ci_low, ci_high=r.ci_high, point_biserial=r.point_biserial,
                            p_point_biserial=r.p_point_biserial, threshold=MIN_SCORE_AUROC, tracks=tracks, words=words)


def _positions_wanted(config: AuditConfig, width: int, suffix: int) -> list[int | None]:
    wanted: set[int | None] = set()
    if "all" in config.positions:
        wanted.add(None)
    if "each" in config.positions:
        wanted.update(range(-width, 0))
    if "suffix" in config.positions:
        wanted.update(range(-suffix, 0))
    if "last" in config.positions:
        wanted.add(-1)
    return sorted(wanted, key=lambda p: (p is not None, p or 0))


def _shares_rule(behaviour: rs.Behaviour, refuses: bool, gap_all: rs.Gap, gap: rs.Gap, config: AuditConfig,
                 validity: rs.ScoreValidity | None = None):
    """(shares defined, reason in words, warnings) under the behaviour gate, the score-validity rule and the gap
    rule. ``--force-shares`` overrides the first two, never the gap."""
    level = f"{config.ci_level:.0%}"
    warnings: list[str] = []
    h, b = behaviour.harmful_refusal, behaviour.benign_over_refusal
    gate_words = (f"the model refuses {h.successes}/{h.total} harmful prompts ({level} CI [{h.ci_low:.2f}, "
                  f"{h.ci_high:.2f}]) and {b.successes}/{b.total} benign ones (CI [{b.ci_low:.2f}, {b.ci_high:.2f}])")
    for name, g in (("over the patched pairs", gap), ("over all scored pairs", gap_all)):
        if g.verdict == "reversed":
            warnings.append(f"REVERSED: {name} the model scores harmful prompts LOWER than benign ones (gap "
                            f"{g.mean:.3f}, {level} CI [{g.ci_low:.3f}, {g.ci_high:.3f}] lies below 0)")
    if gap_all.n_pairs != gap.n_pairs and gap_all.verdict != gap.verdict:
        warnings.append(f"the gap over all {gap_all.n_pairs} scored pairs {VERDICT_WORDS[gap_all.verdict]} "
                        f"({gap_all.mean:.3f} [{gap_all.ci_low:.3f}, {gap_all.ci_high:.3f}]) while over the "
                        f"{gap.n_pairs} patched pairs it {VERDICT_WORDS[gap.verdict]}")
    reasons = []
    if not refuses and not config.force_shares:
        reasons.append(f"no refusal behaviour to localise: {gate_words}; the intervals overlap")
    untracked = validity is not None and validity.tracks is False
    if untracked and not config.force_shares:
        reasons.append(f"the score does not track this model's refusals: {validity.words}; shares of this score "
                       "would not be shares of refusal")
    if gap.verdict != "separated":
        what = {"reversed": "lies below 0", "includes_zero": "includes 0",
                "inconclusive": "lies above 0, but the permutation test cannot exclude 0 "
                f"(p {gap.p_permutation or 1:.2g}): too few pairs",
                "negligible": f"lies above 0 but is not shown to reach the smallest gap that matters, --min-gap "
                f"{config.min_gap:.3f}"}[gap.verdict]
        reasons.append(f"the gap over the patched pairs is not separated ({level} CI [{gap.ci_low:.3f}, "
                       f"{gap.ci_high:.3f}] {what}): shares would be noise")
    if reasons:
        return False, "; and ".join(reasons), warnings
    if untracked:
        warnings.append(f"SHARES FORCED (--force-shares): {validity.words}; the shares describe the refusal score "
                        "only, not the model's refusals")
    if not refuses:
        warnings.append(f"SHARES FORCED (--force-shares): {gate_words}; the intervals overlap, so there is no "
                        "measurable refusal behaviour and the shares describe the refusal score only")
    if not refuses or untracked:
        what = "shows no measurable refusal" if not refuses else "has a score that does not track its refusals"
        return True, f"forced with --force-shares although the model {what}", warnings
    return True, "the model refuses harmful prompts more often than benign ones and the gap is separated", warnings


def patchable_pairs(pairs, harmful_ids, benign_ids, config: AuditConfig) -> tuple[list[int], list[rs.Exclusion], str]:
    """Indices of the pairs that can be patched, why the others cannot, and the alignment.

    Pairs are never dropped for their scores. Patching every position (or all at once) needs both sides to have
    the same length, while suffix and last-token patches right-align a pair, so:
    * ``full``: every pair has sides of equal length (or only 'all' was asked for: unequal pairs are left out);
    * ``right``: only 'suffix'/'last' positions: every pair, right-aligned;
    * ``mixed``: 'all'/'each' with some unequal pairs: every pair is patched at the positions of the shared
      suffix and the last one; the all-position patches (and 'each' before the suffix) use the equal-length pairs.
    """
    wants_full = bool({"all", "each"} & set(config.positions))
    equal = [len(h) == len(b) for h, b in zip(harmful_ids, benign_ids, strict=True)]
    aligned_positions = bool({"each", "suffix", "last"} & set(config.positions))
    if not wants_full:
        alignment = "right"
    elif all(equal) or not aligned_positions:
        alignment = "full"
    else:
        alignment = "mixed"
    exclusions: list[rs.Exclusion] = []
    used: list[int] = []
    for i, pair in enumerate(pairs):
        if alignment == "full" and not equal[i]:
            exclusions.append(rs.Exclusion(
                pair_id=pair.id, reason="unequal_token_length",
                detail=f"harmful side {len(harmful_ids[i])} tokens, benign side {len(benign_ids[i])} tokens; "
                "add 'last' or 'suffix' to --positions to patch such pairs at the aligned positions",
            ))
        else:
            used.append(i)
    if len(used) < 2:
        raise DataError(f"only {len(used)} pair(s) can be patched ({len(exclusions)} have sides of unequal token "
                        "length); patching needs at least 2. Use more pairs, pairs of equal token length, or "
                        "--positions all,suffix,last (right-aligned where lengths differ).")
    return used, exclusions, alignment


def effects_stage(engine: PatchEngine, batch: PairBatch, components: list[Component], config: AuditConfig,
                  base_h: np.ndarray, base_b: np.ndarray):
    """Per-component, per-pair effects [C, N] (denoise: patched - m(benign); noise: m(harmful) - patched), which
    of them are gradient estimates, and the attribution check where one ran (None for exact patching): an
    :class:`AttributionCheck` with the verified cells' estimated effects."""
    check = None
    approximate = np.zeros(len(components), dtype=bool)
    target = base_b if config.direction == "denoise" else base_h

    def effect(patched: np.ndarray) -> np.ndarray:
        return patched - base_b if config.direction == "denoise" else base_h - patched

    if config.method == "exact":
        patched = engine.patch(batch, components, config.direction).numpy().astype(np.float64)
    else:
        patched = attribute(engine, batch, components, config.direction).numpy().astype(np.float64)
        approximate[:] = True
        check = AttributionCheck(np.zeros(0, dtype=int), np.zeros((0, batch.n_pairs)), 0, 0)
        if config.method == "attribution+verify":
            patched, check = _verify(engine, batch, components, config, patched, approximate, target)
            check.estimated = effect(check.estimated)
    effects = effect(patched)
    bad = ~np.isfinite(effects)
    if bad.any():
        c, p = np.argwhere(bad)[0]
        raise MetricError(f"non-finite patched score for pair {batch.pair_ids[p]}, component {components[c].id}")
    return effects, approximate, check


@dataclass
class Scores:
    """Stage output: refusal scores of both sides of every pair, the pairs that can be patched and how they are
    aligned, the gap over those and over all pairs, and whether shares are defined."""

    m_h: list[float]
    m_b: list[float]
    used: list[int]
    exclusions: list[rs.Exclusion]
    alignment: str
    gaps: np.ndarray  # m_h - m_b over the used pairs
    gap: rs.Gap
    gap_all: rs.Gap
    shares_defined: bool
    shares_reason: str
    warnings: list[str]
    validity: rs.ScoreValidity | None = None
    validity_tricky: rs.ScoreValidity | None = None


def scores_stage(engine: PatchEngine, inputs: Inputs, harmful_ids, benign_ids, behaviour: rs.Behaviour,
                 config: AuditConfig, progress: bool, refused: tuple[list[bool], list[bool]] | None = None,
                 tricky: Verdicts | None = None) -> Scores:
    """Both sides' refusal scores (non-finite: MetricError naming the pair), the patchable pairs, the gaps, whether
    the score tracks the greedy replies' refusals (``refused``; the tricky pairs reported apart) and the rule that
    decides whether shares are defined."""
    pairs, pad = inputs.pairs, engine.loaded.tokenizer.pad_token_id
    m_h = _side_scores(engine, harmful_ids, pad, "scores (harmful)", progress)
    m_b = _side_scores(engine, benign_ids, pad, "scores (benign)", progress)
    for value, pair in zip(m_h + m_b, pairs + pairs, strict=True):
        if not np.isfinite(value):
            raise MetricError(f"pair {pair.id}: refusal score is not finite ({value}); check the model's dtype")
    warnings = []
    used, exclusions, alignment = patchable_pairs(pairs, harmful_ids, benign_ids, config)
    if exclusions:
        warnings.append(f"{len(exclusions)} of {len(pairs)} pair(s) cannot be patched at every position (sides of "
                        "unequal token length); the gap over all pairs is reported beside the patched pairs' gap")
    all_gaps = np.array(m_h) - np.array(m_b)
    gaps = all_gaps[used]
    gap = _gap(gaps, config)
    gap_all = gap if len(used) == len(pairs) else _gap(all_gaps, config)
    validity = validity_tricky = None
    if refused is not None:
        validity = score_validity(m_h, m_b, *refused, f"both sides of the {len(pairs)} scored pairs", config)
    if tricky is not None:
        t_h = _side_scores(engine, tricky.harmful_ids, pad, "scores (tricky harmful)", progress)
        t_b = _side_scores(engine, tricky.benign_ids, pad, "scores (tricky benign)", progress)
        validity_tricky = score_validity(t_h, t_b, tricky.refused_h, tricky.refused_b,
                                         f"both sides of the {len(t_h)} tricky pairs", config)
    shares_defined, shares_reason, rule_warnings = _shares_rule(behaviour, bool(behaviour.refuses), gap_all, gap,
                                                                config, validity)
    warnings += rule_warnings
    if not shares_defined:
        warnings.append(f"UNDEFINED SHARES: {shares_reason}")
    return Scores(m_h, m_b, used, exclusions, alignment, gaps, gap, gap_all, shares_defined, shares_reason, warnings,
                  validity, validity_tricky)


@dataclass
class PatchPlan:
    """Stage output: the components to patch and the pair batches they are patched on. ``families`` are
    (component rows, pair columns, batch): one family, or under mixed alignment the components patched at the
    aligned suffix on every pair and the all-position ones (``on_full``) on the equal-length pairs
    (``full_cols``, whose gap is ``gap_full``)."""

    batch: PairBatch
    suffix: int
    components: list[Component]
    families: list[tuple[np.ndarray, list[int], PairBatch]]
    on_full: np.ndarray | None
    full_cols: list[int] | None
    gap_full: rs.Gap | None
    warnings: list[str]


def plan_stage(loaded: LoadedModel, inputs: Inputs, harmful_ids, benign_ids, scores: Scores,
               config: AuditConfig, tail: Sequence[int] = ()) -> PatchPlan:
    """Which components are patched on which pairs (see :class:`PatchPlan`), with the score's branch tokens
    (``tail``) after every prompt; DataError when none can be."""
    tok, pairs, used = loaded.tokenizer, inputs.pairs, scores.used
    warnings = []
    batch = build_pair_batch([(harmful_ids[i], benign_ids[i]) for i in used], tok.pad_token_id,
                             [pairs[i].id for i in used], allow_unequal=scores.alignment != "full", tail=tail)
    suffix = min(common_suffix(harmful_ids[i], benign_ids[i]) for i in used)
    full_cols = gap_full = None
    if scores.alignment == "mixed":
        full_cols = [k for k, i in enumerate(used) if len(harmful_ids[i]) == len(benign_ids[i])]
        span = max(suffix, 1)  # right-aligned positions every pair shares (the last one always)
        width = max((len(harmful_ids[used[k]]) for k in full_cols), default=span)
        components = components_at(config.components, loaded.n_layers, loaded.n_heads,
                                   _positions_wanted(config, width, span))
        on_full = np.array([c.position is None or c.position < -span for c in components])
        if len(full_cols) < 2:
            warnings.append(f"only {len(full_cols)} of {len(used)} pair(s) have sides of equal token length: the "
                            "all-position patches (and 'each' before the shared suffix) need at least 2 and are "
                            "left out")
            components = [c for c, f in zip(components, on_full, strict=True) if not f]
            on_full = np.zeros(len(components), dtype=bool)
        if not components:
            raise DataError("no component can be patched: add 'last' or 'suffix' to --positions")
        if on_full.any():
            gap_full = _gap(scores.gaps[full_cols], config)
            warnings.append(f"mixed alignment: {len(used) - len(full_cols)} of {len(used)} pairs have sides of "
                            f"unequal token length; {int(on_full.sum())} all-position component(s) use the "
                            f"{len(full_cols)} equal-length pairs, the other {int((~on_full).sum())} use every pair "
                            f"(right-aligned: the last {span} position(s))")
        families = [(np.flatnonzero(~on_full), list(range(len(used))), batch)]
        if on_full.any():
            full_batch = build_pair_batch([(harmful_ids[used[k]], benign_ids[used[k]]) for k in full_cols],
                                          tok.pad_token_id, [batch.pair_ids[k] for k in full_cols], tail=tail)
            families.append((np.flatnonzero(on_full), full_cols, full_batch))
    else:
        components = components_at(config.components, loaded.n_layers, loaded.n_heads,
                                   _positions_wanted(config, batch.prompt_width, suffix))
        on_full = None
        families = [(np.arange(len(components)), list(range(len(used))), batch)]
    return PatchPlan(batch, suffix, components, families, on_full, full_cols, gap_full, warnings)


def patch_stage(engine: PatchEngine, plan: PatchPlan, scores: Scores, config: AuditConfig):
    """Effects [components, used pairs] of every family (NaN where a component is not patched on a pair), which
    are attribution estimates, and the attribution checks in the report's numbering."""
    used = scores.used
    base_h, base_b = np.array(scores.m_h)[used], np.array(scores.m_b)[used]
    log.info("patching %d components x %d pairs", len(plan.components), len(used))
    effects = np.full((len(plan.components), len(used)), np.nan)
    approximate = np.zeros(len(plan.components), dtype=bool)
    checks = []
    for rows, cols, fam_batch in plan.families:
        if not rows.size:
            continue
        fam_effects, fam_approx, check = effects_stage(engine, fam_batch, [plan.components[k] for k in rows], config,
                                                       base_h[cols], base_b[cols])
        effects[np.ix_(rows, cols)] = fam_effects
        approximate[rows] = fam_approx
        if check is not None:  # in the report's component and pair numbering
            estimated = np.full((check.rows.size, len(used)), np.nan)
            estimated[:, cols] = check.estimated
            checks.append(AttributionCheck(rows[check.rows], estimated, check.n_top, check.n_random))
    return effects, approximate, checks


def significance(effects: np.ndarray, gaps: np.ndarray, floor_max: float | None, shares_defined: bool,
                 config: AuditConfig) -> tuple[Resolution, PermutationResult, Interval | None, np.ndarray | None]:
    """The audit's decisions from its effects [C, N] (NaN: not patched on that pair) and gaps [N]: the resolution,
    the permutation test and, where shares are defined, the share intervals and the significance mask.

    What rounding could move (:func:`stats.resolution`, from the largest noise floor) decides nothing: negligible
    components stay out of both family-wise maxima and are never significant, and a family-wise interval must clear
    0 by more than 10 noise floors. A pair a component was not patched on adds nothing to its permutation statistic.
    """
    res = resolution(gaps, floor_max)
    measured = beyond_noise(effects, res.effect)
    permutation = sign_flip_test(np.nan_to_num(effects, nan=0.0), config.n_permutations, config.seed, family=measured)
    if not shares_defined:
        return res, permutation, None, None
    intervals = share_intervals(effects, gaps, config.ci_level, config.n_boot, config.ci_method, config.seed,
                                outside_family=~measured, tolerance=res.effect)
    significant = (((intervals.fw_low > res.share) | (intervals.fw_high < -res.share))
                   & (permutation.p_familywise < 1 - config.ci_level) & measured)
    return res, permutation, intervals, significant


@dataclass
class Statistics:
    """Stage output: the noise floor (None when not measured), the permutation test, and where shares are
    defined their intervals and the significance mask."""

    floor: np.ndarray | None
    resolution: Resolution
    permutation: PermutationResult
    intervals: Interval | None
    significant: np.ndarray | None
    warnings: list[str]


def statistics_stage(engine: PatchEngine, plan: PatchPlan, scores: Scores, effects: np.ndarray,
                     approximate: np.ndarray, config: AuditConfig, noise: bool | None, progress: bool) -> Statistics:
    """Noise floor (exact patching), sign-flip permutation test, bootstrap share intervals and significance."""
    used, gaps, warnings = scores.used, scores.gaps, []
    target = (np.array(scores.m_b) if config.direction == "denoise" else np.array(scores.m_h))[used]
    floor = None
    if (config.noise_floor if noise is None else noise) and config.method == "exact":
        work = dict(engine.work)  # the report's engine section describes the audit's patching, not this check
        floor = np.zeros(len(plan.components))
        for rows, cols, fam_batch in plan.families:
            if rows.size:
                floor[rows] = noise_floor(engine, fam_batch, [plan.components[k] for k in rows], config.direction,
                                          torch.tensor(target[cols], dtype=torch.float32)).numpy()
        engine.work = work
    bar = tqdm(total=2, desc="statistics (permutations, bootstrap)", disable=not progress, leave=False)
    res, permutation, intervals, significant = significance(
        effects, gaps, None if floor is None else float(floor.max(initial=0.0)), scores.shares_defined, config)
    bar.update(1)
    if intervals is not None:
        # An attribution estimate is a point estimate of unknown error: never significant (no interval of its own).
        significant &= ~approximate
        gap_full, on_full = plan.gap_full, plan.on_full
        if gap_full is not None and gap_full.verdict != "separated":
            for values in (intervals.estimate, intervals.low, intervals.high, intervals.fw_low, intervals.fw_high):
                values[on_full] = np.nan
            significant[on_full] = False
            warnings.append(f"UNDEFINED SHARES for the {int(on_full.sum())} all-position component(s): the gap over "
                            f"the {gap_full.n_pairs} equal-length pairs they use {VERDICT_WORDS[gap_full.verdict]} "
                            f"({gap_full.mean:.3f} [{gap_full.ci_low:.3f}, {gap_full.ci_high:.3f}])")
    bar.update(1)
    bar.close()
    return Statistics(floor, res, permutation, intervals, significant, warnings)


def analyse(
    loaded: LoadedModel, inputs: Inputs, config: AuditConfig, progress: bool = True, noise: bool | None = None,
    checkpoint: ResultsLog | None = None, token_sets: TokenSets | None = None,
) -> Analysis:
    """Run the model-touching stages on one model: token sets -> behaviour -> scores and gap -> plan -> effects ->
    statistics. ``checkpoint`` keeps (and on resume supplies) the patching engine's finished chunks; ``token_sets``
    (one tree for several models, :func:`shared_token_sets`) replaces the model's own."""
    torch.manual_seed(config.seed)
    check_prompt_lengths(loaded, inputs, config)
    # the opening tree first: a tree that cannot be built stops the audit before the scored replies are generated
    if token_sets is None:
        token_sets = token_set_stage(loaded, inputs, config, progress)
    harmful_ids, benign_ids, replies, refused, behaviour, tricky = behaviour_stage(loaded, inputs, config, progress)
    engine = tree_engine(loaded, token_sets, config, progress)
    engine.checkpoint = checkpoint
    scores = scores_stage(engine, inputs, harmful_ids, benign_ids, behaviour, config, progress, refused, tricky)
    plan = plan_stage(loaded, inputs, harmful_ids, benign_ids, scores, config, engine.tail)
    effects, approximate, checks = patch_stage(engine, plan, scores, config)
    stats = statistics_stage(engine, plan, scores, effects, approximate, config, noise, progress)
    attribution_info = None
    if config.method != "exact":
        attribution_info = attribution_summary(plan.components, effects, scores.gaps, checks,
                                               stats.intervals.estimate if stats.intervals is not None else None)
    return Analysis(
        loaded=loaded, pairs=inputs.pairs, harmful_ids=harmful_ids, benign_ids=benign_ids, replies=replies,
        refused=refused, behaviour=behaviour, token_sets=token_sets, m_h=scores.m_h, m_b=scores.m_b, used=scores.used,
        exclusions=scores.exclusions, full_alignment=scores.alignment == "full", gap_all=scores.gap_all,
        gap=scores.gap, shares_defined=scores.shares_defined, shares_reason=scores.shares_reason,
        validity=scores.validity, validity_tricky=scores.validity_tricky, engine=engine,
        batch=plan.batch, suffix=plan.suffix, components=plan.components, effects=effects, approximate=approximate,
        attribution_info=attribution_info, permutation=stats.permutation, intervals=stats.intervals,
        floor=stats.floor, resolution=stats.resolution, significant=stats.significant,
        warnings=list(token_sets.warnings) + scores.warnings + plan.warnings + stats.warnings,
        alignment=scores.alignment, on_full=plan.on_full, full_cols=plan.full_cols, gap_full=plan.gap_full,
    )


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


@dataclass
class AttributionCheck:
    """The cells of one attribution run that were also patched exactly: their rows, their estimated effects
    [len(rows), pairs] (NaN where a cell was not patched on a pair) and how many were top and random picks."""

    rows: np.ndarray
    estimated: np.ndarray
    n_top: int
    n_random: int


def _verify(engine, batch, components, config, estimated, approximate, target_scores):
    """Exact patching of the top-k cells by |estimated effect| and of a random sample of the rest: the patched
    scores with the exact values in place of the estimates there, and the check (with estimated patched scores)."""
    # Rank cells by how far their estimated patch moves the score, summed over pairs.
    order = np.argsort(-np.abs(estimated - target_scores[None, :]).sum(axis=1))
    top = [int(k) for k in order[: config.verify_top]]
    rest = [int(k) for k in order[config.verify_top :]]
    rng = np.random.default_rng(config.seed)
    sample = [int(k) for k in rng.choice(rest, size=min(config.verify_random, len(rest)), replace=False)]
    chosen = top + sample
    exact = engine.patch(batch, [components[k] for k in chosen], config.direction).numpy().astype(np.float64)
    corrected = estimated.copy()
    corrected[chosen] = exact
    approximate[chosen] = False
    return corrected, AttributionCheck(np.array(chosen, dtype=int), estimated[chosen], len(top), len(sample))


def attribution_summary(components: Sequence[Component], effects: np.ndarray, gaps: np.ndarray,
                        checks: Sequence[AttributionCheck], shares: np.ndarray | None) -> rs.AttributionInfo:
    """The attribution estimates' error on the cells patched exactly (over every family of components: mixed
    alignment patches two sets of pairs). ``effects`` holds the exact effects there, each check the estimated
    ones; ``shares`` are the report's shares (None or NaN where undefined). Errors in share units compare the
    estimated share (the same ratio of sums over the cell's pairs) with the exact one; the rank correlation is
    over the same ratios; the score-unit error is the largest single-pair difference."""
    from scipy.stats import spearmanr

    rows = np.concatenate([c.rows for c in checks]) if checks else np.zeros(0, dtype=int)
    n_top, n_random = sum(c.n_top for c in checks), sum(c.n_random for c in checks)
    if not rows.size:
        return rs.AttributionInfo(n_verified=0, n_top=0, n_random=0, spearman=None, verified_ids=[])
    estimated = np.concatenate([c.estimated for c in checks])
    exact = effects[rows]
    ratio_exact, ratio_est = ratio_of_sums(exact, gaps), ratio_of_sums(estimated, gaps)
    rho = float(spearmanr(ratio_exact, ratio_est).statistic) if rows.size > 2 else None
    share_errors = None
    if shares is not None:
        defined = np.isfinite(shares[rows])
        if defined.any():
            share_errors = np.abs(ratio_est - shares[rows])[defined]
    return rs.AttributionInfo(
        n_verified=int(rows.size), n_top=n_top, n_random=n_random,
        spearman=None if rho is None or not np.isfinite(rho) else rho,
        max_abs_share_error=None if share_errors is None else float(share_errors.max()),
        median_abs_share_error=None if share_errors is None else float(np.median(share_errors)),
        max_abs_score_error=float(np.nanmax(np.abs(estimated - exact))),
        verified_ids=[components[k].id for k in rows],
    )


# -- the report ---------------------------------------------------------------------------------------------------
def _environment() -> rs.Environment:
    return rs.Environment(
        python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
        transformers=transformers.__version__, refusal_eval=__version__, threads=torch.get_num_threads(),
    )


def _engine_info(engine: PatchEngine, loaded: LoadedModel, batch: PairBatch) -> rs.EngineInfo:
    """What the patching engine did and the run's peak memory (CUDA: allocator peak; CPU: process peak RSS)."""
    one_forward = batch.n_pairs * batch.width * loaded.n_layers
    if engine.device.type == "cuda":
        peak, kind = int(torch.cuda.max_memory_allocated(engine.device)), "CUDA allocator peak"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        kind = "peak resident memory of the whole process"
    return rs.EngineInfo(
        batch_rows=engine.work["batch_rows"] or engine.rows(batch.width), layer_skip=bool(engine._layer_skip),
        prefix_reuse=engine.work["prefix_batches"] > 0, patched_forwards=engine.work["patched_forwards"],
        forward_equivalents=round(engine.work["token_layers"] / one_forward, 2),
        weights_bytes=sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
        peak_memory_bytes=peak, peak_memory_kind=kind,
    )


def _component_results(a: Analysis) -> list[rs.ComponentResult]:
    iv, perm, floor = a.intervals, a.permutation, a.floor
    largest = a.largest_effect
    patched = np.isfinite(a.effects)
    out = []
    for k, c in enumerate(a.components):
        defined = iv is not None and np.isfinite(iv.estimate[k])
        # An estimate keeps its point value only: no interval, no p-value, never significant.
        exact = defined and not a.approximate[k]
        out.append(rs.ComponentResult(
            id=c.id, hook_name=c.hook_name, kind=c.kind, layer=c.layer, head=c.head, position=c.position,
            share=float(iv.estimate[k]) if defined else None,
            ci_low=_finite_or_none(iv.low[k]) if exact else None,
            ci_high=_finite_or_none(iv.high[k]) if exact else None,
            fw_low=_finite_or_none(iv.fw_low[k]) if exact else None,
            fw_high=_finite_or_none(iv.fw_high[k]) if exact else None,
            significant=(bool(a.significant[k]) and exact) if a.significant is not None and defined else None,
            p_permutation=None if a.approximate[k] else float(perm.p[k]),
            p_permutation_fw=None if a.approximate[k] else float(perm.p_familywise[k]),
            noise_floor=None if floor is None else float(floor[k]),
            within_noise=bool(0 < largest[k] <= a.resolution.effect),
            trivial=trivial_reason(c, a.loaded.n_layers),
            effects=[round(float(v), 6) if ok else None for v, ok in zip(a.effects[k], patched[k], strict=True)],
            n_pairs=int(patched[k].sum()),
            approximate=bool(a.approximate[k]),
        ))
    return out


ranked = rs.rank_components


def audit(config: AuditConfig | None = None, command: str = "", progress: bool = True,
          partial: str | Path | None = None, resume: bool = False,
          token_sets: TokenSets | None = None) -> rs.AuditReport:
    """Run a complete refusal audit and return the validated report (the report itself is not written).

    With ``partial`` (a ``partial.jsonl`` path), every finished chunk of patching is appended there as it is done
    (:class:`refusal_eval.resume.ResultsLog`); with ``resume`` the chunks already there are reused after the
    file's header (version, weights, dataset, options) is checked against this run. ``token_sets``: score with this
    opening tree (one tree for several models, :func:`shared_token_sets`) instead of the model's own."""
    config = config or AuditConfig()
    started = time.perf_counter()
    if config.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    check_device(config.device)
    inputs = load_inputs(config)
    log.info("loading model %s", config.model or "tiny-refuser")
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, adapter=config.adapter,
                        device_map=config.device_map)
    results_log = None
    if partial is not None:
        header = {"refusal_eval": __version__, "model": loaded.name, "weights_sha256": loaded.weights_sha256(),
                  "dataset_sha256": inputs.fingerprint, "config": config.model_dump()}
        results_log = ResultsLog(partial, header, resume)
    try:
        analysis = analyse(loaded, inputs, config, progress=progress, checkpoint=results_log, token_sets=token_sets)
        report = build_report(analysis, inputs, config, command, started, progress)
    finally:
        if results_log is not None:
            results_log.close()
    if results_log is not None and results_log.reused:
        log.warning("resumed: %d finished chunk(s) of patching read from %s", results_log.reused, partial)
    return report


def build_report(a: Analysis, inputs: Inputs, config: AuditConfig, command: str, started: float,
                 progress: bool = True) -> rs.AuditReport:
    """Assemble the validated report of an analysis, with its controls."""
    tok, loaded, batch, pairs = a.loaded.tokenizer, a.loaded, a.batch, inputs.pairs
    results = _component_results(a)
    warnings = list(inputs.notes) + list(a.warnings)
    random = None
    if "random" in config.controls:
        random = random_control(a, inputs, config, analyse, progress)
        if random.n_significant_forced:
            warnings.append(f"the random-weights control shows {random.n_significant_forced} significant "
                            "component(s) when its shares are forced: treat this model's circuit with caution")
    floor_info = noise_floor_info(a, config)
    positions = []
    for offset in range(-batch.prompt_width, 0):
        col = batch.prompt_width + offset
        real = batch.harmful_mask[:, col].bool() & batch.benign_mask[:, col].bool()
        if not real.any():
            continue
        h_tokens, b_tokens = batch.harmful_ids[real, col].tolist(), batch.benign_ids[real, col].tolist()
        positions.append(rs.PositionInfo(
            position=offset, n_pairs=int(real.sum()),
            n_differ=sum(x != y for x, y in zip(h_tokens, b_tokens, strict=True)),
            harmful_text=tok.decode([Counter(h_tokens).most_common(1)[0][0]]),
            benign_text=tok.decode([Counter(b_tokens).most_common(1)[0][0]]),
        ))
    used_set = set(a.used)
    pair_results = []
    for i, pair in enumerate(pairs):
        h, b = a.harmful_ids[i], a.benign_ids[i]
        diff = next((k for k in range(min(len(h), len(b))) if h[k] != b[k]), None)
        pair_results.append(rs.PairResult(
            id=pair.id, category=pair.category, n_tokens_harmful=len(h), n_tokens_benign=len(b),
            m_harmful=a.m_h[i], m_benign=a.m_b[i], harmful_reply=a.replies[0][i], benign_reply=a.replies[1][i],
            harmful_refused=a.refused[0][i], benign_refused=a.refused[1][i], used=i in used_set,
            first_diff_offset=None if diff is None or len(h) != len(b) else diff - len(h),
            common_suffix=common_suffix(h, b),
        ))
    ts = a.token_sets

    def token_infos(ids: list[int], counts: dict[int, int]) -> list[rs.TokenInfo]:
        return [rs.TokenInfo(id=t, text=tok.decode([t]), count=counts.get(t, 0)) for t in ids]

    both = {t: ts.refusal_counts.get(t, 0) + ts.compliance_counts.get(t, 0) for t in ts.ambiguous}

    counts = dict(Counter(e.reason for e in a.exclusions))
    model_cfg = loaded.model.config
    report = rs.AuditReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command,
        config={k: portable(v) if isinstance(v, str) else v for k, v in config.model_dump().items()},
        model=rs.ModelInfo(
            name=loaded.name, source=loaded.source, architecture=model_cfg.model_type,
            adapter=loaded.adapter.family, n_layers=loaded.n_layers, n_heads=loaded.n_heads,
            n_kv_heads=loaded.n_kv_heads, d_model=loaded.d_model,
            n_params=sum(p.numel() for p in loaded.model.parameters()), dtype=config.dtype, device=config.device,
            weights_sha256=loaded.weights_sha256(),
        ),
        dataset=rs.DatasetInfo(
            path=portable(str(inputs.dataset_path)), sha256=inputs.fingerprint, split=config.split,
            n_pairs=len(pairs), n_used=len(a.used), exclusions=a.exclusions, exclusion_counts=counts,
            alignment=a.alignment,
            n_aligned_positions=batch.prompt_width if a.full_alignment else max(a.suffix, 1) if a.alignment == "mixed"
            else a.suffix,
            n_full_pairs=len(a.full_cols) if a.full_cols is not None else None,
            tricky_path=portable(str(inputs.tricky_path)) if inputs.tricky_path else None,
            tricky_sha256=file_sha256(inputs.tricky_path) if inputs.tricky_path else None, n_tricky=len(inputs.tricky),
            calibration_path=portable(str(inputs.calibration_path)) if inputs.calibration_path else None,
            calibration_sha256=None if inputs.calibration_path is None else inputs.fingerprint
            if inputs.calibration_path == inputs.dataset_path else file_sha256(inputs.calibration_path),
            n_calibration=len(inputs.calibration),
        ),
        metric=rs.MetricInfo(
            form=config.metric,
            definition=(
                "log P(refusal tokens) - log P(compliance tokens)" if config.metric == "logdiff"
                else "log p - log(1 - p), p = P(refusal tokens)"
            ),
            position="last prompt token (the first response position), after the chat template" + (
                "; each branch token teacher-forced after it gives the second-token distribution" if ts.branches
                else ""),
            refusal_tokens=token_infos(ts.refusal, ts.refusal_counts),
            compliance_tokens=token_infos(ts.compliance, ts.compliance_counts),
            derivation=ts.derivation, max_new_tokens=config.max_new_tokens, token_set_source=ts.source,
            ambiguous_tokens=token_infos(ts.ambiguous, both), depth=ts.depth,
            branches=[rs.BranchInfo(
                token=token_infos([b.token], both)[0],
                refusal_tokens=token_infos(b.refusal, b.refusal_counts),
                compliance_tokens=token_infos(b.compliance, b.compliance_counts),
                ambiguous_tokens=token_infos(b.ambiguous, {t: b.refusal_counts.get(t, 0) + b.compliance_counts.get(t, 0)
                                                            for t in b.ambiguous}),
            ) for b in ts.branches],
        ),
        direction=config.direction,
        method=config.method,
        attribution=a.attribution_info,
        behaviour=a.behaviour,
        gap=a.gap,
        gap_all_pairs=a.gap_all,
        gap_equal_length=a.gap_full,
        shares_defined=a.shares_defined,
        shares_reason=a.shares_reason,
        score_validity=a.validity,
        score_validity_tricky=a.validity_tricky,
        stats=rs.StatsInfo(method=config.ci_method, level=config.ci_level, n_resamples=config.n_boot,
                           seed=config.seed, n_components=len(a.components),
                           resolution_effect=a.resolution.effect, resolution_share=a.resolution.share),
        controls=rs.Controls(
            permutation=rs.PermutationControl(
                n_permutations=a.permutation.n_permutations, exact=a.permutation.exact, seed=config.seed,
                gap_p=a.gap.p_permutation, gap_all_pairs_p=a.gap_all.p_permutation,
                n_components_p_below=int(((a.permutation.p_familywise < 1 - config.ci_level)
                                          & ~a.approximate).sum()),
            ),
            random=random, noise_floor=floor_info,
        ),
        heterogeneity=heterogeneity(results, a.gaps, [a.pairs[i].category for i in a.used], batch.pair_ids,
                                    config.ci_level, config.n_boot, config.seed) if a.shares_defined else [],
        findings=last_position_finding(results, a.gaps, config.ci_level, config.n_boot, config.ci_method,
                                       config.seed),
        pairs=pair_results,
        used_pair_ids=batch.pair_ids,
        positions=positions,
        components=results,
        warnings=warnings,
        environment=_environment(),
        engine=_engine_info(a.engine, loaded, batch),
        runtime_seconds=round(time.perf_counter() - started, 2),
    )
    return report


__all__ = ["Analysis", "Inputs", "analyse", "audit", "build_report", "load_inputs", "ranked"]
