"""Stage 3 of an audit, scores and gap: both sides' refusal scores, the pairs that can be patched and how they
are aligned, the gap with its interval, permutation p and verdict, whether the score tracks the refusals, and the
rule that decides whether shares are defined."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from refusal_eval.config import AuditConfig
from refusal_eval.errors import DataError, MetricError
from refusal_eval.patching.exact import PatchEngine, with_tail
from refusal_eval.pipeline.behaviour import Verdicts
from refusal_eval.pipeline.inputs import Inputs
from refusal_eval.replies import left_pad
from refusal_eval.report import schema as rs
from refusal_eval.stats import MIN_SCORE_AUROC, mean_interval, score_auroc, sign_flip_test

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
