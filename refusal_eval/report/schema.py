"""The audit report: every number a reader needs to trust, reproduce or gate on an audit."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from refusal_eval.errors import ReportError
from refusal_eval.patching.components import WRITER_KINDS

SCHEMA_VERSION = "1.8"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN and Infinity are never valid numbers


_SLACK = 1e-9  # rounding slack when checking that an interval holds its estimate


def _ordered(low: float | None, mid: float | None, high: float | None, what: str) -> None:
    """ValueError unless low <= mid <= high (each pair checked where both ends are given)."""
    values = [(n, v) for n, v in (("low", low), ("estimate", mid), ("high", high)) if v is not None]
    for (n1, v1), (n2, v2) in pairwise(values):
        if v1 > v2 + _SLACK * max(1.0, abs(v1), abs(v2)):
            raise ValueError(f"{what}: {n1} {v1} is above {n2} {v2}; an interval must hold its estimate")


class ModelInfo(_Model):
    name: str
    source: str = Field(description="local path, .gguf file or hub id the model was loaded from")
    architecture: str = Field(description="transformers model_type")
    adapter: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    n_params: int
    dtype: str
    device: str
    weights_sha256: str = Field(description="sha256 over parameter names, dtypes, shapes and bytes")


class Exclusion(_Model):
    pair_id: str
    reason: Literal["unequal_token_length", "baseline_wrong_sign"] = Field(
        description="baseline_wrong_sign appears only in reports of schema 1.0, which dropped pairs on their score"
    )
    detail: str


class DatasetInfo(_Model):
    path: str
    sha256: str
    split: str
    n_pairs: int = Field(description="pairs in the selected split")
    n_used: int = Field(description="pairs used for patching")
    exclusions: list[Exclusion]
    exclusion_counts: dict[str, int]
    alignment: Literal["full", "right", "mixed"] = Field(
        description="full: equal-length pairs, every position aligned; right: right-aligned on the shared suffix; "
        "mixed: every pair right-aligned at the shared suffix and last positions, all-position patches on the "
        "equal-length pairs only (see each component's n_pairs)"
    )
    n_aligned_positions: int = Field(description="positions (from the end) patchable on every used pair")
    n_full_pairs: int | None = Field(
        None, description="mixed alignment: used pairs with sides of equal token length (all-position patches)")
    tricky_path: str | None = None
    tricky_sha256: str | None = None
    n_tricky: int = 0
    calibration_path: str | None = Field(None, description="pairs whose replies chose the token sets (never scored)")
    calibration_sha256: str | None = None
    n_calibration: int = 0


class TokenInfo(_Model):
    id: int
    text: str
    count: int = Field(description="greedy completions that began with this token")


class BranchInfo(_Model):
    """An ambiguous first token and the second tokens after it: refusal, compliance, or dropped (both)."""

    token: TokenInfo = Field(description="the first token; its count is the calibration replies it opens")
    refusal_tokens: list[TokenInfo]
    compliance_tokens: list[TokenInfo]
    ambiguous_tokens: list[TokenInfo] = Field(
        default_factory=list, description="second tokens that opened both refusals and compliances: dropped")


class MetricInfo(_Model):
    form: Literal["logdiff", "logodds"]
    definition: str
    position: str
    refusal_tokens: list[TokenInfo]
    compliance_tokens: list[TokenInfo]
    derivation: str
    max_new_tokens: int
    token_set_source: str = Field(
        "scored pairs (schema 1.0: circular)",
        description="calibration (replies to pairs never scored), canonical (documented openings) or both",
    )
    ambiguous_tokens: list[TokenInfo] = Field(
        default_factory=list, description="first tokens that opened both refusals and compliances: in neither set "
        "(at depth 2, those in ``branches`` are split on the second token)"
    )
    depth: Literal[1, 2] = Field(1, description="the opening tree's depth (schema < 1.5: 1)")
    branches: list[BranchInfo] = Field(
        default_factory=list, description="depth 2: the ambiguous first tokens split on the second token, in the order "
        "their positions follow the prompt")

    def tree_key(self) -> tuple:
        """What defines the score: the leaves and branches by token id, and the form."""
        return (self.form, sorted(t.id for t in self.refusal_tokens), sorted(t.id for t in self.compliance_tokens),
                sorted((b.token.id, tuple(sorted(t.id for t in b.refusal_tokens)),
                        tuple(sorted(t.id for t in b.compliance_tokens))) for b in self.branches))


class Rate(_Model):
    successes: int
    total: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    method: str = "wilson"

    @classmethod
    def wilson(cls, successes: int, total: int, level: float) -> Rate:
        """A proportion with its Wilson interval, as reports store it (no interval where it is undefined)."""
        import math

        from refusal_eval.stats import wilson_interval

        low, high = wilson_interval(successes, total, level)
        return cls(successes=successes, total=total, rate=successes / total if total else None,
                   ci_low=None if math.isnan(low) else low, ci_high=None if math.isnan(high) else high)

    def clearly_above(self, other: Rate) -> bool:
        """This rate's interval lies wholly above ``other``'s: the behaviour gate (harmful refusal above benign
        over-refusal) that a model must pass to 'refuse measurably'."""
        return self.ci_low is not None and other.ci_high is not None and self.ci_low > other.ci_high

    @model_validator(mode="after")
    def _interval(self):
        if not 0 <= self.successes <= self.total:
            raise ValueError(f"successes {self.successes} must lie between 0 and total {self.total}")
        _ordered(self.ci_low, self.rate, self.ci_high, "rate")
        for v in (self.rate, self.ci_low, self.ci_high):
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"rate bound {v} is not a proportion in [0, 1]")
        return self


class Behaviour(_Model):
    harmful_refusal: Rate = Field(description="eval harmful prompts whose greedy reply is a refusal")
    benign_compliance: Rate = Field(description="eval benign prompts whose greedy reply is not a refusal")
    benign_over_refusal: Rate
    tricky_benign_over_refusal: Rate | None = None
    tricky_harmful_refusal: Rate | None = None
    refuses: bool | None = Field(
        None, description="behaviour gate: the harmful refusal interval lies wholly above the benign over-refusal one"
    )


class ScoreValidity(_Model):
    """Whether the refusal score tracks the model's refusals: how well each prompt's score predicts whether its greedy
    reply is a refusal (from schema 1.4)."""

    prompts: str = Field(description="which prompts: both sides of the scored pairs, or of the tricky pairs")
    n_refused: int
    n_answered: int
    auroc: float | None = Field(description="P(a refused prompt scores above an answered one), ties counting one half; "
                                "null when every prompt has the same verdict")
    ci_low: float | None = Field(description="percentile bootstrap over pairs (both prompts of a pair drawn together)")
    ci_high: float | None
    point_biserial: float | None = Field(description="correlation of the score with the 0/1 refusal verdict")
    p_point_biserial: float | None
    threshold: float = Field(description="the score does not track the refusals when the AUROC CI lies below this")
    tracks: bool | None = Field(description="false: the AUROC CI lies wholly below the threshold; null: undefined")
    words: str = Field(description="the same in words")


class StatsInfo(_Model):
    method: str
    level: float
    n_resamples: int
    seed: int
    unit: str = "pair"
    estimator: str = "ratio of sums over pairs"
    familywise: str = ("max-t bootstrap band over the components whose effects vary beyond the resolution, never "
                       "narrower than the marginal interval; the others keep their marginal interval")
    n_components: int = Field(description="components of the report")
    resolution_effect: float | None = Field(
        None, description="from schema 1.4: a component that moves no pair's score by more than this (score units: "
        "10 noise floors, at least 0.1% of the mean |gap|) is negligible: never significant, outside the family-wise "
        "maxima")
    resolution_share: float | None = Field(
        None, description="from schema 1.4: a significant component's family-wise interval clears 0 by more than this "
        "(10 noise floors in share units), so that float rounding cannot flip it")


class Gap(_Model):
    mean: float
    ci_low: float
    ci_high: float
    total: float = Field(description="sum over the pairs of m(harmful) - m(benign): the shares' denominator")
    separated: bool = Field(description="the gap CI lies above 0 (and, from schema 1.1, above config min_gap)")
    verdict: Literal["separated", "negligible", "inconclusive", "includes_zero", "reversed"] | None = Field(
        None, description="CI above the smallest gap that matters (config min_gap) and permutation p below 1 - level; "
        "above 0 but not shown to reach it; above 0 but the permutation test cannot exclude 0; containing 0; or "
        "wholly below 0 (harmful prompts score lower than benign ones)"
    )
    n_pairs: int | None = None
    p_permutation: float | None = Field(None, description="two-sided sign-flip permutation p-value of the mean gap",
                                        ge=0, le=1)

    @model_validator(mode="after")
    def _interval(self):
        _ordered(self.ci_low, self.mean, self.ci_high, "gap")
        return self


class PairResult(_Model):
    id: str
    category: str
    n_tokens_harmful: int
    n_tokens_benign: int
    m_harmful: float | None
    m_benign: float | None
    harmful_reply: str = Field(description="greedy reply; unless the audit ran with full_replies, cut where the "
                               "refusal matcher's verdict was settled (a refusal opening, or 80 characters without "
                               "one)")
    benign_reply: str = Field(description="as harmful_reply, for the benign prompt")
    harmful_refused: bool
    benign_refused: bool
    used: bool
    first_diff_offset: int | None = Field(None, description="position (from the end) of the first differing token")
    common_suffix: int = Field(description="trailing tokens both sides share")


class PositionInfo(_Model):
    position: int = Field(description="offset from the end of the prompt; -1 = last prompt token")
    n_pairs: int = Field(description="used pairs long enough to have this position")
    n_differ: int = Field(description="used pairs whose two sides hold different tokens here")
    harmful_text: str = Field(description="most common harmful-side token text here")
    benign_text: str


class ComponentResult(_Model):
    id: str
    hook_name: str
    kind: str
    layer: int
    head: int | None
    position: int | None = Field(description="offset from the end; null = all positions patched together")
    share: float | None = Field(description="null when the gap is not separated from 0")
    ci_low: float | None = Field(description="null when the share is undefined, or (from schema 1.3) an attribution "
                                 "estimate: a bootstrap over an estimate's pairs is no interval for the share")
    ci_high: float | None
    fw_low: float | None = Field(description="family-wise (simultaneous over all components) interval; null as "
                                 "ci_low is")
    fw_high: float | None
    significant: bool | None = Field(
        description="the family-wise interval excludes 0, the family-wise permutation p is below 1 - level, and the "
        "effect exceeds the noise floor; from schema 1.3 always false for an approximate (estimated) component"
    )
    p_permutation: float | None = Field(None, description="sign-flip permutation p-value of the summed effect; null "
                                        "for an approximate component (schema 1.3)")
    p_permutation_fw: float | None = Field(None, description="family-wise (max-T over all components) permutation p")
    noise_floor: float | None = Field(None, description="largest |score change| of an identity patch; null where "
                                      "not measured (from schema 1.6 the floor is measured on a sample of components)")
    within_noise: bool | None = Field(None, description="it moves the score, but no pair by more than the resolution "
                                      "(stats.resolution_effect; before schema 1.4: its own noise floor)")
    trivial: str | None = Field(None, description="why the patch is the run's whole input or output by construction")
    effects: list[float | None] = Field(
        description="per used pair: signed change in refusal score, same order as pairs; null where the component "
        "was not patched on that pair (mixed alignment: all-position patches need sides of equal token length)")
    n_pairs: int | None = Field(None, description="pairs this component was patched on")
    approximate: bool = Field(
        False, description="estimated by attribution patching, not patched exactly: the share is a point estimate "
        "with no interval and never significant (its error is measured on the verified cells: report.attribution)")

    @property
    def measured_significant(self) -> bool:
        """Significant and patched exactly (reports before schema 1.3 could flag an attribution estimate)."""
        return bool(self.significant) and not self.approximate

    @model_validator(mode="after")
    def _intervals(self):
        _ordered(self.ci_low, self.share, self.ci_high, f"{self.id} share CI")
        _ordered(self.fw_low, self.share, self.fw_high, f"{self.id} family-wise band")
        return self


class CategoryShare(_Model):
    n_pairs: int
    share: float | None
    ci_low: float | None
    ci_high: float | None


class ComponentHeterogeneity(_Model):
    """How evenly a top component's share is spread over pairs and categories."""

    id: str
    by_category: dict[str, CategoryShare]
    loo_min: float | None = Field(description="smallest share with one pair left out")
    loo_max: float | None
    largest_pair_fraction: float | None = Field(description="share of the net effect carried by the largest pair")
    largest_pair_id: str | None
    ratio_quantiles: list[float] | None = Field(description="10/50/90% quantiles of per-pair effect / gap")
    concentrated: bool = Field(description="one pair carries over half the effect, or leaving one out flips its sign")


