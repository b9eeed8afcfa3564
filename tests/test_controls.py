"""The guards and controls of issue 9 on the shipped tiny-refuser: still localised, with controls that agree."""

from __future__ import annotations

import numpy as np
import pytest

from refusal_eval import AuditConfig, audit
from refusal_eval.audit import gap_verdict, ranked
from refusal_eval.patching.components import DEFAULT_KINDS, Component, components_at, trivial_reason
from refusal_eval.pipeline.controls import last_position_finding
from refusal_eval.report import schema as rs
from refusal_eval.report.markdown import render_markdown, summary_lines, verdict
from refusal_eval.stats import sign_flip_test

# The schema-1.0 audit of the same model on the same eval split (token sets from the scored replies, wrong-sign
# pairs dropped), from the report committed before the guards: (share, CI low, CI high).
BEFORE = {
    "blocks.0.hook_attn_out": (0.998, 0.995, 1.000),
    "blocks.3.hook_resid_pre@-1": (0.853, 0.841, 0.867),
    "blocks.0.hook_mlp_out": (0.815, 0.793, 0.836),
}


@pytest.fixture(scope="module")
def report() -> rs.AuditReport:
    return audit(AuditConfig(controls=["random"], tricky=""), progress=False)


def test_tiny_refuser_is_still_localised_on_its_eval_split(report):
    assert report.behaviour.refuses and report.shares_defined
    assert report.gap.verdict == "separated" and report.gap.n_pairs == report.dataset.n_pairs == 77
    assert report.gap_all_pairs == report.gap  # every pair is patchable: nothing excluded, nothing selected
    assert report.gap.p_permutation < 0.001
    for cid, (_, low, high) in BEFORE.items():
        assert low <= report.component(cid).share <= high, cid
    # token sets come from the train split's replies, never the scored pairs
    assert report.metric.token_set_source == "calibration" and report.dataset.n_calibration == 99
    assert "train split" in report.metric.derivation


def test_significance_needs_both_families_and_the_noise_floor(report):
    alpha = 1 - report.stats.level
    significant = [c for c in report.components if c.significant]
    assert significant
    for c in report.components:
        wanted = ((c.fw_low > 0 or c.fw_high < 0) and c.p_permutation_fw < alpha
                  and max(abs(e) for e in c.effects) > report.stats.resolution_effect)
        assert c.significant == wanted, c.id
    # the permutation p-values are those of the effects in the report (stored rounded to 1e-6: compare where
    # the rounding cannot matter)
    effects = np.array([c.effects for c in report.components])
    perm = sign_flip_test(effects, report.controls.permutation.n_permutations, report.stats.seed)
    large = np.abs(effects).min(axis=1) > 1e-3
    assert large.sum() > 20
    np.testing.assert_allclose(np.array([c.p_permutation for c in report.components])[large], perm.p[large])


def test_noise_floor_is_tiny_in_float32(report):
    floor = report.controls.noise_floor
    assert floor.dtype == "float32" and 0 <= floor.max_abs < 1e-5
    # sampled: 2 components per stratum (kind, layer, position class) with an effect; the rules use 4 times the largest
    measured = [c for c in report.components if c.noise_floor is not None]
    assert len(measured) == floor.n_measured and floor.cells_per_stratum == 2
    assert floor.n_strata < floor.n_measured <= 2 * floor.n_strata < len(report.components) / 5
    assert all(c.noise_floor < 1e-5 for c in measured) and floor.bound == pytest.approx(4 * floor.max_abs)
    assert report.stats.resolution_effect >= 10 * floor.bound
    assert floor.n_exact_zero == sum(max(map(abs, c.effects)) == 0 for c in report.components)


def test_random_weights_control_finds_nothing(report):
    control = report.controls.random
    assert control is not None and control.weights_sha256 != report.model.weights_sha256
    assert not control.refuses and not control.gap.separated
    assert control.n_significant == 0 and control.n_significant_forced == 0
    assert control.n_components == len(report.components)
    markdown = render_markdown(report)
    assert "**Random weights**" in markdown and "**Label permutation**" in markdown
    assert any(line.startswith("random-weights control:") for line in summary_lines(report))


def test_trivial_patches_are_left_out_of_the_default_search(report):
    """The adaptive search does not patch the trivial cells (the whole input of a layer, the token swap): they are
    counted, named in the search's words and in the verdict, and none reaches the tables (an exhaustive audit
    patches and flags them: tests/test_search.py checks they move the score by the whole gap)."""
    widths = report.search.n_grid // (4 * 7) - 1  # 4 layers x (stream, attention, MLP, 4 heads) per position
    grid = components_at(list(DEFAULT_KINDS), 4, 4, [None, *range(-widths, 0)])
    n_trivial = sum(trivial_reason(c, 4) is not None for c in grid)
    assert report.search.n_trivial == n_trivial > 0 and len(grid) == report.search.n_grid
    assert all(c.trivial is None for c in report.components)
    assert f"the {n_trivial} trivial cells" in report.search.summary
    assert f"{n_trivial} trivial patches left out" in verdict(report)
    summary = render_markdown(report).split("## Behaviour")[0]
    assert "`blocks.0.hook_resid_pre`" not in summary
    assert report.findings and "rises most between layers 2 and 3" in report.findings[0]
    assert "first lies wholly above 0.5 at layer 3" in report.findings[0]


