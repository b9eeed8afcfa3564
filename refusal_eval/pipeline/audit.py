"""The audit pipeline, as stages: inputs -> behaviour -> token sets -> scores and gap -> plan -> effects (the
adaptive search, or every cell) -> statistics -> refusal direction -> controls -> report.

Each stage is a function of what the earlier ones produced, in its own module of :mod:`refusal_eval.pipeline`.
:func:`analyse` runs the model-touching stages on one loaded model, so that the random-weights control
(``--control random``) is the very same audit on a re-initialised copy (:func:`random_analysis`); :func:`audit` adds
the inputs, the controls and the report around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from refusal_eval import __version__
from refusal_eval.config import AuditConfig
from refusal_eval.metrics import TokenSets
from refusal_eval.models.loading import LoadedModel, check_device, load_model
from refusal_eval.patching.exact import PatchEngine
from refusal_eval.pipeline.analysis import Analysis
from refusal_eval.pipeline.behaviour import behaviour_stage, token_set_stage, tree_engine
from refusal_eval.pipeline.build import build_report
from refusal_eval.pipeline.controls import reinitialised
from refusal_eval.pipeline.effects import attribution_summary, patch_stage
from refusal_eval.pipeline.inputs import Inputs, check_prompt_lengths, load_inputs
from refusal_eval.pipeline.plan import PatchPlan, plan_stage
from refusal_eval.pipeline.refusal_direction import control_direction, direction_stage
from refusal_eval.pipeline.scores import Scores, scores_stage
from refusal_eval.pipeline.search import exhaustive_info, search_stage
from refusal_eval.pipeline.statistics import statistics_stage
from refusal_eval.report import schema as rs
from refusal_eval.resume import ResultsLog

log = logging.getLogger("refusal_eval")


def audit(config: AuditConfig | None = None, command: str = "", progress: bool = True,
          partial: str | Path | None = None, resume: bool = False,
          token_sets: TokenSets | None = None) -> rs.AuditReport:
    """Run a complete refusal audit and return the validated report (the report itself is not written). With the
    random-weights control (``config.controls``) it runs :func:`random_analysis` too and hands both analyses to
    :func:`~refusal_eval.pipeline.build.build_report`.

    With ``partial`` (a ``partial.jsonl`` path), every finished chunk of patching is appended there as it is done
    (:class:`refusal_eval.resume.ResultsLog`); with ``resume`` the chunks already there are reused after the
    file's header (version, weights, dataset, options) is checked against this run. ``token_sets``: score with this
    opening tree (one tree for several models, :func:`~refusal_eval.pipeline.behaviour.shared_token_sets`) instead
    of the model's own."""
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
        found = direction_stage(analysis, inputs, config)
        control = random_analysis(analysis, inputs, config, progress) if "random" in config.controls else None
        copy = None if control is None else control_direction(control, inputs, config)
        report = build_report(analysis, inputs, config, command, started, control, found, copy)
    finally:
        if results_log is not None:
            results_log.close()
    if results_log is not None and results_log.reused:
        log.warning("resumed: %d finished chunk(s) of patching read from %s", results_log.reused, partial)
    return report


def analyse(
    loaded: LoadedModel, inputs: Inputs, config: AuditConfig, progress: bool = True, noise: bool | None = None,
    checkpoint: ResultsLog | None = None, token_sets: TokenSets | None = None, cells: Sequence[str] | None = None,
) -> Analysis:
    """Run the model-touching stages on one model: token sets -> behaviour -> scores and gap -> plan -> effects ->
    statistics. ``checkpoint`` keeps (and on resume supplies) the patching engine's finished chunks; ``token_sets``
    (one tree for several models, :func:`~refusal_eval.pipeline.behaviour.shared_token_sets`) replaces the model's
    own. ``cells``: patch these component ids (another analysis's) instead of searching the grid."""
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
    plan, effects, approximate, checks, search = _effects(engine, plan, scores, config, cells)
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
        floor=stats.floor, floor_bound=stats.floor_bound, resolution=stats.resolution, significant=stats.significant,
        warnings=list(token_sets.warnings) + scores.warnings + plan.warnings + stats.warnings,
        alignment=scores.alignment, on_full=plan.on_full, full_cols=plan.full_cols, gap_full=plan.gap_full,
        search=search,
    )


def _effects(engine: PatchEngine, plan: PatchPlan, scores: Scores, config: AuditConfig, cells: Sequence[str] | None):
    """The effects stage as the options ask: the given ``cells`` only, the adaptive search (exact patching), or
    every cell of the grid. Returns the plan of the cells patched, effects, approximate mask, attribution checks
    and the report's search section (None for given cells and attribution methods)."""
    if cells is not None:
        plan = plan.cells(cells)
        return (plan, *patch_stage(engine, plan, scores, config), None)
    if config.method == "exact" and config.search == "adaptive":
        plan, effects, approximate, search = search_stage(engine, plan, scores, config)
        return plan, effects, approximate, [], search
    effects, approximate, checks = patch_stage(engine, plan, scores, config)
    search = exhaustive_info(len(plan.components)) if config.method == "exact" else None
    return plan, effects, approximate, checks, search


def random_analysis(analysis: Analysis, inputs: Inputs, config: AuditConfig, progress: bool = True) -> Analysis:
    """The same audit (pairs, calibration, options) on a seeded re-initialised copy of the model: the random-weights
    control, summarised for the report by :func:`refusal_eval.pipeline.controls.random_control`.

    Shares are computed with the behaviour gate overridden (``force_shares``), so the control also shows what the
    statistics alone would have claimed; no noise floor is measured. It patches the audit's own cells (those the
    adaptive search chose, or the whole grid): the same family as the audit's."""
    control = reinitialised(analysis.loaded, config.seed)
    forced = config.model_copy(update={"force_shares": True})
    return analyse(control, inputs, forced, progress=progress, noise=False, cells=[c.id for c in analysis.components])


__all__ = ["Analysis", "Inputs", "analyse", "audit", "build_report", "load_inputs", "random_analysis"]
