"""The audit report: every number a reader needs to trust, reproduce or gate on an audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from refusal_eval.errors import ReportError

SCHEMA_VERSION = "1.0"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    reason: Literal["unequal_token_length", "baseline_wrong_sign"]
    detail: str


class DatasetInfo(_Model):
    path: str
    sha256: str
    split: str
    n_pairs: int = Field(description="pairs in the selected split")
    n_used: int = Field(description="pairs used for patching")
    exclusions: list[Exclusion]
    exclusion_counts: dict[str, int]
    alignment: Literal["full", "right"] = Field(
        description="full: equal-length pairs, every position aligned; right: right-aligned on the shared suffix"
    )
    n_aligned_positions: int = Field(description="positions (from the end) patchable on every used pair")
    tricky_path: str | None = None
    tricky_sha256: str | None = None
    n_tricky: int = 0


class TokenInfo(_Model):
    id: int
    text: str
    count: int = Field(description="greedy completions that began with this token")


class MetricInfo(_Model):
    form: Literal["logdiff", "logodds"]
    definition: str
    position: str
    refusal_tokens: list[TokenInfo]
    compliance_tokens: list[TokenInfo]
    derivation: str
    max_new_tokens: int


class Rate(_Model):
    successes: int
    total: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None
    method: str = "wilson"


class Behaviour(_Model):
    harmful_refusal: Rate = Field(description="eval harmful prompts whose greedy reply is a refusal")
    benign_compliance: Rate = Field(description="eval benign prompts whose greedy reply is not a refusal")
    benign_over_refusal: Rate
    tricky_benign_over_refusal: Rate | None = None
    tricky_harmful_refusal: Rate | None = None


class StatsInfo(_Model):
    method: str
    level: float
    n_resamples: int
    seed: int
    unit: str = "pair"
    estimator: str = "ratio of sums over pairs"
    familywise: str = "max-t bootstrap band over all components of the report"
    n_components: int = Field(description="size of the family for the family-wise intervals")


class Gap(_Model):
    mean: float
    ci_low: float
    ci_high: float
    total: float = Field(description="sum over used pairs of m(harmful) - m(benign): the shares' denominator")
    separated: bool = Field(description="the gap CI lies above 0; shares are undefined otherwise")


class PairResult(_Model):
    id: str
    category: str
    n_tokens_harmful: int
    n_tokens_benign: int
    m_harmful: float | None
    m_benign: float | None
    harmful_reply: str
    benign_reply: str
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
    ci_low: float | None
    ci_high: float | None
    fw_low: float | None = Field(description="family-wise (simultaneous over all components) interval")
    fw_high: float | None
    significant: bool | None = Field(description="the family-wise interval excludes 0")
    effects: list[float] = Field(description="per used pair: signed change in refusal score, same order as pairs")
    approximate: bool = Field(False, description="estimated by attribution patching, not patched exactly")


class AttributionInfo(_Model):
    n_verified: int = Field(description="cells patched exactly to check the attribution estimate")
    n_top: int
    n_random: int
    spearman: float | None = Field(description="rank correlation, estimated vs exact, over verified cells")
    max_abs_error: float = Field(description="largest |estimated - exact| patched score over verified cells")
    verified_ids: list[str]


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


class AuditReport(_Model):
    """One model's refusal audit."""

    schema_version: Literal["1.0"] = SCHEMA_VERSION
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
    gap: Gap
    stats: StatsInfo
    pairs: list[PairResult]
    used_pair_ids: list[str]
    positions: list[PositionInfo]
    components: list[ComponentResult]
    warnings: list[str]
    environment: Environment
    engine: EngineInfo | None = None
    runtime_seconds: float

    def component(self, component_id: str) -> ComponentResult:
        """Look a component up by id (e.g. ``blocks.2.hook_mlp_out`` or ``blocks.1.hook_resid_pre@-3``)."""
        for c in self.components:
            if c.id == component_id:
                return c
        raise KeyError(component_id)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1) + "\n", encoding="utf-8")


def report_json_schema() -> dict:
    """JSON Schema of the audit report, generated from the pydantic models."""
    schema = AuditReport.model_json_schema()
    schema["$id"] = f"https://refusal-eval/schema/audit-report-{SCHEMA_VERSION}.json"
    return schema


def load_report(path: str | Path) -> AuditReport:
    """Read and validate a report JSON; ReportError names the file and the failing fields."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ReportError(f"{path}: no such report file") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    try:
        return AuditReport.model_validate(raw)
    except ValidationError as exc:
        problems = "\n  ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:20]
        )
        raise ReportError(f"{path}: does not match audit report schema {SCHEMA_VERSION}:\n  {problems}") from exc