class PermutationControl(_Model):
    method: str = "sign flips within pairs (harmful/benign labels swapped), two-sided; family-wise by max-T"
    n_permutations: int
    exact: bool = Field(description="all 2^n sign vectors were enumerated")
    seed: int
    gap_p: float | None
    gap_all_pairs_p: float | None
    n_components_p_below: int = Field(description="components whose family-wise permutation p is below 1 - level")


class Estimate(_Model):
    """A point estimate with its confidence interval (schema 1.7)."""

    estimate: float
    ci_low: float
    ci_high: float

    @model_validator(mode="after")
    def _interval(self):
        _ordered(self.ci_low, self.estimate, self.ci_high, "estimate")
        return self


class DirectionControl(_Model):
    """The refusal direction on the random-weights copy (schema 1.7): its best candidate (the filters' choice, else
    the candidate whose ablation lowers the harmful refusal score most), ablated on the scored pairs."""

    layer: int
    position: int
    chosen_by_filters: bool = Field(description="the selection's filters chose it; false: no candidate survived "
                                    "them and the best candidate by ablation is shown")
    gap_removed: Estimate = Field(
        description="mean over the patched pairs of the gap the ablation removes, (m_h - m_b) - (m_h ablated - m_b "
        "ablated), in score units: the copy has no gap to take a share of")
    includes_zero: bool = Field(description="its CI includes 0, as it must for a network with no refusal")
    words: str


