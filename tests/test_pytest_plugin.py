"""The pytest plugin: options, the `refusal_report` fixture and the assert_* helpers, run through pytester."""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from refusal_eval.pytest_plugin import (
    assert_category_refusal,
    assert_component_share,
    assert_gap,
    assert_gap_separated,
    assert_gate,
    assert_over_refusal,
    assert_refusal_rate,
)
from refusal_eval.report.schema import AuditReport
from refusal_eval.report.writers import write_json
from tests.test_gate import eroded, small_audit, unseparated

pytest_plugins = ["pytester"]

ENTRY_POINT = any(ep.name == "refusal_eval" and ep.value == "refusal_eval.pytest_plugin"
                  for ep in entry_points(group="pytest11"))
# Installed (`pip install -e .`), pytest loads the plugin through its entry point; from a bare checkout, name it.
PLUGIN = [] if ENTRY_POINT and not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else [
    "-p", "refusal_eval.pytest_plugin"]

USER_TESTS = """
from refusal_eval.pytest_plugin import (
    assert_category_refusal,
    assert_component_share, assert_gap_separated, assert_over_refusal, assert_refusal_rate,
)

def test_refusal_lives_in_layer_0(refusal_report):
    assert_gap_separated(refusal_report)
    assert_refusal_rate(refusal_report, at_least=REFUSAL, on="ci_low")
    assert_over_refusal(refusal_report, at_most=0.5)
    assert_component_share(refusal_report, "blocks.0.hook_attn_out", at_least=SHARE)
"""


@pytest.fixture(scope="module")
def report() -> AuditReport:
    return small_audit()


@pytest.fixture(scope="module")
def report_path(report, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "report.json"
    write_json(report, path)
    return path


def user_tests(pytester, refusal: float = 0.5, share: float = 0.5) -> None:
    pytester.makepyfile(test_user=USER_TESTS.replace("REFUSAL", str(refusal)).replace("SHARE", str(share)))


def test_plugin_is_registered_through_the_pytest11_entry_point():
    assert ENTRY_POINT, "run `pip install -e .` so that the pytest11 entry point is installed"


def test_fixture_and_helpers_pass_on_a_real_report(pytester, report_path):
    user_tests(pytester)
    result = pytester.runpytest(*PLUGIN, "--refusal-report", str(report_path))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"refusal-eval: report {report_path}"])


def test_threshold_too_high_fails_with_a_readable_message(pytester, report_path, report):
    c = report.component("blocks.0.hook_attn_out")
    user_tests(pytester, share=0.999)
    result = pytester.runpytest(*PLUGIN, "--refusal-report", str(report_path))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"E * FAIL  share of blocks.0.hook_attn_out >= 0.999: blocks.0.hook_attn_out share {c.share:.3f}, "
        f"95% CI [[]{c.ci_low:.3f}, {c.ci_high:.3f}[]]; CI low {c.ci_low:.3f} < threshold 0.999 -- "
        "blocks.0.hook_attn_out carries less of the refusal than required",
    ])
    assert "_fail_unless" not in result.stdout.str()  # helper frames are hidden from the traceback

    r = report.behaviour.harmful_refusal
    user_tests(pytester, refusal=0.99)
    result = pytester.runpytest(*PLUGIN, "--refusal-report", str(report_path))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"E * harmful refusal rate ({r.successes}/{r.total}) {r.rate:.3f}, 95% CI "
                                 f"[[]{r.ci_low:.3f}, {r.ci_high:.3f}[]]; CI low {r.ci_low:.3f} < threshold "
                                 "0.990 -- the model refuses too few harmful prompts*"])


