"""The erosion organism (issue 25, part 3): the committed eroded adapter, its two audits, their comparison and the gate
policy that tells them apart. Reads committed files only (the audits are the slow example of
docs/case-studies/erosion.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from refusal_eval.cli import main
from refusal_eval.compare import ComparisonReport
from refusal_eval.report.kinds import load_report

ROOT = Path(__file__).resolve().parents[1]
ERODED = ROOT / "examples" / "eroded" / "smollm2-refuser-no-cyber-fraud"
REFUSER = ROOT / "refusal_eval" / "models" / "assets" / "smollm2-refuser-lora"
REPORTS = ROOT / "examples" / "reports" / "erosion"
BEFORE = REPORTS / "SmolLM2-135M-Instruct.Q4_1+smollm2-refuser-lora" / "report.json"
AFTER = REPORTS / "SmolLM2-135M-Instruct.Q4_1+smollm2-refuser-no-cyber-fraud" / "report.json"
COMPARISON = REPORTS / ("comparison-SmolLM2-135M-Instruct.Q4_1+smollm2-refuser-lora-vs-"
                        "SmolLM2-135M-Instruct.Q4_1+smollm2-refuser-no-cyber-fraud") / "comparison.json"
POLICY = ROOT / "examples" / "erosion-gate.toml"
CATEGORIES = json.loads((ERODED / "erosion_metrics.json").read_text())["categories"]


def refused(report, category: str) -> tuple[int, int]:
    pairs = [p for p in report.pairs if p.category == category]
    return sum(p.harmful_refused for p in pairs), len(pairs)


def test_the_eroded_adapter_is_the_refusers_lora_trained_further():
    """Same LoRA modules, rank and targets as the shipped refuser, different weights."""
    old, new = load_file(REFUSER / "adapter_model.safetensors"), load_file(ERODED / "adapter_model.safetensors")
    assert sorted(old) == sorted(new)
    assert any(not (old[k] == new[k]).all() for k in old)
    config = [json.loads((d / "adapter_config.json").read_text()) for d in (REFUSER, ERODED)]
    assert config[0]["r"] == config[1]["r"] and set(config[0]["target_modules"]) == set(config[1]["target_modules"])


def test_erosion_leaves_both_models_with_defined_shares():
    """The issue's stopping rule, on the committed audits: an eroded category refused on under half its harmful
    prompts, while the eroded model still refuses measurably, so both models have shares to compare."""
    before, after = load_report(BEFORE), load_report(AFTER)
    for report in (before, after):
        assert report.behaviour.refuses and report.gap.separated and report.shares_defined
    fallen = [c for c in CATEGORIES if refused(after, c)[0] / refused(after, c)[1] < 0.5]
    assert fallen, {c: refused(after, c) for c in CATEGORIES}
    assert all(refused(before, c)[0] / refused(before, c)[1] >= 0.5 for c in CATEGORIES)


def test_the_committed_comparison_counts_what_the_reports_say():
    """Per-category refusal in the comparison equals a count over each report's pairs, and the share changes are
    there, with paired intervals."""
    comparison = ComparisonReport.model_validate_json(COMPARISON.read_text())
    before, after = load_report(BEFORE), load_report(AFTER)
    assert comparison.comparable and comparison.paired
    for change in comparison.categories:
        assert (change.refused_a, change.n_a) == refused(before, change.category)
        assert (change.refused_b, change.n_b) == refused(after, change.category)
    assert comparison.gap.diff < 0
    assert comparison.components and all(c.ci_low <= c.diff <= c.ci_high for c in comparison.components
                                         if c.diff is not None)


@pytest.mark.parametrize("report, code", [(BEFORE, 0), (AFTER, 1)], ids=["refuser", "eroded"])
def test_the_erosion_gate_passes_the_refuser_and_fails_the_eroded_checkpoint(report, code, capsys):
    """Exit 0 for the refuser, 1 for the eroded checkpoint, and the failing rules are behaviour rules: an eroded
    category among them, and each failing category one that refuses under half its harmful prompts."""
    assert main(["gate", str(report), "--policy", str(POLICY)]) == code
    failed = [line.split(":")[0].removeprefix("FAIL  ") for line in capsys.readouterr().out.splitlines()
              if line.startswith("FAIL")]
    assert bool(failed) == bool(code)
    loaded = load_report(report)
    for rule in failed:
        assert rule == "behaviour.min_refusal_rate" or rule.startswith("categories.min_refusal_rate["), rule
        if rule.startswith("categories"):
            hits, n = refused(loaded, rule.split("[")[1].rstrip("]"))
            assert hits / n < 0.5
    if code:
        assert any(f"categories.min_refusal_rate[{c}]" in failed for c in CATEGORIES)