class RandomControl(_Model):
    """The same audit on a seeded re-initialised copy of the model (same config and tokenizer)."""

    seed: int
    weights_sha256: str
    harmful_refusal: Rate
    benign_over_refusal: Rate
    refuses: bool
    gap: Gap
    gap_all_pairs: Gap
    refusal_tokens: list[str]
    compliance_tokens: list[str]
    shares_defined: bool = Field(description="under the audit's own rules")
    n_significant: int = Field(description="significant components under the audit's own rules")
    n_significant_forced: int = Field(description="significant components with the behaviour gate overridden")
    score_validity: ScoreValidity | None = Field(None, description="from schema 1.4: the copy's score against its "
                                                 "own replies")
    n_components: int
    n_permutation_p_below: int
    direction: DirectionControl | None = Field(None, description="from schema 1.7: the refusal direction's best "
                                               "candidate on the copy, ablated (null: not computed)")


class NoiseFloor(_Model):
    method: str = (
        "identity patch: each component patched with the target run's own activation through the engine's "
        "shortcuts and batching; the largest |score change| over pairs"
    )
    dtype: str
    max_abs: float = Field(description="the largest floor measured")
    median_abs: float = Field(description="the median floor of the components measured")
    n_measured: int | None = Field(None, description="components identity-patched (schema < 1.6: every component)")
    cells_per_stratum: int | None = Field(
        None, description="components sampled per stratum (kind, layer, position class: all positions, the last, any "
        "other); 0 or null: every component")
    n_strata: int | None = Field(None, description="strata sampled (those with a component that moves the score)")
    bound: float | None = Field(
        None, description="the floor the rules use: max_abs, times the sampling factor when sampled (schema < 1.6: "
        "max_abs)")
    n_within: int = Field(description="components that move the score, but no pair by more than the resolution "
                          "(stats.resolution_effect; before schema 1.4: their own noise floor)")
    n_exact_zero: int = Field(0, description="components that provably cannot move the score (exact zeros)")

    @property
    def rule_bound(self) -> float:
        """The floor the significance rules use: ``bound``, or ``max_abs`` in reports before schema 1.6."""
        return self.max_abs if self.bound is None else self.bound


