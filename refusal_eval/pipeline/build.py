"""The last stage of an audit: the validated report (:class:`refusal_eval.report.schema.AuditReport`) of an analysis,
with its controls. Nothing here touches the model except to describe it (names, sizes, the weights' hash)."""

from __future__ import annotations

import platform
import resource
import sys
import time
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import torch
import transformers

from refusal_eval import __version__
from refusal_eval.config import AuditConfig
from refusal_eval.data.pairs import PromptPair, file_sha256
from refusal_eval.metrics import TokenSets
from refusal_eval.models.loading import LoadedModel
from refusal_eval.patching.components import trivial_reason
from refusal_eval.patching.exact import PairBatch, PatchEngine
from refusal_eval.paths import portable
from refusal_eval.pipeline.analysis import Analysis
from refusal_eval.pipeline.controls import (
    heterogeneity,
    last_position_finding,
    noise_floor_info,
    random_control,
)
from refusal_eval.pipeline.inputs import Inputs, common_suffix
from refusal_eval.pipeline.refusal_direction import DirectionFound, direction_section
from refusal_eval.report import schema as rs
from refusal_eval.stats import _finite_or_none

ranked = rs.rank_components


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
            noise_floor=None if floor is None or np.isnan(floor[k]) else float(floor[k]),
            within_noise=bool(0 < largest[k] <= a.resolution.effect),
            trivial=trivial_reason(c, a.loaded.n_layers),
            effects=[round(float(v), 6) if ok else None for v, ok in zip(a.effects[k], patched[k], strict=True)],
            n_pairs=int(patched[k].sum()),
            approximate=bool(a.approximate[k]),
        ))
    return out


def build_report(a: Analysis, inputs: Inputs, config: AuditConfig, command: str, started: float,
                 control: Analysis | None = None, direction: DirectionFound | None = None,
                 control_direction: rs.DirectionControl | None = None) -> rs.AuditReport:
    """Assemble the validated report of an analysis, with its controls. ``control`` is the analysis of the
    random-weights control (:func:`refusal_eval.pipeline.audit.random_analysis`), required when ``config.controls``
    asks for it; ``direction`` what :func:`~refusal_eval.pipeline.refusal_direction.direction_stage` measured (None:
    the section says it was not run) and ``control_direction`` the copy's
    (:func:`~refusal_eval.pipeline.refusal_direction.control_direction`)."""
    if "random" in config.controls and control is None:
        raise ValueError("config.controls asks for the random-weights control: pass its analysis as control= "
                         "(refusal_eval.pipeline.audit.random_analysis)")
    loaded, batch = a.loaded, a.batch
    results = _component_results(a)
    warnings = list(inputs.notes) + list(a.warnings)
    random = None if control is None else _random(control, config, control_direction, warnings)
    return rs.AuditReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command,
        config={k: portable(v) if isinstance(v, str) else v for k, v in config.model_dump().items()},
        model=_model_info(loaded, config),
        dataset=_dataset_info(a, inputs, config),
        metric=_metric_info(a.token_sets, loaded.tokenizer, config),
        direction=config.direction,
        method=config.method,
        attribution=a.attribution_info,
        behaviour=a.behaviour,
        gap=a.gap,
        gap_all_pairs=a.gap_all,
        gap_equal_length=a.gap_full,
        shares_defined=a.shares_defined,
        shares_reason=a.shares_reason,
        search=a.search,
        score_validity=a.validity,
        score_validity_tricky=a.validity_tricky,
        stats=rs.StatsInfo(method=config.ci_method, level=config.ci_level, n_resamples=config.n_boot,
                           seed=config.seed, n_components=len(a.components),
                           resolution_effect=a.resolution.effect, resolution_share=a.resolution.share),
        controls=_controls(a, config, random),
        heterogeneity=heterogeneity(results, a.gaps, [a.pairs[i].category for i in a.used], batch.pair_ids,
                                    config.ci_level, config.n_boot, config.seed) if a.shares_defined else [],
        findings=last_position_finding(results, a.gaps, config.ci_level, config.n_boot, config.ci_method,
                                       config.seed),
        pairs=_pair_results(a, inputs.pairs),
        used_pair_ids=batch.pair_ids,
        positions=_positions(loaded.tokenizer, batch),
        components=results,
        warnings=warnings,
        environment=_environment(),
        engine=_engine_info(a.engine, loaded, batch),
        refusal_direction=direction_section(direction, results, a, config),
        runtime_seconds=round(time.perf_counter() - started, 2),
    )


