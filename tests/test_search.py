"""The adaptive search (issue 26): on a synthetic grid with known shares it never drops a planted cell that its
rules reach, its sampled bound on the pruned cells holds at its stated level over seeds, and on the tiny refuser
every cell it patches carries the exhaustive audit's numbers."""

from __future__ import annotations

import numpy as np
import pytest

from refusal_eval import AuditConfig
from refusal_eval.patching.components import DEFAULT_KINDS, Component, components_at, trivial_reason
from refusal_eval.pipeline import search as search_module
from refusal_eval.pipeline.search import (
    BOUND_SHARE,
    KEEP_SHARE,
    Grid,
    adaptive_search,
    exhaustive_info,
    planning_shares,
    upper_fraction,
)

N_PAIRS, WIDTH, SUFFIX, LAYERS, HEADS = 16, 30, 3, 8, 4
CONFIG = AuditConfig(seed=0)


def synthetic_grid() -> Grid:
    positions = [None, *range(-WIDTH, 0)]
    return Grid(components_at(list(DEFAULT_KINDS), LAYERS, HEADS, positions), SUFFIX, LAYERS)


def oracle(grid: Grid, shares: dict[Component, float], rng: np.random.Generator):
    """Exact 'patching' of a synthetic model: effect = share x gap per pair, plus noise far below KEEP_SHARE; counts
    how often each cell was patched."""
    gaps = rng.uniform(1.5, 2.5, N_PAIRS)
    truth = np.array([shares.get(c, 0.0) for c in grid.components])
    noise = rng.normal(0.0, 1e-4, (len(truth), N_PAIRS))
    calls = np.zeros(len(truth), dtype=int)
    values = truth[:, None] * gaps[None, :] + noise

    def patch(rows: np.ndarray) -> np.ndarray:
        calls[rows] += 1
        return values[rows]

    return patch, gaps, truth, calls, values


def planted() -> dict[Component, float]:
    """Cells reachable by the rules: a large MLP at every position (opens its layer), a large attention output at a
    position of the template suffix with a large head under it, the stream at one early position flagged by the
    attribution estimate and carried on to the next layer, and a writer found only by the estimate. (The token swap
    under that stream is large too, but trivial: never searched.)"""
    return {
        Component("mlp_out", 2): 0.3, Component("mlp_out", 2, None, -1): 0.1,
        Component("mlp_out", 2, None, -17): 0.2,  # single position, found by refining layer 2's MLP
        Component("attn_out", 5, None, -2): 0.15, Component("head", 5, 1, -2): 0.12,
        Component("attn_out", 5): 0.05,
        Component("attn_out", 5, None, -9): 0.04,  # found by refining layer 5's attention output
        Component("head", 5, 3, -9): 0.03,  # under a large attention output at -9
        Component("resid_pre", 1, None, -20): 0.4,  # flagged by the estimate; opens layers 1 and 2 of the stream
        Component("resid_pre", 2, None, -20): 0.03,
        Component("mlp_out", 6, None, -12): 0.08,  # its layer's coarse cells are 0: only the estimate finds it
    }


def test_pruning_never_drops_a_planted_cell_its_rules_reach():
    grid = synthetic_grid()
    swap = Component("resid_pre", 0, None, -20)
    patch, gaps, truth, calls, values = oracle(grid, {**planted(), swap: 0.5}, np.random.default_rng(0))
    guess = {Component("mlp_out", 6, None, -12): 0.08, Component("resid_pre", 1, None, -20): 0.3}
    flagged = np.array([guess.get(c, 0.0) for c in grid.components])

    def estimate(rows: np.ndarray) -> np.ndarray:
        assert not grid.trivial[rows].any()  # trivial cells are never estimated
        return flagged[rows, None] * gaps[None, :]

    result = adaptive_search(grid, patch, estimate, gaps, CONFIG)
    patched = {grid.components[k] for k in result.rows}
    assert set(planted()) <= patched
    assert calls.max() == 1  # no cell patched twice
    assert not calls[grid.trivial].any() and swap not in patched  # the trivial cells are not searched
    assert result.rows.tolist() == sorted(np.flatnonzero(calls).tolist())
    np.testing.assert_array_equal(result.effects, values[result.rows])  # the oracle's own numbers
    info = result.info
    assert info.mode == "adaptive" and info.n_grid == len(grid.components) and info.n_patched == len(patched)
    assert sum(s.patched for s in info.steps) == info.n_patched
    assert info.n_trivial == int(grid.trivial.sum()) > 0 and f"the {info.n_trivial} trivial cells" in info.summary
    assert info.n_attribution_flagged == 2 and info.bound_holds and info.n_sampled_exceeding == 0
    assert info.n_patched - info.n_sampled < len(grid.components) / 5  # the rules opened a fifth; the rest: sample
    assert info.bound_fraction == pytest.approx(upper_fraction(0, info.n_sampled, CONFIG.ci_level))
    assert f"none of {info.n_sampled} cells sampled" in info.summary
    # what was not patched is exactly the cells no rule reached (their share is 0 here) and the trivial ones
    unpatched = ~np.isin(np.arange(len(truth)), result.rows)
    assert not np.abs(truth[unpatched & ~grid.trivial]).any()