class SearchStep(_Model):
    step: str = Field(description="coarse, attribution, refine, or sample N")
    patched: int = Field(description="cells patched exactly in this step")
    large: int = Field(description="of them, at |share| >= the search's keep_share")


class SearchInfo(_Model):
    """How the audit chose the cells it patched (schema 1.6): every cell of the grid (exhaustive), or coarse to fine
    (adaptive) with a sampled bound on the pruned cells. Shares here are the search's: mean effect over the mean
    gap, the gap taken as at least min_gap."""

    mode: Literal["adaptive", "exhaustive"]
    n_grid: int = Field(description="cells of the grid (components x positions asked for)")
    n_patched: int = Field(description="cells patched exactly: the report's components")
    n_trivial: int = Field(0, description="trivial cells (the run's whole input or output, the token swap) left out of "
                           "an adaptive search (schema 1.7; 0 in earlier reports)")
    keep_share: float | None = Field(description="a patched cell at least this large opens its kind and layer")
    bound_share: float | None = Field(description="the bound is on pruned cells at least this large")
    steps: list[SearchStep]
    n_attribution_flagged: int | None = Field(description="cells the gradient estimate flagged (patched exactly)")
    rounds: int = Field(description="random samples of the pruned cells drawn")
    n_pruned: int = Field(description="cells pruned when the last sample was drawn")
    n_sampled: int = Field(description="cells in the last sample")
    n_sampled_exceeding: int = Field(description="of them, at |share| >= bound_share")
    level: float | None
    bound_fraction: float | None = Field(
        description="one-sided Clopper-Pearson upper bound, at level, on the fraction of pruned cells at |share| >= "
        "bound_share; null when nothing was pruned")
    bound_holds: bool = Field(description="nothing pruned, or the last sample had no cell at |share| >= bound_share")
    summary: str


