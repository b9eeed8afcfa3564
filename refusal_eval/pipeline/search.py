"""Stage 5 of an audit under ``--search adaptive`` (the default): exact patching coarse to fine, with a sampled
bound on what the pruning missed.

The grid is the exhaustive one (``--components`` x ``--positions``). Every cell the search patches is patched exactly,
on every pair, by the same engine as an exhaustive audit: a patched cell's numbers are the exhaustive run's. The
trivial cells (:func:`~refusal_eval.patching.components.trivial_reason`: the residual stream at every position, the
token swap, the final stream at the scored position) are left out of the search: their patch is the run's own input
or output, a sanity check rather than a finding, and on a real model they are the coarse step's costliest cells
(every position through every layer). Steps, over the other cells:

1. **coarse**: every kind but heads at all positions at once, at the last position and at each position of the
   shared template suffix;
2. **attribution**: a gradient estimate of every other cell (one backward pass per pair chunk); the cells it puts
   at ``|share| >= KEEP_SHARE`` are patched exactly;
3. **refine** (to a fixed point): a patched cell at ``|share| >= KEEP_SHARE`` opens the rest of its kind and
   layer, every position (a head: its own head and layer); an attention output at a position opens its heads there;
   the residual stream at one position (not the last) opens its layer's and the next layer's stream at every
   position (:meth:`Grid.opened`);
4. **sample**: a seeded random sample of the cells still pruned (at most ``SAMPLE_CELLS``), patched exactly. None at
   ``|share| >= BOUND_SHARE`` bounds the fraction of pruned cells that large (one-sided Clopper-Pearson at the
   audit's level). A sampled cell that large opens its group as in step 3, and a fresh sample is drawn, up to
   ``MAX_ROUNDS`` samples; after that the report says the bound was not reached.

The shares the search decides on are the ratio of the cell's mean effect to the mean gap over its pairs, the gap
taken as at least ``min_gap`` (a model whose gap is near 0 does not make every cell look large). The thresholds are
fixed here, in advance, never fitted to a model's results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import beta

from refusal_eval.config import AuditConfig
from refusal_eval.patching.components import Component, trivial_reason
from refusal_eval.patching.exact import PatchEngine
from refusal_eval.pipeline.effects import patch_stage
from refusal_eval.pipeline.plan import PatchPlan
from refusal_eval.pipeline.scores import Scores
from refusal_eval.report import schema as rs

KEEP_SHARE = 0.01  # a patched cell at least this large (|share|) is refined; half the bound's size, for margin
BOUND_SHARE = 0.02  # the sampled bound is on pruned cells at least this large
SAMPLE_CELLS = 400  # pruned cells sampled per round (all of them when fewer)
MAX_ROUNDS = 3  # samples drawn at most; a sample with a large cell refines and draws again

_STREAMS = ("embed", "resid_pre", "resid_post")  # the residual stream (not a writer into it)

# effects [len(rows), pairs] of the given grid rows, patched exactly (or, for an estimate, None when there is none)
Patch = Callable[[np.ndarray], np.ndarray]


def planning_shares(effects: np.ndarray, gaps: np.ndarray, min_gap: float) -> np.ndarray:
    """[C] each row's mean effect over the pairs it was patched on (NaN: not patched) over the mean gap there,
    the gap taken as at least ``min_gap`` in size."""
    patched = np.isfinite(effects)
    n = np.maximum(patched.sum(axis=-1), 1)
    mean_effect = np.where(patched, effects, 0.0).sum(axis=-1) / n
    mean_gap = (patched * gaps).sum(axis=-1) / n
    return mean_effect / np.maximum(np.abs(mean_gap), min_gap)


def upper_fraction(k: int, n: int, level: float) -> float:
    """One-sided exact (Clopper-Pearson) upper confidence bound at ``level`` on a fraction seen k times in n draws."""
    return 1.0 if k >= n else float(beta.ppf(level, k + 1, n - k))


@dataclass
class Grid:
    """The search's view of the grid: which cells are coarse and which group each refines with."""

    components: list[Component]
    suffix: int
    n_layers: int
    trivial: np.ndarray = field(init=False)  # [C] bool: never searched
    coarse: np.ndarray = field(init=False)  # [C] bool
    group: list[tuple] = field(init=False)  # per cell: refined together (kind, layer, head)
    parent: np.ndarray = field(init=False)  # [C] a head's attention output at its position (row), else -1

    def __post_init__(self) -> None:
        index = {c: k for k, c in enumerate(self.components)}
        self.parent = np.array([index.get(Component("attn_out", c.layer, None, c.position), -1)
                                if c.kind == "head" else -1 for c in self.components])
        self.trivial = np.array([trivial_reason(c, self.n_layers) is not None for c in self.components], dtype=bool)
        in_suffix = [c.position is None or c.position >= -max(self.suffix, 1) for c in self.components]
        self.coarse = np.array(in_suffix) & (self.parent < 0) & ~self.trivial
        self.group = [(c.kind, c.layer, c.head) for c in self.components]

    def _groups(self, k: int) -> list[tuple]:
        """The groups a large cell opens: its own; for the residual stream at one position but the last, its own
        layer's and the next (what the stream carries at other positions moves on layer by layer), and none for
        the stream at every position (the layer's whole input: share 1 by construction) or at the last one (where
        it accumulates whatever any position contributed)."""
        c = self.components[k]
        if c.kind not in _STREAMS:
            return [self.group[k]]
        if c.position is None or c.position == -1:
            return []
        return [(c.kind, c.layer, None), (c.kind, c.layer + 1, None)]

    def opened(self, rows: np.ndarray, large: np.ndarray) -> set[int]:
        """The cells that patched cells ``rows`` at ``large`` [len(rows)] open: their groups' cells, and the heads
        under a large attention output."""
        groups = {g for k, big in zip(rows, large, strict=True) if big for g in self._groups(int(k))}
        parents = {int(k) for k, big in zip(rows, large, strict=True) if big}
        return {k for k in range(len(self.components)) if not self.trivial[k]
                and ((self.group[k] in groups and self.parent[k] < 0) or self.parent[k] in parents)}


