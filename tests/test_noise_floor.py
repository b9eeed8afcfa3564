"""The identity patch (every component overwritten with the target run's own activation) and the numerical
noise floor it measures: exactly 0 on the naive path, below float32 rounding with every shortcut on, and
visible in bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refusal_eval import AuditConfig
from refusal_eval.patching import Component, PatchEngine, build_pair_batch, enumerate_components
from refusal_eval.patching.components import components_at
from refusal_eval.patching.exact import noise_floor

from .conftest import random_llama, random_pairs, score_fn

KINDS = ["embed", "resid_pre", "attn_out", "mlp_out", "head", "resid_post"]
SUFFIX = 4  # shared tokens at the end of every right-aligned pair


def left_pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def audit_baseline(engine: PatchEngine, seqs: list[list[int]]) -> torch.Tensor:
    """Clean scores of one side the way the audit computes its baseline: ``engine.rows(width)`` rows per
    forward, each chunk left-padded to its own longest prompt."""
    size = engine.rows(max(len(s) for s in seqs))
    return torch.cat([engine.scores(*left_pad(seqs[i : i + size])) for i in range(0, len(seqs), size)])


def batch_baseline(engine: PatchEngine, batch, direction: str) -> torch.Tensor:
    """Clean scores of the target side in exactly the pair chunks (and columns) that ``patch`` runs."""
    rows = engine.rows(batch.width)
    chunks = [batch.select(slice(i, i + rows)) for i in range(0, batch.n_pairs, rows)]
    return torch.cat([engine.scores(*sub.side(harmful=direction == "noise")) for sub in chunks])


def target_seqs(pairs, direction: str) -> list[list[int]]:
    return [list(b if direction == "denoise" else h) for h, b in pairs]


def right_aligned_pairs(n: int, seed: int, benign_len: int = 8) -> list[tuple[list[int], list[int]]]:
    """Pairs of unequal length sharing a suffix (the audit's suffix/last mode): every benign side is
    ``benign_len + SUFFIX`` tokens, every harmful side 1-4 tokens longer."""
    gen = torch.Generator().manual_seed(seed)
    suffix = torch.randint(5, 97, (SUFFIX,), generator=gen).tolist()
    pairs = []
    for _ in range(n):
        extra = int(torch.randint(1, 5, (1,), generator=gen))
        harmful = torch.randint(5, 97, (benign_len + extra,), generator=gen).tolist() + suffix
        benign = torch.randint(5, 97, (benign_len,), generator=gen).tolist() + suffix
        pairs.append((harmful, benign))
    return pairs


@pytest.fixture(scope="module")
def late_pairs():
    """Equal-length pairs diverging late: prefix reuse starts past column 0."""
    return random_pairs(8, seed=1, min_len=12, max_len=20, prefix=6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_naive_path_floor_is_exactly_zero(llama, late_pairs, direction, threads):
    """Without layer skip or prefix reuse, and one variant per forward, the identity patch reruns the clean
    forward bit for bit: the floor is exactly 0 for every kind, all positions at once and each offset."""
    batch = build_pair_batch(late_pairs, 0, [f"p{i}" for i in range(len(late_pairs))])
    comps = enumerate_components(KINDS, 3, 4, batch.width)
    engine = PatchEngine(llama, score_fn, max_rows=batch.n_pairs, layer_skip=False, prefix_reuse=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        floor = noise_floor(engine, batch, comps, direction, batch_baseline(engine, batch, direction))
    finally:
        torch.set_num_threads(previous)
    assert engine.work["patched_forwards"] > 0
    assert floor.shape == (len(comps),)
    assert torch.count_nonzero(floor) == 0, [comps[k].id for k in floor.nonzero().flatten().tolist()]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("rows", ["auto", 64])
def test_every_shortcut_float32_floor_is_rounding(llama, late_pairs, pairs, direction, rows):
    """Layer skip, prefix reuse and many variants per forward move an identity patch by float32 rounding only,
    measured against the audit's own baseline."""
    for source in (late_pairs, pairs):
        batch = build_pair_batch(source, 0, [f"p{i}" for i in range(len(source))])
        comps = enumerate_components(KINDS, 3, 4, batch.width)
        engine = PatchEngine(llama, score_fn, max_rows=rows)
        floor = noise_floor(engine, batch, comps, direction, audit_baseline(engine, target_seqs(source, direction)))
        assert engine._layer_skip and engine.work["prefix_batches"] > 0  # the shortcuts did run
        assert torch.isfinite(floor).all()
        assert float(floor.max()) < 1e-5, float(floor.max())


def right_aligned_floor(dtype: torch.dtype, seed: int) -> torch.Tensor:
    loaded = random_llama()
    loaded.model.to(dtype)
    pairs = right_aligned_pairs(8, seed)
    batch = build_pair_batch(pairs, 0, [f"p{i}" for i in range(len(pairs))], allow_unequal=True)
    comps = components_at(KINDS, 3, 4, range(-SUFFIX, 0))
    engine = PatchEngine(loaded, score_fn, max_rows=64)
    return noise_floor(engine, batch, comps, "denoise", audit_baseline(engine, target_seqs(pairs, "denoise")))


def test_bfloat16_floor_is_measured_and_above_float32():
    """In bfloat16 the floor detects rounding: here the audit's baseline runs the (equal-length) benign prompts
    unpadded, the patch runs them padded to their longer harmful partners, and the two layouts round
    differently, by far more than in float32."""
    f32 = torch.stack([right_aligned_floor(torch.float32, seed) for seed in (0, 1)])
    bf16 = torch.stack([right_aligned_floor(torch.bfloat16, seed) for seed in (0, 1)])
    print(f"\nnoise floor, max over components: float32 {float(f32.max()):.3g}, bfloat16 {float(bf16.max()):.3g}")
    assert torch.isfinite(bf16).all() and float(bf16.max()) < 1.0
    assert float(bf16.max()) > 0
    assert float(f32.max()) < 1e-5
    assert float(bf16.max()) > float(f32.max())


def test_bfloat16_floor_with_prefix_reuse_is_finite(late_pairs):
    """Every shortcut on in bfloat16 (equal-length pairs, same layout as the baseline): measured, finite, small."""
    loaded = random_llama()
    loaded.model.to(torch.bfloat16)
    batch = build_pair_batch(late_pairs, 0, [f"p{i}" for i in range(len(late_pairs))])
    comps = enumerate_components(KINDS, 3, 4, batch.width)
    engine = PatchEngine(loaded, score_fn)
    floor = noise_floor(engine, batch, comps, "denoise", audit_baseline(engine, target_seqs(late_pairs, "denoise")))
    print(f"\nbfloat16 noise floor with layer skip and prefix reuse: {float(floor.max()):.3g}")
    assert engine.work["prefix_batches"] > 0
    assert torch.isfinite(floor).all() and float(floor.max()) < 1.0


def test_identity_patch_runs_the_same_path_as_patch(llama, late_pairs):
    """The identity patch runs the forwards patch() runs (same cells, chunks, layers, columns, prefix cache),
    and does run them: each call adds its patched forwards."""
    batch = build_pair_batch(late_pairs, 0, [f"p{i}" for i in range(len(late_pairs))])
    comps = enumerate_components(KINDS, 3, 4, batch.width)
    for direction in ("denoise", "noise"):
        real, identity = PatchEngine(llama, score_fn), PatchEngine(llama, score_fn)
        real.patch(batch, comps, direction)
        result = identity.identity_patch(batch, comps, direction)
        assert result.shape == (len(comps), batch.n_pairs)
        assert identity.work == real.work
        assert identity.work["patched_forwards"] > 0 and identity.work["prefix_batches"] > 0
        before = identity.work["patched_forwards"]
        identity.identity_patch(batch, comps[:10], direction)
        assert identity.work["patched_forwards"] > before


def test_idle_cells_hold_the_clean_score_exactly(llama, late_pairs):
    """Cells patch() does not run (before every pair's first difference; after the last attention off the
    last position) are the clean score, exactly, in the identity patch too."""
    batch = build_pair_batch(late_pairs, 0, [f"p{i}" for i in range(len(late_pairs))])
    first = int(((batch.benign_ids != batch.harmful_ids).cumsum(1) > 0).any(0).nonzero()[0])
    assert first > 0  # no pair differs in columns :first
    idle = [Component("resid_pre", 1, position=-batch.width), Component("mlp_out", 0, position=first - 1 - batch.width),
            Component("attn_out", 2, position=-2), Component("head", 2, 1, -3)]
    engine = PatchEngine(llama, score_fn)
    clean = batch_baseline(engine, batch, "denoise")
    identity = engine.identity_patch(batch, [*idle, Component("resid_pre", 1)])
    assert torch.equal(identity[: len(idle)], clean[None, :].expand(len(idle), -1))


def test_patch_of_identical_sides_is_exactly_clean(llama, pairs):
    """Unchanged behaviour: with nothing to move, patch() returns the clean scores exactly and runs nothing;
    so does the identity patch (no slot differs, every cell is idle)."""
    same = build_pair_batch([(h, h) for h, _ in pairs], 0, [str(i) for i in range(len(pairs))])
    comps = enumerate_components(KINDS, 3, 4, same.width)
    engine = PatchEngine(llama, score_fn, max_rows=64)
    clean = batch_baseline(engine, same, "denoise")
    expected = clean[None, :].expand(len(comps), -1)
    assert torch.equal(engine.patch(same, comps), expected)
    assert torch.equal(engine.identity_patch(same, comps), expected)
    assert engine.work["patched_forwards"] == 0


def test_noise_floor_checks_its_baseline(engine, batch):
    comps = [Component("resid_pre", 0)]
    with pytest.raises(ValueError, match="baseline"):
        noise_floor(engine, batch, comps, "denoise", torch.zeros(batch.n_pairs + 1))
    with pytest.raises(ValueError, match="direction"):
        noise_floor(engine, batch, comps, "sideways", torch.zeros(batch.n_pairs))


def test_identity_cells_keep_the_patched_forward_value(llama, late_pairs, monkeypatch):
    """Active cells report what their patched forward computed, for every pair, also pairs whose slots the
    cell does not write (patch() forces those back to the clean score): a replay shifted by 1e-3 shows in every
    active cell of the identity patch, and in no idle one."""
    batch = build_pair_batch(late_pairs, 0, [f"p{i}" for i in range(len(late_pairs))])
    comps = [c for c in enumerate_components(KINDS, 3, 4, batch.width) if c.kind != "embed"]
    engine = PatchEngine(llama, score_fn)
    original = engine.scores_from_layer

    def shifted(start, inputs, repeat, transforms, col0=0, cache=None):
        values = original(start, inputs, repeat, transforms, col0, cache)
        return values + 1e-3 if transforms else values  # patched forwards only, not the replay checks

    monkeypatch.setattr(engine, "scores_from_layer", shifted)
    masks, _ = engine._position_masks(batch.benign_ids, batch.benign_mask, batch.harmful_ids, batch.harmful_mask,
                                      comps)
    written = torch.stack([masks[c.position].any(1) for c in comps])  # [C, n]: pairs whose slots a cell writes
    reaches = torch.tensor([not (c.layer == 2 and c.kind != "resid_pre" and c.position not in (None, -1))
                            for c in comps])
    active = written.any(1) & reaches
    assert 0 < int(active.sum()) < len(comps)
    clean = batch_baseline(engine, batch, "denoise")
    identity = engine.identity_patch(batch, comps)
    torch.testing.assert_close(identity[active], (clean + 1e-3)[None, :].expand(int(active.sum()), -1),
                               atol=1e-5, rtol=0)
    assert torch.equal(identity[~active], clean[None, :].expand(int((~active).sum()), -1))
    # where an active cell writes nothing for a pair, patch() reports the clean score, the identity patch does not
    unwritten = active[:, None] & ~written
    assert unwritten.any()
    patched = engine.patch(batch, comps)
    assert torch.equal(patched[unwritten], clean[None, :].expand_as(patched)[unwritten])
    assert (identity[unwritten] != patched[unwritten]).all()


def test_sampled_floor_bounds_the_full_floor_on_the_tiny_refuser():
    """Issue 26: the noise floor is measured on 2 components per stratum (kind, layer, position class) and the
    rules use 4 times the largest. On the tiny refuser's default audit grid, every seed's sampled bound is at least
    the full floor's largest value (every component identity-patched), and the sample covers every stratum that
    has a component that moves the score. (In bfloat16 this model's identity patches are exact: floor 0.)"""
    from refusal_eval.audit import analyse, load_inputs
    from refusal_eval.models.loading import load_model
    from refusal_eval.pipeline.plan import PatchPlan
    from refusal_eval.pipeline.statistics import FLOOR_FACTOR, floor_sample, measure_floor, position_class

    config = AuditConfig(max_pairs=12, n_boot=200, n_permutations=200, noise_floor_cells=0, tricky="")
    full = analyse(load_model(), load_inputs(config), config, progress=False)
    assert full.alignment == "full" and not np.isnan(full.floor).any()
    assert full.floor_bound == full.floor.max()  # the full floor: the rules use its largest value, no factor
    plan = PatchPlan(full.batch, full.suffix, full.components, [(np.arange(len(full.components)),
                     list(range(len(full.used))), full.batch)], None, None, None, [])
    target = np.array(full.m_b)[full.used]
    largest = full.largest_effect
    strata = {(c.kind, c.layer, position_class(c.position)) for c, x in zip(full.components, largest, strict=True)
              if x > 0}
    bounds = []
    for seed in range(4):
        sampled = config.model_copy(update={"noise_floor_cells": 2, "seed": seed})
        floor, bound = measure_floor(full.engine, plan, full.effects, target, sampled)
        measured = ~np.isnan(floor)
        assert bound == pytest.approx(FLOOR_FACTOR * floor[measured].max())
        assert bound >= full.floor.max(), (seed, bound, full.floor.max())
        rows = floor_sample(full.components, plan.families[0][0], largest, 2, seed)
        assert np.flatnonzero(measured).tolist() == rows.tolist()
        covered = {(full.components[k].kind, full.components[k].layer, position_class(full.components[k].position))
                   for k in rows}
        assert covered == strata and len(rows) <= 2 * len(strata) < len(full.components)
        bounds.append(bound)
    print(f"\nfull floor {full.floor.max():.2e} over {len(full.components)} components; sampled bounds "
          f"{min(bounds):.2e}..{max(bounds):.2e} from {len(rows)} components in {len(strata)} strata")