class Controls(_Model):
    permutation: PermutationControl
    random: RandomControl | None = None
    noise_floor: NoiseFloor | None = None


RANK_DECIMALS = 4


def rank_key(value: float | None) -> float:
    """Sort key for "largest |value| first": |value| rounded to ``RANK_DECIMALS``, so that values equal but for float
    noise (the last layer's MLP at every position and at the last one are the same patch) keep their listed order on
    every CPU (the sorts are stable)."""
    return -round(abs(value or 0.0), RANK_DECIMALS)


def rank_components(components: list[ComponentResult], legacy: bool = False) -> list[ComponentResult]:
    """Components with a defined share, largest |share| first (``rank_key``), leaving out the trivial ones (the run's
    whole input or output by construction). ``legacy``: schema-1.0 components carry no flag, so resid_pre at all
    positions is left out by kind."""
    return sorted(
        (c for c in components if c.share is not None and c.trivial is None
         and not (legacy and c.kind == "resid_pre" and c.position is None)),
        key=lambda c: rank_key(c.share),
    )


def rank_writers(components: list[ComponentResult]) -> list[ComponentResult]:
    """:func:`rank_components` restricted to the writers (attention outputs, MLP outputs, heads), or all of them when
    the audit patched no writer."""
    ranked = rank_components(components)
    writers = [c for c in ranked if c.kind in WRITER_KINDS]
    return writers if any(c.kind in WRITER_KINDS for c in components) else ranked


def direction_cosine(a: AuditReport, b: AuditReport) -> tuple[float | None, str | None]:
    """(cosine between two reports' refusal directions, None) or (None, why there is none): both need a stored
    direction, and the same architecture and hidden size (else their residual streams are different spaces)."""
    import math

    for tag, r in (("A", a), ("B", b)):
        d = r.refusal_direction
        if d is None:
            return None, (f"{tag} ({r.model.name}) has no refusal direction section (report schema "
                          f"{r.schema_version}; it came in 1.7)")
        if not d.computed or not d.vector:
            return None, f"{tag} ({r.model.name}) has no refusal direction: {d.reason}"
    va, vb = a.refusal_direction.vector, b.refusal_direction.vector
    if a.model.architecture != b.model.architecture or len(va) != len(vb):
        return None, (f"A is a {a.model.architecture} of hidden size {len(va)}, B a {b.model.architecture} of hidden "
                      f"size {len(vb)}: their residual streams are different spaces")
    norms = math.sqrt(math.fsum(x * x for x in va)) * math.sqrt(math.fsum(x * x for x in vb))
    if norms == 0.0:
        return None, "a stored direction has length 0"
    return max(-1.0, min(1.0, math.fsum(x * y for x, y in zip(va, vb, strict=True)) / norms)), None


def last_position_chain(components: list[ComponentResult]) -> list[ComponentResult]:
    """The residual stream at the last prompt token layer by layer (``resid_pre@-1``, non-trivial, with a share and
    a CI), in layer order: what the findings and the refusal direction's agreement read."""
    return sorted((c for c in components if c.kind == "resid_pre" and c.position == -1 and c.share is not None
                   and c.ci_low is not None and c.trivial is None), key=lambda c: c.layer)