@dataclass
class SearchResult:
    """The rows of the grid patched (sorted), their effects [len(rows), pairs] and the report's section."""

    rows: np.ndarray
    effects: np.ndarray
    info: rs.SearchInfo


class _State:
    """What the search has patched so far: effects [C, N] (NaN rows: not patched) and the steps."""

    def __init__(self, grid: Grid, n_pairs: int, patch: Patch, gaps: np.ndarray, min_gap: float) -> None:
        self.effects = np.full((len(grid.components), n_pairs), np.nan)
        self.done = np.zeros(len(grid.components), dtype=bool)
        self.searched = ~grid.trivial
        self.patch, self.gaps, self.min_gap = patch, gaps, min_gap
        self.steps: list[rs.SearchStep] = []

    def run(self, step: str, rows) -> np.ndarray:
        """Patch ``rows`` not patched yet; record the step; the shares of the rows patched."""
        rows = np.array(sorted(int(k) for k in rows if not self.done[k]), dtype=int)
        if not rows.size:
            return np.zeros(0)
        self.effects[rows] = self.patch(rows)
        self.done[rows] = True
        shares = planning_shares(self.effects[rows], self.gaps, self.min_gap)
        self.steps.append(rs.SearchStep(step=step, patched=int(rows.size),
                                        large=int((np.abs(shares) >= KEEP_SHARE).sum())))
        return shares

    def pruned(self) -> np.ndarray:
        """The searched cells not patched yet."""
        return np.flatnonzero(self.searched & ~self.done)

    def refine(self, grid: Grid) -> None:
        """Patch what the large patched cells open, until nothing new opens."""
        while True:
            rows = np.flatnonzero(self.done)
            large = np.abs(planning_shares(self.effects[rows], self.gaps, self.min_gap)) >= KEEP_SHARE
            new = [k for k in grid.opened(rows, large) if not self.done[k]]
            if not new:
                return
            self.run("refine", new)


def adaptive_search(grid: Grid, patch: Patch, estimate: Patch | None, gaps: np.ndarray, config: AuditConfig
                    ) -> SearchResult:
    """The coarse-to-fine search of the module docstring over ``grid``, patching through ``patch`` (exact effects
    of grid rows) and flagging through ``estimate`` (estimated effects, or None: no attribution step)."""
    state = _State(grid, len(gaps), patch, gaps, config.min_gap)
    state.run("coarse", np.flatnonzero(grid.coarse))
    flagged = None  # no attribution step
    rest = state.pruned()
    if estimate is not None and rest.size:
        guessed = np.abs(planning_shares(estimate(rest), gaps, config.min_gap)) >= KEEP_SHARE
        flagged = int(guessed.sum())
        state.run("attribution", rest[guessed])
    state.refine(grid)
    rng = np.random.default_rng(config.seed)
    rounds = exceeding = sampled = pruned = 0
    while rounds < MAX_ROUNDS:
        rest = state.pruned()
        if not rest.size:
            break
        rounds, pruned = rounds + 1, int(rest.size)
        draw = rng.choice(rest, size=min(SAMPLE_CELLS, rest.size), replace=False)
        shares = state.run(f"sample {rounds}", draw)
        sampled, exceeding = int(draw.size), int((np.abs(shares) >= BOUND_SHARE).sum())
        if not exceeding:
            break
        state.refine(grid)
    rows = np.flatnonzero(state.done)
    info = search_info(len(grid.components), rows.size, int(grid.trivial.sum()), state.steps, rounds, pruned,
                       sampled, exceeding, flagged, config.ci_level)
    return SearchResult(rows, state.effects[rows], info)