def test_the_verdict_counts_only_components_that_can_move_the_score(report):
    moving = [c for c in report.components if c.trivial is None and max(map(abs, c.effects)) > 0]
    frozen = sum(c.trivial is None and max(map(abs, c.effects)) == 0 for c in report.components)
    trivial = report.search.n_trivial  # left out of the search
    n_sig = sum(bool(c.significant) for c in moving)
    assert n_sig and frozen and trivial and len(moving) + frozen == len(report.components)
    assert verdict(report) == (f"refusal localised: {n_sig} significant of the {len(moving)} components that can move "
                               f"the score ({frozen} provably cannot move it, {trivial} trivial patches left out)")
    # Nothing significant: the headline says so instead of "localised".
    nothing = report.model_copy(update={"components": [c.model_copy(update={"significant": False})
                                                       for c in report.components]})
    assert verdict(nothing).startswith(f"no component significant of the {len(moving)} components that can move")
    assert "localised" not in render_markdown(nothing).split("## Behaviour")[0]


def test_heterogeneity_of_top_components(report):
    top = [h.id for h in report.heterogeneity]
    writers = [c for c in ranked(report.components) if c.kind in ("attn_out", "mlp_out", "head")]
    assert top == [c.id for c in writers[:10]] and len(top) == 10
    h = report.heterogeneity[0]
    assert h.loo_min <= report.component(h.id).share <= h.loo_max and not h.concentrated
    assert sum(s.n_pairs for s in h.by_category.values()) == report.dataset.n_used


def test_trivial_reason_by_construction():
    n = 4
    assert trivial_reason(Component("resid_pre", 2, None, None), n)
    assert trivial_reason(Component("embed", 0, None, -3), n)
    assert trivial_reason(Component("resid_post", 3, None, -1), n)
    assert trivial_reason(Component("resid_post", 3, None, -2), n) is None  # not the scored position
    assert trivial_reason(Component("resid_pre", 1, None, -1), n) is None
    assert trivial_reason(Component("mlp_out", 0, None, None), n) is None


def test_gap_verdicts():
    assert gap_verdict(1.0, 2.0, 0.69) == "separated"
    assert gap_verdict(0.01, 0.02, 0.69) == "negligible"
    assert gap_verdict(-0.1, 0.2, 0.69) == "includes_zero"
    assert gap_verdict(-0.3, -0.1, 0.69) == "reversed"
    assert gap_verdict(0.01, 0.02, 0.0) == "separated"
    # 4 pairs, all positive: the smallest two-sided sign-flip p is 2/16, whatever the bootstrap CI says
    assert gap_verdict(9.8, 20.7, 0.69, p_value=0.125) == "inconclusive"
    assert gap_verdict(9.8, 20.7, 0.69, p_value=0.001) == "separated"


def _resid(layer: int, effects: np.ndarray, gaps: np.ndarray, low: float, high: float) -> rs.ComponentResult:
    c = Component("resid_pre", layer, None, -1)
    return rs.ComponentResult(id=c.id, hook_name=c.hook_name, kind="resid_pre", layer=layer, head=None, position=-1,
                              share=float(effects.sum() / gaps.sum()), ci_low=low, ci_high=high, fw_low=low,
                              fw_high=high, significant=True, effects=effects.tolist())