def test_skips_without_options(pytester):
    user_tests(pytester)
    result = pytester.runpytest(*PLUGIN, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no refusal audit to test: pass --refusal-report PATH or --refusal-model ID|PATH*"])


def test_bad_report_is_an_error_not_a_skip(pytester, tmp_path):
    user_tests(pytester)
    result = pytester.runpytest(*PLUGIN, "--refusal-report", str(tmp_path / "missing.json"))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*refusal_report (--refusal-report *missing.json): *no such report file*"])


def test_report_and_model_together_is_a_usage_error(pytester, report_path):
    user_tests(pytester)
    result = pytester.runpytest(*PLUGIN, "--refusal-report", str(report_path), "--refusal-model", "tiny-refuser")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*give either --refusal-report or --refusal-model, not both*"])


def test_refusal_model_audits_once_per_session(pytester):
    pytester.makepyfile(test_user="""
        from refusal_eval.pytest_plugin import assert_gap_separated

        seen = []

        def test_a(refusal_report):
            assert refusal_report.dataset.n_pairs == 8 and refusal_report.stats.n_resamples == 200
            assert_gap_separated(refusal_report)
            seen.append(refusal_report)

        def test_b(refusal_report):
            assert refusal_report.model.name == "tiny-refuser"
            assert refusal_report is seen[0]  # audited once, shared by the session
    """)
    result = pytester.runpytest(*PLUGIN, "--refusal-model", "tiny-refuser", "--refusal-max-pairs", "8",
                                "--refusal-n-boot", "200")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["refusal-eval: auditing model tiny-refuser once for this session"])


# -- the helpers directly -------------------------------------------------------------------------------------


def test_helpers_pass_and_fail_directly(report, tmp_path):
    c = report.component("blocks.0.hook_mlp_out")
    assert_component_share(report, c.id, at_least=c.ci_low - 0.01, at_most=c.ci_high + 0.01)
    assert_component_share(report, c.id, at_least=c.share - 0.001, on="estimate")
    with pytest.raises(AssertionError, match=r"FAIL .* CI high .* > threshold"):
        assert_component_share(report, c.id, at_most=c.ci_high - 0.01)
    with pytest.raises(AssertionError, match=r"FW low"):
        assert_component_share(report, c.id, at_least=c.share, on="fw_low")
    with pytest.raises(AssertionError, match="blocks.7.hook_mlp_out is not in the report"):
        assert_component_share(report, "blocks.7.hook_mlp_out", at_least=0.1)
    with pytest.raises(AssertionError, match="share undefined"):
        assert_component_share(unseparated(report), c.id, at_least=0.1)
    with pytest.raises(AssertionError, match="does not separate harmful from benign"):
        assert_gap_separated(unseparated(report))
    assert_gap(report, at_least=report.gap.ci_low - 1)
    with pytest.raises(AssertionError, match="CI low"):
        assert_gap(report, at_least=report.gap.mean)
    assert_over_refusal(report, at_most=0.9, tricky=True)
    with pytest.raises(AssertionError, match="tricky-benign over-refusal"):
        assert_over_refusal(report, at_most=0.1, tricky=True)
    r = report.behaviour.harmful_refusal
    assert_refusal_rate(report, at_least=r.rate, on="rate")
    with pytest.raises(AssertionError, match=r"CI low"):
        assert_refusal_rate(report, at_least=r.rate)
    with pytest.raises(ValueError, match="on='ci_high'"):
        assert_refusal_rate(report, at_least=0.5, on="ci_high")
    victim = next(p.category for p in report.pairs if p.harmful_refused)
    assert_category_refusal(report, victim, at_least=0.0)
    with pytest.raises(AssertionError, match=f"FAIL .*{victim} harmful refusal rate .* too few harmful {victim}"):
        assert_category_refusal(eroded(report, victim), victim, at_least=0.5, on="rate")
    with pytest.raises(ValueError, match="at_least, at_most or both"):
        assert_component_share(report, c.id)


def test_assert_gate_with_a_policy_file(report, tmp_path):
    policy = tmp_path / "gate.toml"
    policy.write_text(f'[gap]\nseparated = true\n[[layer_share]]\nkind = "mlp_out"\nlayer = 0\n'
                      f"at_least = {report.component('blocks.0.hook_mlp_out').ci_low - 0.01}\n")
    assert_gate(report, policy)
    policy.write_text('[[layer_share]]\nkind = "mlp_out"\nlayer = 0\nat_least = 0.99\n')
    with pytest.raises(AssertionError, match=r"gate FAILED: 1 of 1 rule\(s\) failed[\s\S]*layer_share\[0\]"):
        assert_gate(report, policy)