def search_info(n_grid: int, n_patched: int, n_trivial: int, steps: list[rs.SearchStep], rounds: int, pruned: int,
                sampled: int, exceeding: int, flagged: int | None, level: float) -> rs.SearchInfo:
    """The report's search section: counts per step and the bound from the last sample, in words too."""
    left = n_grid - n_trivial - n_patched
    bound = None
    trivial = (f"; the {n_trivial} trivial cells (the run's whole input or output, the token swap: sanity checks, "
               f"not findings) were not searched" if n_trivial else "")
    if not left:
        words = f"every one of the {n_grid - n_trivial} searched cells of the grid was patched: nothing pruned{trivial}"
    else:
        bound = upper_fraction(exceeding, sampled, level)
        if exceeding == 0:
            words = (f"none of {sampled} cells sampled at random from the {pruned} pruned has |share| >= "
                     f"{BOUND_SHARE:g}: at {level:.0%} confidence at most {bound:.2%} of them do (about "
                     f"{math.ceil(bound * pruned)} cells); the {left} unpatched cells are not in the report{trivial}")
        else:
            words = (f"BOUND NOT REACHED: {exceeding} of {sampled} cells sampled from the {pruned} pruned have "
                     f"|share| >= {BOUND_SHARE:g} after {rounds} samples: at {level:.0%} confidence up to "
                     f"{bound:.2%} of the pruned cells may; rerun with --search exhaustive")
    return rs.SearchInfo(
        mode="adaptive", n_grid=n_grid, n_patched=n_patched, n_trivial=n_trivial, keep_share=KEEP_SHARE,
        bound_share=BOUND_SHARE, steps=steps, n_attribution_flagged=flagged, rounds=rounds, n_pruned=pruned,
        n_sampled=sampled, n_sampled_exceeding=exceeding, level=level, bound_fraction=bound,
        bound_holds=bool(left == 0 or exceeding == 0), summary=words,
    )


def search_stage(engine: PatchEngine, plan: PatchPlan, scores: Scores, config: AuditConfig,
                 ) -> tuple[PatchPlan, np.ndarray, np.ndarray, rs.SearchInfo]:
    """The adaptive search on the engine (exact patching through :func:`~refusal_eval.pipeline.effects.patch_stage`
    on each step's cells; the estimate through the same stage under ``--method attribution``): the plan
    restricted to the cells patched, their effects, the approximate mask (all False) and the report's section."""
    attribution = config.model_copy(update={"method": "attribution"})

    def patch(rows: np.ndarray) -> np.ndarray:
        return patch_stage(engine, plan.subset(rows), scores, config)[0]

    def estimate(rows: np.ndarray) -> np.ndarray:
        return patch_stage(engine, plan.subset(rows), scores, attribution)[0]

    # gradients do not run through accelerate's dispatch hooks (its weights are inference tensors): a model spread over
    # devices (--device-map) is searched without the attribution step
    dispatched = getattr(engine.loaded.model, "hf_device_map", None) is not None
    grid = Grid(plan.components, plan.suffix, engine.loaded.n_layers)
    result = adaptive_search(grid, patch, None if dispatched else estimate, scores.gaps, config)
    return plan.subset(result.rows), result.effects, np.zeros(result.rows.size, dtype=bool), result.info


def exhaustive_info(n_grid: int) -> rs.SearchInfo:
    """The search section of an exhaustive audit: every cell patched."""
    return rs.SearchInfo(mode="exhaustive", n_grid=n_grid, n_patched=n_grid, keep_share=None, bound_share=None,
                         steps=[], n_attribution_flagged=None, rounds=0, n_pruned=0, n_sampled=0,
                         n_sampled_exceeding=0, level=None, bound_fraction=None, bound_holds=True,
                         summary=f"exhaustive: every one of the {n_grid} cells of the grid was patched")