class AttributionInfo(_Model):
    """The attribution (gradient) estimates' error, measured on the cells that were also patched exactly."""

    n_verified: int = Field(description="cells patched exactly (their ids: verified_ids); 0 under --method "
                            "attribution, where every share is an estimate of unknown error")
    n_top: int = Field(description="verified cells chosen as the largest estimates")
    n_random: int = Field(description="verified cells drawn at random from the others")
    spearman: float | None = Field(description="rank correlation of estimated and exact share (sum of effects over "
                                   "sum of gaps) over the verified cells; null with fewer than 3")
    max_abs_share_error: float | None = Field(
        None, description="largest |estimated share - exact share| over the verified cells, in share units "
        "(fractions of the gap); null when no cell was verified or shares are undefined (schema 1.3)")
    median_abs_share_error: float | None = Field(
        None, description="median |estimated share - exact share| over the verified cells, in share units")
    max_abs_score_error: float | None = Field(
        None, description="largest |estimated - exact| patched refusal score of one pair over the verified cells, in "
        "the refusal score's units (nats of log-probability); schema <= 1.2 called it max_abs_error")
    verified_ids: list[str] = Field(description="the components patched exactly; every other one is an estimate")

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data):
        if isinstance(data, dict) and "max_abs_error" in data:  # schema <= 1.2: the score-unit error, no unit given
            data = {k: v for k, v in data.items() if k != "max_abs_error"} | {
                "max_abs_score_error": data.get("max_abs_score_error", data["max_abs_error"])}
        return data


class EngineInfo(_Model):
    """How the exact patching engine ran: its shortcuts, its work and its memory."""

    batch_rows: int = Field(description="rows (pairs x patched variants) per forward pass, as resolved")
    layer_skip: bool = Field(description="patched forwards start at the first patched layer")
    prefix_reuse: bool = Field(description="patched forwards recompute only columns from the first patched one")
    patched_forwards: int = Field(description="batched forward passes run for patched cells")
    forward_equivalents: float = Field(
        description="work of the patched forwards (token x layer applications) over one forward of all used pairs"
    )
    weights_bytes: int
    peak_memory_bytes: int | None = Field(description="peak memory of the run (see peak_memory_kind)")
    peak_memory_kind: str


class Environment(_Model):
    python: str
    platform: str
    torch: str
    transformers: str
    refusal_eval: str
    threads: int


class DirectionFilters(_Model):
    """Arditi et al.'s selection filters, as ``refusal_eval.direction`` states them."""

    max_kl: float = Field(description="a candidate whose ablation moves the benign next-token distributions by a "
                          "larger mean KL (nats) is discarded")
    min_addition_change: float = Field(description="a candidate whose addition does not raise the mean benign "
                                       "refusal score above this is discarded")
    late_layer_fraction: float = Field(description="candidates in this last fraction of layers are discarded")
    late_layer_start: int = Field(description="the first layer so discarded")
    selection_fraction: float = Field(description="share of the calibration pairs held out to select on")
    positions: list[int] = Field(description="candidate positions, offsets from the end of the prompt")


class DirectionLayer(_Model):
    """The candidate of one layer at the chosen position, measured on the selection's ranking pairs (from schema 1.8;
    1.7: on the patched pairs): shares of those pairs' own gap."""

    layer: int
    norm: float = Field(description="length of the difference in means (0: both sides' activations are equal)")
    ablation: Estimate | None = Field(description="necessity share of the gap when its direction is ablated; null "
                                      "for a zero difference")
    addition: Estimate | None = Field(description="sufficiency share of the gap when it is added at this layer")
    kl_benign: Estimate = Field(description="mean KL(clean || ablated) of the benign next-token distributions, nats")
    discarded: list[str] = Field(description="why the selection's filters discard it (empty: it survives)")


class DirectionCosineResult(_Model):
    """Cosine between the direction and one of the top writers' mean harmful - benign output at the last prompt
    token (its layer and kind at position -1), with a pair-bootstrap CI; null where that difference is zero."""

    component: str = Field(description="the component whose difference is compared, at position -1")
    ranked: str = Field(description="the top writer of the audit it stands for")
    share: float | None = Field(description="that writer's share of the gap")
    cosine: float | None
    ci_low: float | None
    ci_high: float | None

    @model_validator(mode="after")
    def _interval(self):
        _ordered(self.ci_low, self.cosine, self.ci_high, f"{self.component} cosine")
        return self


