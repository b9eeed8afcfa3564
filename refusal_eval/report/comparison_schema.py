"""The comparison report's schema: the pydantic models of ``comparison.json`` (written by ``refusal-eval compare``).

Kept apart from :mod:`refusal_eval.compare` (which needs numpy, scipy and matplotlib) so that ``validate`` and
``schema`` stay light; ``refusal_eval.compare`` re-exports every name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from refusal_eval.report.schema import Gap, Rate, json_schema_document, read_json, validate_json

COMPARISON_SCHEMA_VERSION = "1.3"
BEHAVIOUR_METHOD = (
    "Wilson interval per rate; difference B − A with Newcombe's hybrid-score interval (method 10, built from "
    "the two Wilson intervals, treating A and B as independent samples: conservative when they scored the "
    "same prompts). Where both reports list per-prompt outcomes for the same prompts, the discordant counts "
    "and an exact McNemar test (binomial on the discordant prompts) are added."
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Side(_Model):
    """Identity of one of the two compared audits."""

    name: str
    source: str
    weights_sha256: str
    report_created: str
    command: str
    dataset_path: str
    dataset_sha256: str
    split: str
    tricky_sha256: str | None
    n_pairs: int = Field(description="pairs in the audited split")
    n_used: int = Field(description="pairs the audit used for patching")
    direction: str
    metric: str
    refusal_tokens: list[str]
    compliance_tokens: list[str]
    score_depth: int = Field(1, description="the depth of the report's opening tree (schema < 1.1: 1)")
    branches: list[str] = Field(default_factory=list, description="depth 2: the first tokens split on the next one")
    gap: Gap = Field(description="the report's own gap (over its used pairs)")
    shares_defined: bool = Field(description="the report's gap is separated from 0, so its shares are defined")


class ComponentChange(_Model):
    id: str
    kind: str
    layer: int
    head: int | None
    position: int | None = Field(description="offset from the end; null = all positions patched together")
    share_a: float
    share_a_low: float
    share_a_high: float
    share_b: float
    share_b_low: float
    share_b_high: float
    diff: float = Field(description="share in B − share in A")
    ci_low: float
    ci_high: float
    fw_low: float = Field(description="family-wise (max-t, simultaneous over all compared components) interval")
    fw_high: float
    significant: bool = Field(description="the family-wise interval excludes 0 and |diff| >= min_diff")
    rank: int | None = Field(description="1 = largest |diff| among significant changes; null if not significant")


class RateChange(_Model):
    measure: str
    a: Rate
    b: Rate
    diff: float | None = Field(description="rate in B − rate in A")
    ci_low: float | None
    ci_high: float | None
    significant: bool | None = Field(description="the difference interval excludes 0")
    paired: bool = Field(description="computed on the same prompts, with per-prompt outcomes")
    a_only: int | None = Field(None, description="paired: prompts with the outcome in A but not in B")
    b_only: int | None = Field(None, description="paired: prompts with the outcome in B but not in A")
    mcnemar_p: float | None = Field(None, description="paired: exact McNemar p-value on the discordant prompts")


class DirectionChange(_Model):
    """(schema 1.3) The two audits' refusal directions: the cosine between them (their stored vectors) and the change
    of the refusal left after ablating each."""

    layer_a: int | None
    position_a: int | None
    layer_b: int | None
    position_b: int | None
    cosine: float | None = Field(description="cosine between A's and B's directions; null where either has none, or "
                                 "the models differ in architecture or hidden size")
    reason: str | None = Field(None, description="why there is no cosine")
    refusal_after_ablation: RateChange | None = Field(
        None, description="refusal on harmful prompts with each model's own direction ablated, B - A (Newcombe, "
        "unpaired)")
    words: str


class CategoryChange(_Model):
    category: str
    n_a: int
    n_b: int
    refused_a: int = Field(description="harmful prompts of this category refused by A")
    refused_b: int
    rate_a: float
    rate_b: float
    diff: float
    ci_low: float
    ci_high: float
    significant: bool = Field(description="the (unadjusted) Newcombe interval excludes 0")
    a_only: int | None = None
    b_only: int | None = None
    mcnemar_p: float | None = None
    p_value: float | None = Field(None, description="(schema 1.2) the category's unadjusted test of no change: exact "
                                  "McNemar on the same prompts, else Fisher's exact test")
    test: Literal["mcnemar", "fisher"] | None = Field(None, description="(schema 1.2) which test gave p_value")
    p_holm: float | None = Field(None, description="(schema 1.2) p_value Holm-adjusted over all compared categories")
    changed: bool | None = Field(None, description="(schema 1.2) p_holm below 1 - level: the refusal rate changed, "
                                 "with the family-wise error over the categories controlled")
    gap_a: float | None = Field(description="mean m(harmful) − m(benign) over this category's pairs in A")
    gap_b: float | None
    used_a: int = Field(description="pairs of this category A used for patching")
    used_b: int


class GapChange(_Model):
    n_pairs_a: int
    n_pairs_b: int
    mean_a: float = Field(description="mean gap over the compared pairs in A")
    mean_b: float
    diff: float | None = Field(description="B − A; None where the two scores differ (not comparable)")
    ci_low: float | None
    ci_high: float | None
    method: str


class ComparisonStats(_Model):
    method: str
    level: float
    n_resamples: int
    seed: int
    unit: str = "pair"
    resampling: str
    estimator: str = "ratio of sums over the compared pairs, per report; difference B − A"
    familywise: str = ("max-t bootstrap band over the compared components whose effects vary beyond either report's "
                       "resolution; the others keep their marginal interval")
    n_components: int
    min_diff: float = Field(description="smaller |diff| is numerical noise and never called significant")
    behaviour: str = BEHAVIOUR_METHOD


class ComparisonReport(_Model):
    """Checkpoint comparison of two audit reports: what moved from A to B."""

    schema_version: Literal["1.0", "1.1", "1.2", "1.3"] = COMPARISON_SCHEMA_VERSION
    created: str
    command: str
    a: Side
    b: Side
    same_dataset: bool
    paired: bool = Field(description="shares compared on the same pairs with a paired bootstrap")
    n_pairs: int = Field(description="paired: common used pairs compared; unpaired: A's used pairs")
    n_pairs_b: int = Field(description="paired: same as n_pairs; unpaired: B's used pairs")
    compared_pair_ids: list[str] = Field(description="paired: the common used pairs, in A's order")
    used_only_in_a: list[str]
    used_only_in_b: list[str]
    shares_defined: bool
    comparable: bool = Field(
        True, description="A and B scored with one opening tree (same leaves, branches and form), so their gaps and "
        "shares can be subtracted; when False, gap and share changes are not computed")
    not_comparable: str | None = Field(None, description="why the scores differ, and how to rerun them together")
    stats: ComparisonStats
    gap: GapChange
    behaviour: list[RateChange]
    categories: list[CategoryChange]
    components: list[ComponentChange] = Field(description="components in both reports, in A's order")
    ranking: list[str] = Field(description="significant changes, largest |diff| first")
    components_only_in_a: list[str]
    components_only_in_b: list[str]
    warnings: list[str]
    refusal_direction: DirectionChange | None = Field(
        None, description="(schema 1.3) the refusal directions compared; null where neither report has the section")

    def component(self, component_id: str) -> ComponentChange:
        for c in self.components:
            if c.id == component_id:
                return c
        raise KeyError(component_id)


def comparison_json_schema() -> dict:
    """JSON Schema of the comparison report, generated from the pydantic models (stable ``$id``: major version)."""
    return json_schema_document(ComparisonReport, "comparison-report", COMPARISON_SCHEMA_VERSION,
                                "refusal-eval comparison report")


def load_comparison(path: str | Path) -> ComparisonReport:
    """Read and validate a comparison JSON; ReportError names the file and the failing fields."""
    return validate_json(read_json(path), ComparisonReport, path,
                         f"comparison report schema {COMPARISON_SCHEMA_VERSION}")