def _random(control: Analysis, config: AuditConfig, direction: rs.DirectionControl | None,
            warnings: list[str]) -> rs.RandomControl:
    """The random-weights control's section, with the copy's refusal direction; what it finds goes to ``warnings``."""
    random = random_control(control, config)
    random.direction = direction
    if random.n_significant_forced:
        warnings.append(f"the random-weights control shows {random.n_significant_forced} significant "
                        "component(s) when its shares are forced: treat this model's circuit with caution")
    if direction is not None and not direction.includes_zero:
        warnings.append(f"the random-weights control's refusal direction: {direction.words.replace('**', '')}")
    return random


def _controls(a: Analysis, config: AuditConfig, random: rs.RandomControl | None) -> rs.Controls:
    """The report's controls: the permutation null's summary, the random-weights control (None without it) and the
    noise floor."""
    return rs.Controls(
        permutation=rs.PermutationControl(
            n_permutations=a.permutation.n_permutations, exact=a.permutation.exact, seed=config.seed,
            gap_p=a.gap.p_permutation, gap_all_pairs_p=a.gap_all.p_permutation,
            n_components_p_below=int(((a.permutation.p_familywise < 1 - config.ci_level)
                                      & ~a.approximate).sum()),
        ),
        random=random, noise_floor=noise_floor_info(a, config),
    )


def _model_info(loaded: LoadedModel, config: AuditConfig) -> rs.ModelInfo:
    model_cfg = loaded.model.config
    return rs.ModelInfo(
        name=loaded.name, source=loaded.source, architecture=model_cfg.model_type,
        adapter=loaded.adapter.family, n_layers=loaded.n_layers, n_heads=loaded.n_heads,
        n_kv_heads=loaded.n_kv_heads, d_model=loaded.d_model,
        n_params=sum(p.numel() for p in loaded.model.parameters()), dtype=config.dtype, device=config.device,
        weights_sha256=loaded.weights_sha256(),
    )


def _dataset_info(a: Analysis, inputs: Inputs, config: AuditConfig) -> rs.DatasetInfo:
    batch = a.batch
    counts = dict(Counter(e.reason for e in a.exclusions))
    return rs.DatasetInfo(
        path=portable(str(inputs.dataset_path)), sha256=inputs.fingerprint, split=config.split,
        n_pairs=len(inputs.pairs), n_used=len(a.used), exclusions=a.exclusions, exclusion_counts=counts,
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
    )


def _token_infos(tok, ids: list[int], counts: dict[int, int]) -> list[rs.TokenInfo]:
    return [rs.TokenInfo(id=t, text=tok.decode([t]), count=counts.get(t, 0)) for t in ids]


def _metric_info(ts: TokenSets, tok, config: AuditConfig) -> rs.MetricInfo:
    """The score's definition and its opening tree, every token with its text and calibration count."""
    both = {t: ts.refusal_counts.get(t, 0) + ts.compliance_counts.get(t, 0) for t in ts.ambiguous}
    return rs.MetricInfo(
        form=config.metric,
        definition=(
            "log P(refusal tokens) - log P(compliance tokens)" if config.metric == "logdiff"
            else "log p - log(1 - p), p = P(refusal tokens)"
        ),
        position="last prompt token (the first response position), after the chat template" + (
            "; each branch token teacher-forced after it gives the second-token distribution" if ts.branches
            else ""),
        refusal_tokens=_token_infos(tok, ts.refusal, ts.refusal_counts),
        compliance_tokens=_token_infos(tok, ts.compliance, ts.compliance_counts),
        derivation=ts.derivation, max_new_tokens=config.max_new_tokens, token_set_source=ts.source,
        ambiguous_tokens=_token_infos(tok, ts.ambiguous, both), depth=ts.depth,
        branches=[rs.BranchInfo(
            token=_token_infos(tok, [b.token], both)[0],
            refusal_tokens=_token_infos(tok, b.refusal, b.refusal_counts),
            compliance_tokens=_token_infos(tok, b.compliance, b.compliance_counts),
            ambiguous_tokens=_token_infos(tok, b.ambiguous, {t: b.refusal_counts.get(t, 0)
                                                             + b.compliance_counts.get(t, 0) for t in b.ambiguous}),
        ) for b in ts.branches],
    )


def _positions(tok, batch: PairBatch) -> list[rs.PositionInfo]:
    """Each prompt position (offset from the end) where both sides have a real token: how many pairs differ there
    and the most common token of each side."""
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
    return positions


def _pair_results(a: Analysis, pairs: list[PromptPair]) -> list[rs.PairResult]:
    """Every scored pair: token lengths, scores, greedy replies and verdicts, and whether it was patched."""
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
    return pair_results
