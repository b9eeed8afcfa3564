"""The audit's public entry points, kept importable from ``refusal_eval.audit``: the stages themselves live in
:mod:`refusal_eval.pipeline` (one module per stage). Code inside the package imports from there."""

from __future__ import annotations

from refusal_eval.pipeline.analysis import Analysis
from refusal_eval.pipeline.audit import analyse, audit, random_analysis
from refusal_eval.pipeline.behaviour import (
    Verdicts,
    behaviour_stage,
    calibration_openings,
    rate,
    shared_token_sets,
    token_set_stage,
    token_sets_of,
    tree_engine,
)
from refusal_eval.pipeline.build import build_report, ranked
from refusal_eval.pipeline.effects import AttributionCheck, attribution_summary, effects_stage, patch_stage
from refusal_eval.pipeline.inputs import Inputs, check_prompt_lengths, common_suffix, format_prompt, load_inputs
from refusal_eval.pipeline.plan import PatchPlan, plan_stage
from refusal_eval.pipeline.scores import (
    VERDICT_WORDS,
    Scores,
    _gap,
    _shares_rule,
    _side_scores,
    gap_verdict,
    patchable_pairs,
    score_validity,
    scores_stage,
)
from refusal_eval.pipeline.statistics import Statistics, significance, statistics_stage
from refusal_eval.replies import greedy_replies

__all__ = [
    "VERDICT_WORDS", "Analysis", "AttributionCheck", "Inputs", "PatchPlan", "Scores", "Statistics", "Verdicts",
    "_gap", "_shares_rule", "_side_scores", "analyse", "attribution_summary", "audit", "behaviour_stage",
    "build_report", "calibration_openings", "check_prompt_lengths", "common_suffix", "effects_stage",
    "format_prompt", "gap_verdict", "greedy_replies", "load_inputs", "patch_stage", "patchable_pairs",
    "plan_stage", "random_analysis", "ranked", "rate", "score_validity", "scores_stage", "shared_token_sets",
    "significance", "statistics_stage", "token_set_stage", "token_sets_of", "tree_engine",
]
