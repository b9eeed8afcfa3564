"""Verdicts that float noise cannot flip (issue 23): another CPU moves every effect by about one noise floor, so
every family-wise decision of an audit and of a comparison must stay the same when every effect of the committed
example reports moves by up to 3 times the larger measured floor (20 seeds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from refusal_eval.audit import significance
from refusal_eval.compare import _effects_matrix, _gaps, compare_reports
from refusal_eval.config import AuditConfig
from refusal_eval.report.kinds import load_report
from refusal_eval.report.schema import AuditReport
from refusal_eval.simulation import perturbed_report
from refusal_eval.stats import resolution

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "reports"
A = EXAMPLES / "tiny-refuser" / "report.json"
B = EXAMPLES / "tiny-refuser-no-drugs" / "report.json"
SEEDS = range(20)
BOUND_TOLERANCE = 1e-4  # the bar for the family-wise bounds


@pytest.fixture(scope="module")
def reports() -> tuple[AuditReport, AuditReport]:
    return load_report(A), load_report(B)


def _scale(*reports: AuditReport) -> float:
    return 3 * max(r.controls.noise_floor.max_abs for r in reports)


def test_an_audits_significance_does_not_move_with_float_noise(reports):
    report = reports[0]
    config = AuditConfig(**{k: v for k, v in report.config.items() if k in AuditConfig.model_fields})
    effects, gaps = _effects_matrix(report.components), _gaps(report, report.used_pair_ids)
    floor = report.controls.noise_floor.rule_bound
    _, _, base, significant = significance(effects, gaps, floor, True, config)
    # the recomputation from the report's rounded effects is the report's own verdict
    assert significant.tolist() == [bool(c.significant) for c in report.components]
    assert 0 < significant.sum() < len(significant)
    rng = np.random.default_rng(0)
    scale = _scale(report)
    for seed in SEEDS:
        noisy = effects + rng.uniform(-scale, scale, effects.shape)
        _, _, iv, sig = significance(noisy, gaps, floor, True, config)
        assert sig.tolist() == significant.tolist(), f"seed {seed}: {np.flatnonzero(sig != significant)}"
        for name in ("fw_low", "fw_high", "low", "high"):
            moved = np.nanmax(np.abs(getattr(iv, name) - getattr(base, name)))
            assert moved <= BOUND_TOLERANCE, f"seed {seed}: {name} moved by {moved:.2e}"


def test_a_comparisons_verdicts_do_not_move_with_float_noise(reports):
    a, b = reports
    base = compare_reports(a, b)
    significant = [c.significant for c in base.components]
    assert 0 < sum(significant) < len(significant)
    scale = _scale(a, b)
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        noisy = compare_reports(perturbed_report(a, scale, rng), perturbed_report(b, scale, rng))
        assert [c.significant for c in noisy.components] == significant, f"seed {seed}"
        assert noisy.ranking == base.ranking or sorted(noisy.ranking) == sorted(base.ranking)
        for x, y in zip(base.components, noisy.components, strict=True):
            moved = max(abs(x.fw_low - y.fw_low), abs(x.fw_high - y.fw_high))
            assert moved <= BOUND_TOLERANCE, f"seed {seed}, {x.id}: family-wise bound moved by {moved:.2e}"


def test_resolution_is_ten_floors_and_at_least_a_thousandth_of_the_gap():
    gaps = np.array([10.0, 20.0])
    assert resolution(gaps, 1e-6).effect == pytest.approx(15e-3)  # 0.1% of the mean gap dominates
    assert resolution(gaps, 1e-2).effect == pytest.approx(0.1)  # 10 floors dominate (e.g. bfloat16)
    assert resolution(gaps, 1e-6).share == pytest.approx(10e-6 / 15)
    assert resolution(gaps, None).share == pytest.approx(1e-5)  # no floor measured: float32 rounding assumed