class RefusalDirection(_Model):
    """The refusal direction (schema 1.7; Arditi et al. 2024): a difference in means of the residual stream, chosen on
    calibration pairs, and what ablating it (necessity) and adding it (sufficiency) do on the scored pairs. Measured
    through forward hooks only: no weights are changed or written. ``reason`` says why it was not computed or no
    direction was chosen; every other field is then null or empty as far as it was not reached."""

    method: str = ("difference in means (harmful - benign) of the residual stream entering a layer, at one of the "
                   "last prompt positions; chosen by Arditi et al.'s filters on a seeded held-out part of the "
                   "calibration pairs; ablation projects its unit direction out of every layer's input and every "
                   "attention and MLP output, addition adds the vector at its layer's input at every position")
    reason: str | None = Field(None, description="why no direction is reported (null: one is)")
    layer: int | None = None
    position: int | None = Field(None, description="offset from the end of the prompt (-1: the last prompt token)")
    norm: float | None = Field(None, description="length of the un-normalised difference in means")
    vector: list[float] | None = Field(
        None, description="the un-normalised difference in means (8 significant digits: float32 precision), for "
        "`compare` and the gate's cosine rule")
    selection: str | None = Field(None, description="the selection's choice, or why nothing survived, in words")
    filters: DirectionFilters | None = None
    n_candidates: int | None = None
    n_checked: int | None = Field(None, description="from schema 1.8: candidates measured on every selection pair and "
                                  "filtered, best ranked first (the others were ranked only, or are late or zero)")
    n_surviving: int | None = Field(None, description="of the candidates checked, those no filter discards")
    seed: int | None = Field(None, description="seed of the fit/selection split")
    fit_pair_ids: list[str] = Field(default_factory=list, description="calibration pairs the means were fitted on")
    selection_pair_ids: list[str] = Field(default_factory=list, description="calibration pairs it was selected on")
    rank_pair_ids: list[str] = Field(default_factory=list, description="from schema 1.8: the selection pairs whose "
                                     "harmful prompts rank every candidate by its ablation, and on which the per-layer "
                                     "candidates (layers) are measured")
    n_pairs: int | None = Field(None, description="patched pairs the shares, KL and cosines are measured on")
    necessity: Estimate | None = Field(None, description="sum(m_h - m_h ablated) / sum(gap): the share of the gap "
                                       "ablation removes on the harmful side")
    sufficiency: Estimate | None = Field(None, description="sum(m_b added - m_b) / sum(gap): the share of the gap "
                                         "addition induces on the benign side")
    p_necessity: float | None = Field(None, description="label-permutation p of the ablation's per-pair effects "
                                      "(harmful/benign swapped within pairs: sign flips), as every component's")
    p_sufficiency: float | None = Field(None, description="the same for the addition's per-pair effects")
    kl_benign: Estimate | None = Field(None, description="mean KL(clean || ablated) of the benign prompts' "
                                       "next-token distributions, nats")
    gap_removed: Estimate | None = Field(None, description="mean per pair of (m_h - m_b) - (m_h ablated - m_b "
                                         "ablated), score units (as the random-weights control reports it)")
    refusal_before: Rate | None = Field(None, description="harmful prompts refused (the audit's greedy replies)")
    refusal_after_ablation: Rate | None = Field(None, description="the same prompts' greedy replies with the "
                                                "direction ablated at every step")
    over_refusal_before: Rate | None = Field(None, description="benign prompts refused (the audit's greedy replies)")
    over_refusal_after_addition: Rate | None = Field(None, description="the same prompts with the direction added")
    tricky_over_refusal_before: Rate | None = None
    tricky_over_refusal_after_addition: Rate | None = None
    replies_after_ablation: list[str] = Field(
        default_factory=list, description="the first few harmful prompts' greedy replies with the direction ablated, "
        "as judged (cut where the verdict was settled unless the audit kept full replies)")
    replies_after_addition: list[str] = Field(
        default_factory=list, description="the first few benign prompts' greedy replies with the direction added: a "
        "reply that degenerates (repeated tokens) is no refusal to the matcher")
    cosines: list[DirectionCosineResult] = Field(default_factory=list)
    stream_layer: int | None = Field(None, description="the first layer whose resid_pre@-1 share's CI lies wholly "
                                     "above 0.5 (null: none, or not patched)")
    agreement: str | None = Field(None, description="whether the direction's layer and the patching view agree")
    layers: list[DirectionLayer] = Field(default_factory=list, description="every layer's candidate at the chosen "
                                         "position, on the ranking pairs: the per-layer picture")

    @property
    def computed(self) -> bool:
        """A direction was chosen and measured."""
        return self.reason is None and self.layer is not None


