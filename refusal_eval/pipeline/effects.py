"""Stage 5 of an audit, the effects: every component patched on its pairs (exact patching, or gradient attribution
with exact checks of some cells), and the attribution estimates' measured error."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from refusal_eval.config import AuditConfig
from refusal_eval.errors import MetricError
from refusal_eval.patching.attribution import attribute
from refusal_eval.patching.components import Component
from refusal_eval.patching.exact import PairBatch, PatchEngine
from refusal_eval.pipeline.plan import PatchPlan
from refusal_eval.pipeline.scores import Scores
from refusal_eval.report import schema as rs
from refusal_eval.stats import ratio_of_sums

log = logging.getLogger("refusal_eval")


@dataclass
class AttributionCheck:
    """The cells of one attribution run that were also patched exactly: their rows, their estimated effects
    [len(rows), pairs] (NaN where a cell was not patched on a pair) and how many were top and random picks."""

    rows: np.ndarray
    estimated: np.ndarray
    n_top: int
    n_random: int


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