def test_a_large_cell_found_by_the_sample_opens_its_group_and_a_new_sample_is_drawn():
    grid = synthetic_grid()
    hidden = {Component("mlp_out", 4, None, -k): 0.05 for k in range(5, 30)}  # coarse MLP cells of layer 4 are 0
    patch, gaps, _, calls, _ = oracle(grid, hidden, np.random.default_rng(1))
    result = adaptive_search(grid, patch, None, gaps, CONFIG)
    patched = {grid.components[k] for k in result.rows}
    assert set(hidden) <= patched and calls.max() == 1
    info = result.info
    assert [s.step for s in info.steps] == ["coarse", "sample 1", "refine", "sample 2"]
    assert info.steps[1].large > 0 and info.rounds == 2 and info.n_sampled_exceeding == 0 and info.bound_holds


def test_the_sampled_bound_covers_the_pruned_cells_at_its_stated_level():
    """Large cells no rule reaches (their coarse cells are 0), scattered at random: over seeds, the fraction of the
    pruned cells that are large is at most the reported bound in at least 95% of runs (Clopper-Pearson is
    conservative: the measured coverage is printed)."""
    grid = synthetic_grid()
    fine = [c for c, coarse in zip(grid.components, grid.coarse, strict=True)
            if not coarse and c.kind in ("attn_out", "mlp_out") and c.position is not None]
    # a large cell would open its whole group: hide them by making every cell a group of its own
    grid.group = [(k,) for k in range(len(grid.components))]
    covered, holds, runs = 0, 0, 200
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(fine), size=rng.integers(1, 12), replace=False)
        shares = {fine[i]: float(rng.choice([-1, 1]) * rng.uniform(BOUND_SHARE, 0.1)) for i in picks}
        patch, gaps, truth, _, _ = oracle(grid, shares, rng)
        result = adaptive_search(grid, patch, None, gaps, AuditConfig(seed=seed))
        info, unpatched = result.info, np.ones(len(truth), dtype=bool)
        unpatched[result.rows] = False
        # the pruned set the last sample was drawn from: the large cells still unpatched and those it drew
        large = int((np.abs(truth[unpatched]) >= BOUND_SHARE).sum()) + info.n_sampled_exceeding
        covered += large / info.n_pruned <= info.bound_fraction
        holds += info.bound_holds
    print(f"\ncoverage {covered}/{runs}, bound reached (no large cell in the last sample) in {holds}")
    assert covered >= 0.95 * runs


def test_planning_shares_are_the_ratio_of_sums_with_the_gap_at_least_min_gap():
    effects = np.array([[1.0, 3.0], [np.nan, 2.0]])
    np.testing.assert_allclose(planning_shares(effects, np.array([4.0, 4.0]), 0.5), [0.5, 0.5])
    # a gap near 0 counts as min_gap: nothing looks large by division
    np.testing.assert_allclose(planning_shares(effects, np.array([0.01, -0.01]), 0.5), [4.0, 4.0])
    assert upper_fraction(0, 400, 0.95) == pytest.approx(1 - 0.05 ** (1 / 400))
    assert upper_fraction(3, 3, 0.95) == 1.0


def test_exhaustive_info_patches_every_cell():
    info = exhaustive_info(120)
    assert info.mode == "exhaustive" and info.n_patched == info.n_grid == 120 and info.bound_holds
    assert KEEP_SHARE < BOUND_SHARE


def test_on_the_tiny_refuser_every_patched_cell_has_the_exhaustive_numbers(monkeypatch):
    """A real engine: with a small sample the search prunes; each cell it patched moves every pair's score as in
    the exhaustive audit (within float rounding: the cells are batched differently), every cell of the exhaustive
    audit at |share| >= 0.02 is patched, and the random-weights control patches the audit's cells."""
    from refusal_eval.audit import analyse, load_inputs, random_analysis
    from refusal_eval.models.loading import load_model

    config = AuditConfig(max_pairs=10, n_boot=200, n_permutations=200, tricky="", search="exhaustive")
    loaded, inputs = load_model(), load_inputs(config)
    full = analyse(loaded, inputs, config, progress=False)
    monkeypatch.setattr(search_module, "SAMPLE_CELLS", 40)
    adaptive = config.model_copy(update={"search": "adaptive"})
    found = analyse(loaded, inputs, adaptive, progress=False)
    index = {c: k for k, c in enumerate(full.components)}
    rows = [index[c] for c in found.components]
    assert found.search.n_patched == len(rows) < len(full.components) == found.search.n_grid
    np.testing.assert_allclose(found.effects, full.effects[rows], atol=1e-5)
    shares = planning_shares(full.effects, full.gaps, config.min_gap)
    large = {full.components[k] for k in np.flatnonzero(np.abs(shares) >= BOUND_SHARE)}
    trivial = {c for c in full.components if trivial_reason(c, loaded.n_layers)}
    # the whole input of a layer is trivial by construction: its patch moves every pair by the whole gap
    np.testing.assert_allclose(full.effects[index[Component("resid_pre", 2)]], full.gaps, atol=1e-5)
    assert large - trivial <= set(found.components) and not trivial & set(found.components)
    control = random_analysis(found, inputs, adaptive, progress=False)
    assert [c.id for c in control.components] == [c.id for c in found.components] and control.search is None