class AuditReport(_Model):
    """One model's refusal audit."""

    schema_version: Literal["1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "1.8"] = SCHEMA_VERSION
    created: str
    command: str
    config: dict
    model: ModelInfo
    dataset: DatasetInfo
    metric: MetricInfo
    direction: Literal["denoise", "noise"]
    method: Literal["exact", "attribution", "attribution+verify"] = "exact"
    attribution: AttributionInfo | None = None
    behaviour: Behaviour
    gap: Gap = Field(description="over the patched pairs: the shares' denominator")
    gap_all_pairs: Gap | None = Field(None, description="over every scored pair, patchable or not")
    gap_equal_length: Gap | None = Field(
        None, description="mixed alignment: over the equal-length pairs the all-position components use; their "
        "shares are undefined unless it is separated")
    shares_defined: bool | None = None
    shares_reason: str | None = Field(None, description="why shares are (un)defined, in words")
    search: SearchInfo | None = Field(None, description="which cells were patched and what the pruning may have "
                                      "missed (schema < 1.6, and attribution methods: null, every cell)")
    score_validity: ScoreValidity | None = Field(None, description="from schema 1.4: does the score track refusals")
    score_validity_tricky: ScoreValidity | None = Field(None, description="the same on the tricky pairs")
    stats: StatsInfo
    controls: Controls | None = None
    heterogeneity: list[ComponentHeterogeneity] = Field(
        default_factory=list, description="spread over pairs and categories of the 10 largest writers (attention "
        "outputs, MLP outputs, heads; before 2026-12-03 reports: the 10 largest components), from the recorded "
        "effects")
    findings: list[str] = Field(default_factory=list, description="what the numbers say, in words")
    pairs: list[PairResult]
    used_pair_ids: list[str]
    positions: list[PositionInfo]
    components: list[ComponentResult]
    warnings: list[str]
    environment: Environment
    engine: EngineInfo | None = None
    runtime_seconds: float
    refusal_direction: RefusalDirection | None = Field(
        None, description="from schema 1.7: the refusal direction (difference in means; ablation and addition), or "
        "why it was not computed (null in older reports; the top-level 'direction' is the patching direction)")

    def component(self, component_id: str) -> ComponentResult:
        """Look a component up by id (e.g. ``blocks.2.hook_mlp_out`` or ``blocks.1.hook_resid_pre@-3``)."""
        for c in self.components:
            if c.id == component_id:
                return c
        raise KeyError(component_id)


JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_id(name: str, version: str) -> str:
    """Stable ``$id`` of a report JSON Schema, e.g. ``urn:refusal-eval:schema:audit-report:1``: it names the major
    version only, so compatible minor versions (whose ``schema_version`` enum the schema lists) keep it."""
    return f"urn:refusal-eval:schema:{name}:{version.split('.')[0]}"


def json_schema_document(model: type[BaseModel], name: str, version: str, title: str) -> dict:
    """``model``'s JSON Schema (draft 2020-12) headed by ``$schema``, its stable ``$id`` and ``title``."""
    schema = model.model_json_schema()
    schema.pop("title", None)
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_id(name, version), "title": title, **schema}


def report_json_schema() -> dict:
    """JSON Schema of the audit report, generated from the pydantic models (stable ``$id``: major version)."""
    return json_schema_document(AuditReport, "audit-report", SCHEMA_VERSION, "refusal-eval audit report")


def read_json(path: str | Path) -> dict:
    """A report file's JSON object; ReportError names the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise ReportError(f"{path}: is a folder; give the report.json inside it")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ReportError(f"{path}: no such report file") from exc
    except UnicodeDecodeError as exc:
        raise ReportError(f"{path}: not UTF-8 text (byte {exc.start}); a report is the report.json a run "
                          "wrote") from exc
    except OSError as exc:
        raise ReportError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(raw, dict):
        raise ReportError(f"{path}: holds a JSON {type(raw).__name__}, not a report object")
    return raw


def validate_json(raw: dict, model: type[BaseModel], path: str | Path, what: str):
    """``model.model_validate(raw)``; ReportError lists the failing fields (at most 20) under the file's name."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "\n  ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in errors[:20]
        ) + (f"\n  … and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise ReportError(f"{path}: does not match {what}:\n  {problems}") from exc
