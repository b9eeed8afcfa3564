"""Stage 6 of an audit, the statistics: the identity-patch noise floor (sampled), the sign-flip permutation test,
the share intervals and which components are significant."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_eval.config import AuditConfig
from refusal_eval.patching.components import Component
from refusal_eval.patching.exact import PatchEngine, noise_floor
from refusal_eval.pipeline.plan import PatchPlan
from refusal_eval.pipeline.scores import VERDICT_WORDS, Scores
from refusal_eval.stats import (
    Interval,
    PermutationResult,
    Resolution,
    beyond_noise,
    resolution,
    share_intervals,
    sign_flip_test,
)


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


# The sampled noise floor (issue 26): identity patches on config.noise_floor_cells (2) components of every stratum
# (kind, layer, position class: all positions, the last, any other single one), the batch layouts the engine's
# shortcuts use (layer skip starts at the component's layer; prefix reuse at the first differing column for all
# positions, at the component's own column for one). The rules use FLOOR_FACTOR times the largest sampled floor.
# Fixed in advance: on the committed reports, the full floor's largest value was at most 1.24 times a 2-per-stratum
# sample's over 2000 seeds (BENCHMARKS.md), and tests/test_noise_floor.py checks the bound against the full floor on
# the tiny refuser.
FLOOR_FACTOR = 4.0


def position_class(position: int | None) -> str:
    """A component's position as the engine's prefix reuse sees it: 'all', 'last' or 'other'."""
    return "all" if position is None else "last" if position == -1 else "other"


def floor_sample(components: list[Component], rows: np.ndarray, largest: np.ndarray, cells: int,
                 seed: int) -> np.ndarray:
    """Rows of ``rows`` (one family's components) whose identity patch measures the sampled floor: up to ``cells``
    per stratum (kind, layer, position class), drawn (seeded) among the components whose patch moved some pair
    (``largest`` [C] > 0: the others are exact zeros, idle in the engine, with a floor of exactly 0); every row when
    ``cells`` is 0."""
    if cells == 0:
        return rows
    strata: dict[tuple, list[int]] = {}
    for k in rows:
        if largest[k] > 0:
            c = components[k]
            strata.setdefault((c.kind, c.layer, position_class(c.position)), []).append(int(k))
    rng = np.random.default_rng(seed)
    chosen = [k for members in strata.values()
              for k in (members if len(members) <= cells else rng.choice(members, cells, replace=False))]
    return np.array(sorted(chosen), dtype=int)


def measure_floor(engine: PatchEngine, plan: PatchPlan, effects: np.ndarray, target: np.ndarray,
                  config: AuditConfig) -> tuple[np.ndarray, float]:
    """The identity-patch noise floor [C] (NaN where a component was not sampled) and the bound the rules use: the
    largest floor measured, times FLOOR_FACTOR when sampled."""
    work = dict(engine.work)  # the report's engine section describes the audit's patching, not this check
    floor = np.full(len(plan.components), np.nan)
    largest = np.nanmax(np.abs(effects), axis=1)
    for rows, cols, fam_batch in plan.families:
        sample = floor_sample(plan.components, rows, largest, config.noise_floor_cells, config.seed)
        if sample.size:
            floor[sample] = noise_floor(engine, fam_batch, [plan.components[k] for k in sample], config.direction,
                                        torch.tensor(target[cols], dtype=torch.float32)).numpy()
    engine.work = work
    if config.noise_floor_cells == 0:
        floor[np.isnan(floor)] = 0.0
        return floor, float(floor.max(initial=0.0))
    return floor, FLOOR_FACTOR * float(np.nanmax(floor, initial=0.0))


@dataclass
class Statistics:
    """Stage output: the noise floor (None when not measured; NaN for a component it was not sampled on) and the
    bound the rules use, the permutation test, and where shares are defined their intervals and the significance
    mask."""

    floor: np.ndarray | None
    floor_bound: float | None
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
    floor = bound = None
    if (config.noise_floor if noise is None else noise) and config.method == "exact":
        floor, bound = measure_floor(engine, plan, effects, target, config)
    bar = tqdm(total=2, desc="statistics (permutations, bootstrap)", disable=not progress, leave=False)
    res, permutation, intervals, significant = significance(effects, gaps, bound, scores.shares_defined, config)
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
    return Statistics(floor, bound, res, permutation, intervals, significant, warnings)
