"""AuditConfig: every knob of an audit, validated, with defaults that audit the shipped model organism."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refusal_eval.patching.components import DEFAULT_KINDS, KINDS

# --score-depth auto branches on the second token when an ambiguous first token opens at least this many
# calibration replies (as many as a token set needs before the report stops flagging it: metrics.MIN_REPLIES).
AUTO_BRANCH_REPLIES = 10


class AuditConfig(BaseModel):
    """What to audit and how; recorded verbatim in the report."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="hub id, local folder or .gguf file; None = shipped tiny-refuser")
    adapter: str | None = Field(None, description="peft (LoRA) adapter folder, merged into the model for the audit")
    dataset: str | None = Field(
        None, description="pair file (JSONL, CSV, JSON, Parquet), a datasets folder or a hub id; None = the shipped "
        "datasets/refusal_pairs.jsonl (or the preset's hub id)"
    )
    preset: Literal["jbb", "xstest", "advbench"] | None = Field(
        None, description="public layout: JailbreakBench JBB-Behaviors, XSTest v2, AdvBench (synthetic pairing)"
    )
    harmful_column: str | None = Field(None, description="column holding the harmful prompt (default 'harmful')")
    benign_column: str | None = Field(None, description="column holding the benign prompt (default 'benign')")
    id_column: str | None = Field(None, description="column holding the pair id (default 'id', else the row)")
    category_column: str | None = Field(None, description="column holding the category (default 'category')")
    split_column: str | None = Field(None, description="column holding train/eval (default 'split')")
    tricky: str | None = Field(
        None, description="tricky-benign pair JSONL for over-refusal; None = shipped file, '' = skip"
    )
    split: Literal["eval", "train", "all"] = "eval"
    components: list[str] = Field(default_factory=lambda: list(DEFAULT_KINDS))
    positions: list[Literal["all", "each", "suffix", "last"]] = Field(
        default_factory=lambda: ["all", "each"],
        description=(
            "'all': every position at once; 'each': every position, one at a time; 'suffix': each position of "
            "the shared chat-template suffix; 'last': the last prompt token only. Pairs of unequal token length "
            "are right-aligned and patched at the shared suffix and last positions; 'all' (and 'each' before the "
            "suffix) use the equal-length pairs only"
        ),
    )
    search: Literal["adaptive", "exhaustive"] = Field(
        "adaptive",
        description="'adaptive': exact patching coarse to fine (every kind at all positions, the last and the shared "
        "suffix; single positions only for the kinds and layers that move the score; heads only inside attention "
        "outputs that do) with a seeded sample of the pruned cells and a stated bound on what the pruning missed; "
        "'exhaustive': every cell of the grid (components x positions)",
    )
    direction: Literal["denoise", "noise"] = "denoise"
    method: Literal["exact", "attribution", "attribution+verify"] = Field(
        "exact",
        description="exact patching; gradient attribution patching (approximate, one backward pass); or "
        "attribution then exact patching of the top cells and a random sample, measuring the estimate's error",
    )
    verify_top: int = Field(20, ge=0, description="attribution+verify: exact-patch the top-k estimated cells "
                            "(per set of pairs under mixed alignment)")
    verify_random: int = Field(20, ge=0, description="attribution+verify: and this many random other cells")
    metric: Literal["logdiff", "logodds"] = "logdiff"
    token_sets: Literal["calibration", "canonical"] = Field(
        "calibration",
        description="refusal/compliance tokens from greedy replies to calibration pairs (never the scored ones), or "
        "the canonical openings",
    )
    score_depth: Literal[1, 2, "auto"] = Field(
        "auto",
        description="the opening tree's depth: 1 scores the first response token only (a first token that opens both "
        "refusals and compliances is dropped); 2 branches such a token on the token after it, read by teacher-forcing; "
        f"'auto' is 2 when an ambiguous first token opens at least {AUTO_BRANCH_REPLIES} calibration replies",
    )
    calibration: str | None = Field(
        None, description="pair file for the token sets; None = the dataset's other split (train for an eval audit)"
    )
    max_calibration_pairs: int | None = Field(None, ge=1, description="use only the first N calibration pairs")
    force_shares: bool = Field(
        False, description="compute shares although the model shows no measurable refusal behaviour (reported)"
    )
    controls: list[Literal["random"]] = Field(
        default_factory=list, description="'random': the same audit on a seeded re-initialised copy of the model"
    )
    refusal_direction: Literal["on", "off"] = Field(
        "on", description="'on': also find the refusal direction (difference in means, Arditi et al.'s selection on "
        "the calibration pairs) and measure what ablating and adding it do on the scored pairs, with greedy replies "
        "under both (forward hooks only: no weights are changed or written); 'off': skip it (the report says so)",
    )
    min_gap: float = Field(
        math.log(2), ge=0.0,
        description="smallest gap that matters, in score units (nats): the gap's CI must lie above it for shares; "
        "the default log 2 means harmful prompts at least double the odds of a refusal opening over a compliance",
    )
    n_permutations: int = Field(10_000, ge=100, description="sign-flip permutations for the permutation p-values")
    noise_floor: bool = Field(True, description="measure the identity-patch noise floor (exact method)")
    noise_floor_cells: int = Field(
        2, ge=0, description="identity-patched components per stratum (kind, layer, position class: all positions, "
        "the last, any other) for the noise floor, whose rule bound is 4 times the largest sampled floor; 0 patches "
        "every component and uses the largest floor itself",
    )
    max_pairs: int | None = Field(None, ge=1, description="use only the first N pairs of the split")
    n_boot: int = Field(2000, ge=100)
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)
    ci_method: Literal["BCa", "percentile", "basic"] = "BCa"
    seed: int = Field(0, ge=0)
    max_new_tokens: int = Field(24, ge=1)
    full_replies: bool = Field(
        False, description="generate every reply to max_new_tokens; by default a reply stops once the refusal "
        "matcher's verdict on it cannot change (same verdicts, shorter replies in the report, faster)",
    )
    batch_rows: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="rows (pairs x patched variants) per forward pass; 'auto' sizes them from free memory"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    device_map: str | None = Field(
        None, description="load the weights with accelerate straight onto several devices (and disk): 'auto', or a "
        "JSON file mapping module names to devices; device is then unused")

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, value: str | None) -> str | None:
        if value is not None and value not in ("auto", "balanced", "sequential") and not Path(value).is_file():
            raise ValueError(f"'{value}' is neither 'auto' nor an existing JSON file mapping module names to devices")
        return value

    @field_validator("components")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        unknown = [k for k in value if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown component kind(s) {unknown}; choose from {', '.join(KINDS)}")
        if not value:
            raise ValueError("at least one component kind is needed")
        return value

    @field_validator("positions")
    @classmethod
    def _some_positions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("choose at least one of 'all', 'each', 'suffix', 'last'")
        return value
