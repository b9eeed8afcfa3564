"""The audit's stages run alone, on inputs built by hand, and give what an independent computation gives."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from refusal_eval import AuditConfig
from refusal_eval.models.loading import load_model
from refusal_eval.patching import Component
from refusal_eval.stats import share_intervals


@pytest.fixture(scope="module")
def audit_module():
    import importlib

    return importlib.import_module("refusal_eval.audit")


def test_statistics_stage_alone_matches_share_intervals_and_flags_only_the_real_component(audit_module):
    rng = np.random.default_rng(0)
    gaps = rng.normal(10.0, 1.0, 40)
    effects = np.stack([0.5 * gaps + rng.normal(0, 0.3, 40), rng.normal(0, 0.3, 40)])
    scores = audit_module.Scores(m_h=list(gaps), m_b=[0.0] * 40, used=list(range(40)), exclusions=[],
                                 alignment="full", gaps=gaps, gap=None, gap_all=None, shares_defined=True,
                                 shares_reason="", warnings=[])
    plan = audit_module.PatchPlan(batch=None, suffix=1, components=[Component("mlp_out", 0), Component("mlp_out", 1)],
                                  families=[], on_full=None, full_cols=None, gap_full=None, warnings=[])
    config = AuditConfig(n_boot=500, n_permutations=500)
    st = audit_module.statistics_stage(None, plan, scores, effects, np.zeros(2, dtype=bool), config, noise=False,
                                       progress=False)
    assert st.floor is None
    reference = share_intervals(effects, gaps, 0.95, 500, "BCa", 0, outside_family=np.zeros(2, dtype=bool))
    np.testing.assert_array_equal(st.intervals.estimate, reference.estimate)
    np.testing.assert_allclose(st.intervals.estimate, effects.sum(1) / gaps.sum())  # ratio of sums, by hand
    assert st.significant.tolist() == [True, False]
    # an attribution estimate is never significant, whatever its numbers
    estimated = audit_module.statistics_stage(None, plan, scores, effects, np.array([True, False]), config,
                                              noise=False, progress=False)
    assert estimated.significant.tolist() == [False, False]


def test_plan_stage_alone_splits_mixed_lengths_into_two_families(audit_module):
    loaded = load_model()
    # pairs 0 and 2 have sides of equal length; pair 1 does not (its benign side is one token longer)
    harmful = [[5, 6, 7, 8, 9], [5, 6, 7, 8], [5, 7, 7, 8, 9]]
    benign = [[5, 6, 3, 8, 9], [5, 6, 4, 3, 8], [5, 7, 4, 8, 9]]
    inputs = SimpleNamespace(pairs=[SimpleNamespace(id=f"p{i}") for i in range(3)])
    gaps = np.array([3.0, 2.0, 4.0])
    scores = audit_module.Scores(m_h=list(gaps), m_b=[0.0] * 3, used=[0, 1, 2], exclusions=[], alignment="mixed",
                                 gaps=gaps, gap=None, gap_all=None, shares_defined=True, shares_reason="",
                                 warnings=[])
    config = AuditConfig(components=["mlp_out"], positions=["all", "last"], n_boot=200)
    plan = audit_module.plan_stage(loaded, inputs, harmful, benign, scores, config)
    n_layers = loaded.n_layers
    positions = [c.position for c in plan.components]
    assert positions.count(None) == positions.count(-1) == n_layers and len(positions) == 2 * n_layers
    assert plan.full_cols == [0, 2] and plan.on_full.tolist() == [p is None for p in positions]
    (rows_all, cols_all, _), (rows_full, cols_full, full_batch) = plan.families
    assert cols_all == [0, 1, 2] and cols_full == [0, 2] and list(full_batch.pair_ids) == ["p0", "p2"]
    assert plan.gap_full.mean == pytest.approx(3.5) and any("mixed alignment" in w for w in plan.warnings)
