"""Honest approximations (issue 14, item 4): attribution estimates carry no interval and no significance, the
verified cells keep exact patching's numbers, the estimates' error is reported in share units, and no share rule,
comparison or picture treats an estimate as tested."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from refusal_eval import AuditConfig, audit
from refusal_eval.compare import compare_reports
from refusal_eval.gate import (
    ESTIMATE_REASON,
    check_baseline,
    check_share,
    evaluate_gate,
    parse_policy,
    top_components,
)
from refusal_eval.pytest_plugin import assert_component_share
from refusal_eval.report.markdown import render_markdown, summary_lines, verdict
from refusal_eval.report.plots import audit_picture
from refusal_eval.report.schema import AttributionInfo, AuditReport

CONFIG = AuditConfig(max_pairs=10, n_boot=200, n_permutations=2000, method="attribution+verify", verify_top=5,
                     verify_random=5, positions=["all"], tricky="", search="exhaustive")  # exact: the same grid


@pytest.fixture(scope="module")
def reports() -> dict[str, AuditReport]:
    """The same audit three ways: attribution with 10 verified cells, attribution alone, exact patching."""
    return {method: audit(CONFIG.model_copy(update={"method": method}), progress=False)
            for method in ("attribution+verify", "attribution", "exact")}


def _estimates(report: AuditReport):
    return [c for c in report.components if c.approximate]


def test_estimates_have_no_interval_and_are_never_significant(reports):
    verified, plain, exact = reports["attribution+verify"], reports["attribution"], reports["exact"]
    for report in (verified, plain):
        estimates = _estimates(report)
        assert estimates and report.shares_defined
        for c in estimates:
            assert c.share is not None, c.id
            assert c.significant is False, c.id
            assert (c.ci_low, c.ci_high, c.fw_low, c.fw_high, c.p_permutation, c.p_permutation_fw) == (None,) * 6
    # Not vacuous: exact patching finds significant components among the cells left as estimates, so a flag on an
    # estimate would have been possible (and the estimates are far from the exact shares there).
    sig_exact = {c.id for c in exact.components if c.significant and c.trivial is None}
    assert sig_exact & {c.id for c in _estimates(verified)}
    attn = "blocks.0.hook_attn_out"
    assert plain.component(attn).approximate and exact.component(attn).share > 0.9
    assert plain.component(attn).share < 0.5
    # The verdict counts exact cells only and says how many shares are estimates; its denominator leaves out the
    # trivial patches and the cells that moved no pair's score.
    n_sig = sum(bool(c.significant) for c in verified.components if c.trivial is None)
    patched = [c for c in verified.components if not c.approximate]
    moving = sum(c.trivial is None and any(c.effects) for c in patched)
    frozen = sum(c.trivial is None and not any(c.effects) for c in patched)
    trivial = sum(c.trivial is not None for c in verified.components)
    estimated = sum(c.trivial is None and c.approximate for c in verified.components)
    assert len(patched) == 10 and trivial and n_sig
    assert verdict(verified) == (
        f"refusal localised: {n_sig} significant of the {moving} exactly patched components that can move the score, "
        f"the other {estimated} are attribution estimates (no CI, never significant) ("
        + (f"{frozen} provably cannot move it, " if frozen else "") + f"{trivial} trivial patches left out)")
    assert verdict(plain).startswith(f"shares estimated, nothing tested: all "
                                     f"{sum(c.trivial is None for c in plain.components)} components that can move")
    assert verified.controls.permutation.n_components_p_below <= 10
    assert plain.controls.permutation.n_components_p_below == 0


def test_verified_cells_keep_exact_patchings_numbers(reports):
    verified, exact = reports["attribution+verify"], reports["exact"]
    ids = verified.attribution.verified_ids
    assert len(ids) == verified.attribution.n_verified == 10
    assert {c.id for c in verified.components if not c.approximate} == set(ids)
    for cid in ids:
        v, e = verified.component(cid), exact.component(cid)
        np.testing.assert_allclose(v.effects, e.effects, atol=1e-4, err_msg=cid)
        np.testing.assert_allclose([v.share, v.ci_low, v.ci_high], [e.share, e.ci_low, e.ci_high], atol=1e-5,
                                   err_msg=cid)
        assert v.significant is not None and v.fw_low is not None and v.p_permutation is not None
    # Some verified cell is significant there, as under exact patching.
    assert any(verified.component(cid).significant and exact.component(cid).significant for cid in ids)


def test_share_error_is_measured_against_exact_patching(reports):
    verified, plain, exact = reports["attribution+verify"], reports["attribution"], reports["exact"]
    a = verified.attribution
    ids = a.verified_ids
    # Independently: the estimated share is the attribution-only audit's, the exact one the exact audit's.
    errors = np.array([abs(plain.component(cid).share - exact.component(cid).share) for cid in ids])
    assert a.max_abs_share_error == pytest.approx(errors.max(), abs=1e-5)
    assert a.median_abs_share_error == pytest.approx(np.median(errors), abs=1e-5)
    assert a.max_abs_share_error > 0.1  # gradient estimates of the tiny refuser's top cells are far off
    est = np.array([plain.component(cid).share for cid in ids])
    ref = np.array([exact.component(cid).share for cid in ids])
    assert a.spearman == pytest.approx(spearmanr(est, ref).statistic, abs=1e-6)
    score = max(np.max(np.abs(np.array(plain.component(cid).effects) - np.array(exact.component(cid).effects)))
                for cid in ids)
    assert a.max_abs_score_error == pytest.approx(score, abs=1e-3)
    # Attribution alone verifies nothing: the report says so and gives no error.
    p = plain.attribution
    assert (p.n_verified, p.verified_ids, p.spearman, p.max_abs_share_error, p.max_abs_score_error) == (
        0, [], None, None, None)


def test_a_share_rule_never_passes_on_an_estimate(reports):
    report = reports["attribution+verify"]
    estimate = max(_estimates(report), key=lambda c: abs(c.share))
    for on in ("ci", "estimate", "familywise"):
        result = check_share(report, estimate.id, at_least=-1.0, on=on)
        assert not result.passed and result.message == ESTIMATE_REASON, on
        assert "estimated by attribution patching, not patched exactly" in result.line()
        assert "--method exact" in result.line()
    policy = parse_policy({"component_share": [{"id": estimate.id, "at_most": 10.0}]})
    gate = evaluate_gate(report, policy)
    assert not gate.passed and gate.failures[0].message == ESTIMATE_REASON
    with pytest.raises(AssertionError, match="estimated by attribution patching"):
        assert_component_share(report, estimate.id, at_least=-1.0, on="estimate")
    # A verified cell is judged on its interval as before.
    exact_cell = next(c for c in report.components if not c.approximate and c.trivial is None and c.ci_low > 0)
    assert check_share(report, exact_cell.id, at_least=exact_cell.ci_low - 1e-3).passed
    assert not check_share(report, exact_cell.id, at_least=exact_cell.ci_low + 1e-3).passed
    # A baseline rule compares estimates neither.
    results = check_baseline(report, reports["exact"], top_k=len(report.components), max_drop=10.0)
    failed = {r.name.removeprefix("baseline[")[:-1] for r in results if not r.passed}
    assert failed == {c.id for c in top_components(reports["exact"], len(report.components)) if c.id in
                      {e.id for e in _estimates(report)}}
    assert all("the report's share is " + ESTIMATE_REASON in r.message for r in results if not r.passed)


def test_markdown_and_headline_show_estimates_as_estimates(reports):
    verified, plain = reports["attribution+verify"], reports["attribution"]
    md = render_markdown(verified)
    a = verified.attribution
    for c in _estimates(verified):
        if c.head is None:  # the per-layer table lists every all-position component
            assert f"≈{c.share:.3f} (estimate; no CI)" in md, c.id
    assert (f"on them the estimated share is off by at most {a.max_abs_share_error:.3f} (median "
            f"{a.median_abs_share_error:.3f}) in share units (fractions of the gap)") in md
    assert f"rank correlation of estimated and exact shares {a.spearman:.3f}" in md
    assert "the 10 listed in attribution.verified_ids" in md
    assert f"{a.max_abs_score_error:.2f} (refusal-score units, nats)" in md
    assert "largest error" not in md
    headline = "\n".join(summary_lines(verified))
    n = len(verified.components)
    assert f"method attribution+verify: {n - 10} of {n} shares are first-order (gradient) estimates" in headline
    assert f"off by at most {a.max_abs_share_error:.3f}" in headline
    plain_md = render_markdown(plain)
    assert "no cell was patched exactly, so the estimates' error is unknown" in plain_md
    assert "no cell was patched exactly" in "\n".join(summary_lines(plain))


def test_comparisons_and_pictures_never_call_an_estimate_significant(reports):
    exact, plain, verified = reports["exact"], reports["attribution"], reports["attribution+verify"]
    c = compare_reports(exact, plain, n_boot=200)
    # The estimates are far from the exact shares (a real difference of method), yet no change is significant.
    assert max(abs(x.diff) for x in c.components) > 0.3
    assert c.ranking == [] and not any(x.significant for x in c.components)
    assert any("attribution estimates in A or B" in w for w in c.warnings)
    c2 = compare_reports(exact, verified, n_boot=200)
    assert all(not x.significant for x in c2.components if verified.component(x.id).approximate)
    picture = audit_picture(verified)
    by_id = {(x.kind, x.layer, x.head, x.position): x for x in picture.cells}
    for comp in _estimates(verified):
        if comp.trivial is None:
            cell = by_id[(comp.kind, comp.layer, comp.head, comp.position)]
            assert not cell.significant and cell.low is None and cell.high is None


def test_older_reports_load_with_the_score_error_named_by_its_unit():
    old = {"n_verified": 2, "n_top": 1, "n_random": 1, "spearman": None, "max_abs_error": 22.834,
           "verified_ids": ["a", "b"]}
    info = AttributionInfo.model_validate(old)
    assert info.max_abs_score_error == 22.834 and info.max_abs_share_error is None
    assert "max_abs_error" not in info.model_dump()
