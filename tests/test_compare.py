"""Checkpoint comparison: `compare_reports`, its statistics and the `compare` / two-model `run` commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from refusal_eval import AuditConfig, audit
from refusal_eval.cli import main
from refusal_eval.compare import (
    ComparisonReport,
    compare_reports,
    newcombe_difference,
    render_comparison_markdown,
    write_comparison,
)
from refusal_eval.models.loading import shipped_model_path
from refusal_eval.report import AuditReport
from refusal_eval.report.writers import write_json

N_BOOT = 500
BOOSTED = "blocks.2.hook_mlp_out"  # small share in the tiny refuser; scaled x10 in B


@pytest.fixture(scope="module")
def report_a() -> AuditReport:
    config = AuditConfig(max_pairs=16, n_boot=200, components=["mlp_out"], positions=["all"], tricky="")
    return audit(config, progress=False)


def _gaps(report: AuditReport) -> np.ndarray:
    by_id = {p.id: p for p in report.pairs}
    return np.array([by_id[i].m_harmful - by_id[i].m_benign for i in report.used_pair_ids])


@pytest.fixture(scope="module")
def report_b(report_a) -> AuditReport:
    """A with one component's effects scaled by 10 and another's by 0.9: known true share changes."""
    b = report_a.model_copy(deep=True)
    b.model.name, b.model.weights_sha256 = "tiny-refuser-b", "0" * 64
    for c in b.components:
        if c.id == BOOSTED:
            c.effects = [10 * e for e in c.effects]
        elif c.id == "blocks.3.hook_mlp_out":
            c.effects = [0.9 * e for e in c.effects]
    return b


def test_self_comparison_is_exactly_zero(report_a):
    c = compare_reports(report_a, report_a, n_boot=N_BOOT)
    assert c.paired and c.n_pairs == report_a.dataset.n_used and c.shares_defined
    assert len(c.components) == len(report_a.components)
    for x in c.components:
        assert x.diff == 0.0 and x.ci_low == 0.0 and x.ci_high == 0.0 and x.fw_low == 0.0 and x.fw_high == 0.0
        assert not x.significant and x.rank is None
        assert x.share_a == x.share_b
        assert x.share_a == pytest.approx(report_a.component(x.id).share, abs=1e-6)
    assert c.ranking == []
    assert c.gap.diff == 0.0 and c.gap.ci_low == 0.0 and c.gap.ci_high == 0.0
    assert all(r.diff == 0.0 and not r.significant and r.a_only == r.b_only == 0 for r in c.behaviour)
    assert all(k.diff == 0.0 and not k.significant for k in c.categories)
    assert any("identical weights" in w for w in c.warnings)


def test_paired_interval_matches_scipy_paired_bootstrap(report_a, report_b):
    seed = 3
    c = compare_reports(report_a, report_b, n_boot=N_BOOT, seed=seed)
    g = _gaps(report_a)
    ea, eb = np.array(report_a.component(BOOSTED).effects), np.array(report_b.component(BOOSTED).effects)

    def diff(ea_, ga_, eb_, gb_, axis=-1):
        return eb_.sum(axis) / gb_.sum(axis) - ea_.sum(axis) / ga_.sum(axis)

    ref = stats.bootstrap((ea, g, eb, g), diff, paired=True, vectorized=True, n_resamples=N_BOOT, method="BCa",
                          confidence_level=0.95, rng=np.random.default_rng(seed))
    x = c.component(BOOSTED)
    assert x.diff == pytest.approx(diff(ea, g, eb, g), abs=1e-12)
    assert x.ci_low == pytest.approx(ref.confidence_interval.low, abs=1e-9)
    assert x.ci_high == pytest.approx(ref.confidence_interval.high, abs=1e-9)


def test_large_injected_change_is_significant_and_ranked_first(report_a, report_b):
    c = compare_reports(report_a, report_b, n_boot=N_BOOT)
    x = c.component(BOOSTED)
    assert x.diff == pytest.approx(9 * report_a.component(BOOSTED).share, rel=1e-5)
    assert x.significant and x.rank == 1 and c.ranking[0] == BOOSTED
    assert x.ci_low < x.diff < x.ci_high and x.fw_low < x.diff < x.fw_high and x.fw_low > 0
    for cid in ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"):  # untouched: exactly no change
        assert c.component(cid).diff == 0.0 and not c.component(cid).significant
    assert c.component("blocks.3.hook_mlp_out").diff < 0
    # behaviour is unchanged (B is A with edited effects)
    assert all(r.diff == 0.0 for r in c.behaviour)


def test_different_dataset_is_unpaired_with_warning(report_a, report_b):
    other = report_b.model_copy(deep=True)
    other.dataset.sha256 = "f" * 64
    c = compare_reports(report_a, other, n_boot=N_BOOT)
    assert not c.paired and not c.same_dataset and c.compared_pair_ids == []
    assert any(w.startswith("UNPAIRED") for w in c.warnings)
    assert "independently" in c.stats.resampling
    x = c.component(BOOSTED)
    assert x.diff == pytest.approx(9 * report_a.component(BOOSTED).share, rel=1e-5)
    assert x.ci_low < x.diff < x.ci_high
    # behaviour falls back to the reports' counts (no per-prompt pairing)
    assert all(not r.paired and r.mcnemar_p is None for r in c.behaviour)


def test_undefined_shares_compare_only_behaviour(report_a, report_b):
    flat = report_b.model_copy(deep=True)
    flat.gap.separated = False
    for comp in flat.components:
        comp.share = comp.ci_low = comp.ci_high = comp.fw_low = comp.fw_high = comp.significant = None
    c = compare_reports(report_a, flat, n_boot=N_BOOT)
    assert not c.shares_defined and c.components == [] and c.ranking == []
    assert any("UNDEFINED SHARES in B" in w for w in c.warnings)
    assert c.behaviour and c.categories


def test_newcombe_interval():
    d, lo, hi = newcombe_difference(7, 7, 0, 7)
    assert d == -1.0 and -1.0 <= lo < hi < 0
    d, lo, hi = newcombe_difference(5, 10, 5, 10)
    assert d == 0.0 and lo == pytest.approx(-hi)


def test_compare_cli_writes_files_and_round_trips(tmp_path, report_a, report_b, capsys):
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    write_json(report_a, pa)
    write_json(report_b, pb)
    out = tmp_path / "cmp"
    assert main(["compare", str(pa), str(pb), "--out", str(out), "--n-boot", "200", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert BOOSTED in printed and "refusal on harmful" in printed
    raw = json.loads((out / "comparison.json").read_text())
    again = ComparisonReport.model_validate(raw)
    assert json.loads(again.model_dump_json()) == raw
    assert again.stats.n_resamples == 200 and again.stats.seed == 1 and again.command.startswith("refusal-eval compare")
    assert again.a.name == "tiny-refuser" and again.b.name == "tiny-refuser-b" and again.paired
    md = (out / "comparison.md").read_text()
    for heading in ("## Summary", "## Behaviour", "per category", "## Share changes", "## Identity"):
        assert heading in md
    # write_comparison from the API gives the same two files
    j, m = write_comparison(again, tmp_path / "again")
    assert j.name == "comparison.json" and m.name == "comparison.md"


def test_compare_cli_bad_report_exits_2(tmp_path, report_a, capsys):
    good, bad = tmp_path / "a.json", tmp_path / "bad.json"
    write_json(report_a, good)
    bad.write_text("{not json")
    assert main(["compare", str(good), str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main(["compare", str(good), str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_run_with_two_models_writes_both_reports_and_comparison(tmp_path, capsys):
    copy = tmp_path / "tiny-copy"
    shutil.copytree(shipped_model_path(), copy)
    out = tmp_path / "reports"
    args = ["run", "--model", "tiny-refuser", "--model", str(copy), "--out", str(out), "--max-pairs", "4",
            "--components", "mlp_out", "--positions", "all", "--tricky", "", "--n-boot", "200", "--quiet"]
    assert main(args) == 0
    assert (out / "tiny-refuser" / "report.json").is_file() and (out / "tiny-copy" / "report.json").is_file()
    c = ComparisonReport.model_validate_json((out / "comparison-tiny-refuser-vs-tiny-copy" / "comparison.json")
                                             .read_text())
    assert c.paired and c.a.weights_sha256 == c.b.weights_sha256
    assert all(x.diff == 0.0 and not x.significant for x in c.components)
    # two models with the same name would overwrite each other's reports
    assert main(["run", "--model", str(copy), "--model", str(copy), "--out", str(out), "--quiet"]) == 2
    assert "share a name" in capsys.readouterr().err


def test_reports_scored_with_different_trees_are_not_comparable(tmp_path, report_a):
    """A depth-2 tree on one side: the summary, the Markdown and the JSON say the gap and share changes are not
    comparable (no difference is computed) and how to rerun both together; behaviour is still compared."""
    from refusal_eval.report.comparison_markdown import render_comparison_markdown, summary_lines
    from refusal_eval.report.schema import BranchInfo, TokenInfo

    b = report_a.model_copy(deep=True)
    b.model.name = "tiny-refuser-deep"
    b.metric.depth = 2
    b.metric.branches = [BranchInfo(token=TokenInfo(id=40, text="I", count=20),
                                    refusal_tokens=[TokenInfo(id=41, text="'m", count=10)],
                                    compliance_tokens=[TokenInfo(id=42, text="'d", count=10)])]
    c = compare_reports(report_a, b, n_boot=N_BOOT)
    assert not c.comparable and c.gap.diff is None and c.gap.ci_low is None
    assert c.components == [] and c.ranking == []
    assert "refusal-eval run --model A --model B" in c.not_comparable and "'I' branched" in c.not_comparable
    assert any("NOT COMPARABLE" in line for line in summary_lines(c))
    assert not any(line.strip().startswith("gap:") for line in summary_lines(c))
    assert "Gap and share changes: not comparable" in render_comparison_markdown(c)
    assert [r.measure for r in c.behaviour][:2] == ["refusal on harmful", "compliance on benign"]
    json_path, _ = write_comparison(c, tmp_path, pictures=False)
    assert not ComparisonReport.model_validate_json(json_path.read_text()).comparable
    # the same tree on both sides stays comparable
    assert compare_reports(report_a, report_a, n_boot=N_BOOT).comparable


def test_run_with_two_models_scores_both_with_one_pooled_tree(tmp_path):
    """Two models that refuse differently, audited in one run: both reports carry the tree derived from both models'
    calibration replies pooled (recomputed here from each model's own openings), so the comparison subtracts gaps
    measured on one score."""
    from refusal_eval.audit import calibration_openings, load_inputs
    from refusal_eval.metrics import derive_token_sets
    from refusal_eval.models.loading import load_model

    other = str(Path(__file__).parents[1] / "examples" / "tiny-refuser-no-drugs")
    out = tmp_path / "reports"
    common = ["--max-pairs", "4", "--max-calibration-pairs", "12", "--components", "mlp_out", "--positions", "all",
              "--tricky", "", "--n-boot", "200", "--quiet"]
    assert main(["run", "--model", "tiny-refuser", "--model", other, "--out", str(out), *common]) == 0
    a = AuditReport.model_validate_json((out / "tiny-refuser" / "report.json").read_text())
    b = AuditReport.model_validate_json((out / "tiny-refuser-no-drugs" / "report.json").read_text())
    assert a.metric == b.metric and "pooled" in a.metric.derivation
    openings, refused = [], []
    config = AuditConfig(max_pairs=4, max_calibration_pairs=12, tricky="")
    for model in (None, other):
        found = calibration_openings(load_model(model), load_inputs(config), config, progress=False)
        openings += found[0]
        refused += found[1]
    pooled = derive_token_sets(openings, refused, load_model().tokenizer)
    assert [t.id for t in a.metric.refusal_tokens] == pooled.refusal
    assert [t.id for t in a.metric.compliance_tokens] == pooled.compliance
    c = ComparisonReport.model_validate_json(
        (out / "comparison-tiny-refuser-vs-tiny-refuser-no-drugs" / "comparison.json").read_text())
    assert c.comparable and c.gap.diff is not None


def test_categories_are_called_changed_only_after_holm_over_the_family():
    """The committed erosion audits: fraud drops 6/7 -> 0/7 on the same prompts (McNemar p 1/32 = 0.031 unadjusted),
    but over 11 categories the Holm-adjusted p is 0.34, so no category is called changed; the unadjusted numbers
    stay in the report."""
    from refusal_eval.stats import holm, mcnemar_exact

    folder = Path(__file__).resolve().parent.parent / "examples" / "reports" / "erosion"
    a, b = (AuditReport.model_validate_json((folder / f"SmolLM2-135M-Instruct.Q4_1+{name}" / "report.json").read_text())
            for name in ("smollm2-refuser-lora", "smollm2-refuser-no-cyber-fraud"))
    c = compare_reports(a, b, n_boot=100)
    assert len(c.categories) == 11 and all(k.test == "mcnemar" for k in c.categories)
    for k in c.categories:
        assert k.p_value == mcnemar_exact(k.a_only, k.b_only)
    np.testing.assert_allclose([k.p_holm for k in c.categories], holm([k.p_value for k in c.categories]))
    fraud = next(k for k in c.categories if k.category == "fraud")
    assert (fraud.refused_a, fraud.refused_b) == (6, 0) and fraud.p_value == pytest.approx(1 / 32)
    assert fraud.significant and fraud.p_holm == pytest.approx(11 / 32) and not fraud.changed
    assert not any(k.changed for k in c.categories)
    assert "No category's refusal rate is shown to have changed (Holm-adjusted over 11 categories" in \
        render_comparison_markdown(c)
    # Different prompts: Fisher's exact test stands in for McNemar.
    unpaired = b.model_copy(deep=True)
    for p in unpaired.pairs:
        p.id = f"other-{p.id}"
    unpaired.used_pair_ids = [f"other-{i}" for i in unpaired.used_pair_ids]
    u = compare_reports(a, unpaired, n_boot=100)
    assert all(k.test == "fisher" and k.mcnemar_p is None for k in u.categories)
    assert next(k for k in u.categories if k.category == "fraud").p_value == pytest.approx(
        stats.fisher_exact([[6, 1], [0, 7]]).pvalue)


@pytest.fixture(scope="module")
def report_no_drugs() -> AuditReport:
    """The committed fine-tune that stopped refusing drug requests, audited like A: another model's direction."""
    other = Path(__file__).parents[1] / "examples" / "tiny-refuser-no-drugs"
    config = AuditConfig(model=str(other), max_pairs=16, n_boot=200, components=["mlp_out"], positions=["all"],
                         tricky="")
    return audit(config, progress=False)


def test_refusal_directions_are_compared_by_cosine(report_a, report_no_drugs):
    from refusal_eval.report.comparison_markdown import render_comparison_markdown, summary_lines

    same = compare_reports(report_a, report_a, n_boot=N_BOOT).refusal_direction
    assert same.cosine == pytest.approx(1.0, abs=1e-9) and same.reason is None
    assert same.refusal_after_ablation.diff == 0.0 and same.layer_a == same.layer_b
    c = compare_reports(report_a, report_no_drugs, n_boot=N_BOOT)
    d = c.refusal_direction
    va, vb = (np.array(r.refusal_direction.vector) for r in (report_a, report_no_drugs))
    assert d.cosine == pytest.approx(float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)), abs=1e-9)
    assert -1.0 <= d.cosine < 1.0 - 1e-3  # another model: another direction
    after_a, after_b = (r.refusal_direction.refusal_after_ablation for r in (report_a, report_no_drugs))
    assert (d.refusal_after_ablation.a, d.refusal_after_ablation.b) == (after_a, after_b)
    assert d.refusal_after_ablation.diff == pytest.approx(after_b.rate - after_a.rate)
    assert f"cosine between A's and B's refusal directions {d.cosine:.3f}" in d.words
    assert d.words in render_comparison_markdown(c) and any(d.words in line for line in summary_lines(c))
    # older reports (schema < 1.7) have no section; a different hidden size is another space
    old = report_no_drugs.model_copy(update={"refusal_direction": None})
    gone = compare_reports(report_a, old, n_boot=N_BOOT).refusal_direction
    assert gone.cosine is None and "B (tiny-refuser-no-drugs) has no refusal direction section" in gone.reason
    assert compare_reports(old, old, n_boot=N_BOOT).refusal_direction is None
    short = report_no_drugs.refusal_direction.model_copy(update={"vector": list(vb[:64])})
    small = compare_reports(report_a, report_no_drugs.model_copy(update={"refusal_direction": short}), n_boot=N_BOOT)
    assert small.refusal_direction.cosine is None and "different spaces" in small.refusal_direction.reason