def test_last_position_finding_in_words():
    rng = np.random.default_rng(0)
    gaps = rng.gamma(4, 1, 60)
    chain = [_resid(layer, fraction * gaps + rng.normal(0, 0.05, 60), gaps, fraction - 0.05, fraction + 0.05)
             for layer, fraction in ((1, 0.2), (2, 0.3), (3, 0.85), (4, 0.9))]
    (found,) = last_position_finding(chain, gaps, 0.95, 2000, "percentile", 0)
    step = chain[2].share - chain[1].share
    assert found.startswith(f"The share of the residual stream at the last prompt token rises most between layers 2 "
                            f"and 3: +{step:.3f}")
    assert "first lies wholly above 0.5 at layer 3" in found
    # The step's CI against a percentile bootstrap over pairs written here (another random stream: within 0.01).
    low, high = map(float, found.split("CI [")[1].split("]")[0].split(", "))
    diff = np.array(chain[2].effects) - np.array(chain[1].effects)
    draws = rng.integers(0, 60, (4000, 60))
    boot = diff[draws].sum(1) / gaps[draws].sum(1)
    assert low == pytest.approx(np.quantile(boot, 0.025), abs=0.01)
    assert high == pytest.approx(np.quantile(boot, 0.975), abs=0.01)
    # Steps within noise: no step is named as one, and a chain that never clears 0.5 says so.
    flat = [_resid(layer, 0.3 * gaps + rng.normal(0, 1.0, 60), gaps, 0.2, 0.4) for layer in (1, 2, 3)]
    (words,) = last_position_finding(flat, gaps, 0.95, 2000, "percentile", 0)
    assert words.startswith("No step between two layers is shown") and "includes 0" in words
    assert "At no layer is its share shown to exceed 0.5" in words
    assert last_position_finding([], gaps, 0.95, 2000, "percentile", 0) == []


def _behaviour(harmful: int, benign: int, n: int = 60) -> rs.Behaviour:
    from refusal_eval.audit import rate

    return rs.Behaviour(harmful_refusal=rate(harmful, n, 0.95), benign_compliance=rate(n - benign, n, 0.95),
                        benign_over_refusal=rate(benign, n, 0.95))


def _gap(low: float, high: float, n: int = 60) -> rs.Gap:
    verdict = gap_verdict(low, high, 0.69)
    return rs.Gap(mean=(low + high) / 2, ci_low=low, ci_high=high, total=n * (low + high) / 2,
                  separated=verdict == "separated", verdict=verdict, n_pairs=n)


def test_behaviour_gate_and_force_shares():
    """SmolLM2's case: 3/60 harmful refused, 4/60 benign over-refused. The Wilson intervals overlap, so there is
    no refusal to localise even with a separated score gap; --force-shares computes shares and says so."""
    from refusal_eval.audit import _shares_rule

    weak, separated = _behaviour(3, 4), _gap(0.8, 1.2)
    config = AuditConfig()
    defined, reason, warnings = _shares_rule(weak, False, separated, separated, config)
    assert not defined and reason.startswith("no refusal behaviour to localise") and "3/60" in reason
    defined, reason, warnings = _shares_rule(weak, False, separated, separated, config.model_copy(
        update={"force_shares": True}))
    assert defined and "forced" in reason and warnings[0].startswith("SHARES FORCED")
    # a refusing model with a negligible or reversed gap still gets no shares, forced or not
    strong = _behaviour(58, 1)
    for low, high, word in ((0.01, 0.05, "smallest gap"), (-0.5, -0.1, "below 0"), (-0.2, 0.3, "includes 0")):
        defined, reason, warnings = _shares_rule(strong, True, _gap(low, high), _gap(low, high), config.model_copy(
            update={"force_shares": True}))
        assert not defined and word in reason
    assert any(w.startswith("REVERSED") for w in _shares_rule(strong, True, _gap(-0.5, -0.1), _gap(-0.5, -0.1),
                                                                  config)[2])
    # the gap over all scored pairs is reported when it disagrees with the patched pairs' gap
    warnings = _shares_rule(strong, True, _gap(-0.2, 0.3, 77), _gap(1.0, 2.0, 30), config)[2]
    assert any("over all 77 scored pairs includes 0" in w for w in warnings)


def test_the_default_search_is_adaptive_and_patches_the_whole_small_grid(report):
    """The tiny refuser's grid is small: the adaptive search's rules and its sample of 400 cover all of it, so the
    default audit patches every cell, as an exhaustive one would, and says so."""
    search = report.search
    n = search.n_patched
    assert search.mode == "adaptive" and n + search.n_trivial == search.n_grid == 784 and len(report.components) == n
    assert search.bound_holds and search.bound_fraction is None and "nothing pruned" in search.summary
    assert [s.step for s in search.steps][0] == "coarse" and sum(s.patched for s in search.steps) == n
    assert f"- Search: **adaptive**, {n} of 784 cells patched exactly (coarse {search.steps[0].patched}" \
        in render_markdown(report)


def test_the_random_weights_copy_has_no_refusal_direction(report):
    """The copy's best candidate direction, ablated, removes no measurable part of its gap: its CI includes 0, and
    the Controls section says so (a CI that excluded 0 would be reported as a finding)."""
    x = report.controls.random.direction
    assert x is not None and x.includes_zero and x.gap_removed.ci_low <= 0.0 <= x.gap_removed.ci_high
    assert "a CI that includes 0, as it should" in x.words and "**a finding**" not in x.words
    assert f"- **Random weights, refusal direction**: {x.words}." in render_markdown(report)
    assert report.refusal_direction.computed and report.refusal_direction.gap_removed.ci_low > 0  # the model's own
