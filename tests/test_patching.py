"""The exact patching engine against the sanity identities of DESIGN.md and a naive reference loop."""

from __future__ import annotations

import random

import pytest
import torch

from refusal_eval.patching import Component, PatchEngine, build_pair_batch, enumerate_components
from refusal_eval.patching.components import components_at

from .conftest import random_llama, random_pairs, score_fn

KINDS = ["embed", "resid_pre", "attn_out", "mlp_out", "head", "resid_post"]


def effects(engine, batch, components, direction="denoise"):
    base_h, base_b = engine.baseline(batch)
    patched = engine.patch(batch, components, direction)
    return (patched - base_b) if direction == "denoise" else (base_h - patched), base_h - base_b


def hooked_logits(model, module, pre: bool, ids, fn) -> torch.Tensor:
    """Logits [T, vocab] of one unpadded forward of ``ids`` with ``fn`` applied to ``module``'s input (``pre``) or
    output, through plain torch hooks."""
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: (fn(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(
            lambda m, a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out))
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        handle.remove()


def naive_patched_score(loaded, harmful, benign, component: Component, direction: str) -> float:
    """One unpadded forward per cell, with hooks written directly on the HF Llama modules."""
    model = loaded.model
    target, source = (benign, harmful) if direction == "denoise" else (harmful, benign)
    block = model.model.layers[component.layer]
    module, pre = {
        "embed": (model.model.embed_tokens, False),
        "resid_pre": (block, True),
        "resid_post": (block, False),
        "attn_out": (block.self_attn, False),
        "mlp_out": (block.mlp, False),
        "head": (block.self_attn.o_proj, True),
    }[component.kind]
    length = len(target)
    positions = range(length) if component.position is None else [length + component.position]
    positions = [p for p in positions if 0 <= p < length]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    cols = (slice(None) if component.head is None
            else slice(component.head * head_dim, (component.head + 1) * head_dim))
    saved = {}

    def grab(x):
        saved["x"] = x.detach().clone()
        return x

    def put(x):
        x = x.clone()
        for p in positions:
            x[0, p, cols] = saved["x"][0, p, cols]
        return x

    def run(ids, fn):
        if pre:
            handle = module.register_forward_pre_hook(lambda m, args: (fn(args[0]), *args[1:]))
        else:
            handle = module.register_forward_hook(
                lambda m, a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
            )
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        finally:
            handle.remove()
        return float(score_fn(logits))

    run(source, grab)
    return run(target, put)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_full_replacements_recover_the_other_run(engine, batch, direction):
    comps = [Component("resid_pre", 0), Component("resid_post", 2, position=-1)]
    eff, gap = effects(engine, batch, comps, direction)
    torch.testing.assert_close(eff[0], gap, atol=1e-5, rtol=0)
    torch.testing.assert_close(eff[1], gap, atol=1e-5, rtol=0)


def test_layer0_resid_pre_is_zero_where_tokens_agree(engine, batch, pairs):
    comps = [Component("resid_pre", 0, position=-k) for k in range(1, batch.width + 1)]
    eff, _ = effects(engine, batch, comps)
    for i, (h, b) in enumerate(pairs):
        for j, comp in enumerate(comps):
            p = len(h) + comp.position
            if p < 0 or h[p] == b[p]:
                assert eff[j, i] == 0.0, (comp.id, i)
    # and the differing position is where the whole effect is
    assert (eff.abs().sum(0) > 0).all()


def test_self_patching_changes_nothing(engine, pairs):
    same = build_pair_batch([(h, h) for h, _ in pairs], 0, [str(i) for i in range(len(pairs))])
    comps = enumerate_components(KINDS, 3, 4, same.width)
    eff, gap = effects(engine, same, comps)
    assert gap.abs().max() == 0
    assert eff.abs().max() < 1e-6


def test_unpatched_scores_equal_plain_transformers(llama, engine, pairs):
    for h, _ in pairs:
        with torch.no_grad():
            logits = llama.model(input_ids=torch.tensor([h])).logits[0, -1]
        ids = torch.tensor([h])
        ours = engine.scores(ids, torch.ones_like(ids))
        torch.testing.assert_close(ours[0], score_fn(logits), atol=1e-5, rtol=0)


def test_engine_equals_naive_one_forward_per_cell(llama, engine, batch, pairs):
    comps = enumerate_components(KINDS, 3, 4, batch.width)
    rng = random.Random(0)
    sample = rng.sample(comps, 40) + [c for c in comps if c.position is None]
    for direction in ("denoise", "noise"):
        patched = engine.patch(batch, sample, direction)
        for k, comp in enumerate(sample):
            for i, (h, b) in enumerate(pairs):
                expected = naive_patched_score(llama, h, b, comp, direction)
                assert abs(float(patched[k, i]) - expected) < 1e-4, (direction, comp.id, i)


def test_results_do_not_depend_on_batching_or_order(llama, batch):
    comps = enumerate_components(KINDS, 3, 4, batch.width)
    wide = PatchEngine(llama, score_fn, max_rows=10_000).patch(batch, comps)
    narrow = PatchEngine(llama, score_fn, max_rows=1).patch(batch, comps)
    torch.testing.assert_close(wide, narrow, atol=1e-5, rtol=0)
    order = list(range(len(comps)))
    random.Random(1).shuffle(order)
    shuffled = PatchEngine(llama, score_fn, max_rows=37).patch(batch, [comps[i] for i in order])
    torch.testing.assert_close(shuffled, wide[order], atol=1e-5, rtol=0)


def test_padding_does_not_change_scores(llama, engine):
    short, long_ = random_pairs(1, seed=5, min_len=4, max_len=4)[0], random_pairs(1, seed=6, min_len=12, max_len=12)[0]
    together = build_pair_batch([short, long_], 0, ["s", "l"])
    alone = build_pair_batch([short], 0, ["s"])
    comps = enumerate_components(["resid_pre", "head"], 3, 4, 4)
    torch.testing.assert_close(engine.patch(together, comps)[:, :1], engine.patch(alone, comps), atol=1e-5, rtol=0)


def test_other_seed_and_mha_model():
    """A second random model without GQA (heads == kv heads) satisfies the identities too."""
    loaded = random_llama(seed=3, layers=2, heads=2, kv_heads=2)
    pairs = random_pairs(4, seed=9)
    batch = build_pair_batch(pairs, 0, list("abcd"))
    engine = PatchEngine(loaded, score_fn, max_rows=5)
    heads_all = [Component("head", 1, head=h) for h in range(2)]
    eff, gap = effects(engine, batch, [Component("resid_pre", 0), *heads_all])
    torch.testing.assert_close(eff[0], gap, atol=1e-5, rtol=0)
    for k, comp in enumerate(heads_all, start=1):
        for i, (h, b) in enumerate(pairs):
            ref = naive_patched_score(loaded, h, b, comp, "denoise")
            assert abs(float(eff[k, i] + engine.baseline(batch)[1][i]) - ref) < 1e-4


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "same-length"])
def test_prefix_reuse_equals_definition(attention, padded):
    """Recomputing only the columns from the first patched one on, with the clean keys/values of earlier
    columns, gives the one-forward-per-cell numbers: pairs diverging early and late, with and without
    padding (transformers passes no mask then), SDPA and eager attention, one and many rows per forward."""
    loaded = random_llama(seed=4, layers=3)
    loaded.model.config._attn_implementation = attention
    pairs = (random_pairs(5, seed=11, min_len=6, max_len=12, prefix=1) if padded
             else random_pairs(4, seed=12, min_len=10, max_len=10, prefix=5))
    batch = build_pair_batch(pairs, 0, [f"p{i}" for i in range(len(pairs))])
    comps = enumerate_components(["resid_pre", "attn_out", "mlp_out", "head", "resid_post"], 3, 4, batch.width)
    for rows in (1, 256):
        fast = PatchEngine(loaded, score_fn, max_rows=rows)
        slow = PatchEngine(loaded, score_fn, max_rows=rows, prefix_reuse=False)
        patched = fast.patch(batch, comps, "noise")
        torch.testing.assert_close(patched, slow.patch(batch, comps, "noise"), atol=1e-5, rtol=0)
        assert fast.work["token_layers"] < 0.8 * slow.work["token_layers"]
    rng = random.Random(2)
    for k, comp in enumerate(comps):
        if rng.random() < 0.25 or comp.position is None:
            for i, (h, b) in enumerate(pairs):
                expected = naive_patched_score(loaded, h, b, comp, "noise")
                assert abs(float(patched[k, i]) - expected) < 1e-4, (comp.id, i)


def test_prefix_reuse_falls_back_where_replay_disagrees(llama, batch, monkeypatch):
    """If the per-batch check of the trimmed replay fails, every column is recomputed (same numbers)."""
    comps = enumerate_components(["resid_pre", "head"], 3, 4, batch.width)
    reference = PatchEngine(llama, score_fn, prefix_reuse=False).patch(batch, comps)
    engine = PatchEngine(llama, score_fn)
    original = engine.scores_from_layer

    def broken(start, inputs, repeat, transforms, col0=0, cache=None):
        values = original(start, inputs, repeat, transforms, col0, cache)
        return values + 1.0 if col0 else values

    monkeypatch.setattr(engine, "scores_from_layer", broken)
    torch.testing.assert_close(engine.patch(batch, comps), reference, atol=1e-5, rtol=0)


def test_chunk_plan_covers_every_cell_once_within_caps(llama):
    """The planner partitions the cells, never exceeds the row or token caps, keeps full-forward (embed)
    cells apart, and merges cells that share a start (no extra work) instead of running them one by one."""
    rng = random.Random(3)
    starts = {k: (rng.choice([-1, 0, 1, 2]), rng.randrange(0, 12)) for k in range(200)}
    engine = PatchEngine(llama, score_fn, max_rows=40, max_chunk_tokens=300)
    chunks = engine._plan_chunks(list(starts), starts, n=4, width=12)
    assert sorted(k for chunk in chunks for k in chunk) == list(range(200))
    for chunk in chunks:
        assert len(chunk) * 4 <= 40
        col = min(starts[k][1] for k in chunk)
        assert len(chunk) == 1 or len(chunk) * 4 * (12 - col) <= 300
        assert len({starts[k][0] < 0 for k in chunk}) == 1
    same = {k: (1, 5) for k in range(8)}
    assert engine._plan_chunks(list(same), same, n=4, width=12) == [list(range(8))]


def test_patches_that_cannot_reach_the_last_position_are_exactly_zero(llama, engine, batch, pairs):
    """After the last layer's attention, a patch off the last position reaches nothing that is read: its
    effect is exactly 0, with no forward run (and the definition agrees to rounding)."""
    comps = [Component(kind, 2, position=-2) for kind in ("attn_out", "mlp_out")] + [Component("head", 2, 1, -3)]
    eff, _ = effects(engine, batch, comps)
    assert torch.count_nonzero(eff) == 0
    for comp in comps:
        for h, b in pairs:
            clean = naive_patched_score(llama, h, b, Component("resid_pre", 0, position=-len(b) - 1), "denoise")
            assert abs(naive_patched_score(llama, h, b, comp, "denoise") - clean) < 1e-5


def _right_aligned_naive(loaded, harmful, benign, component: Component, direction: str) -> float:
    """One unpadded forward per cell for pairs of unequal length: offset -k is the k-th token from the end on
    each side (the source activation is read at its own side's index)."""
    model = loaded.model
    target, source = (benign, harmful) if direction == "denoise" else (harmful, benign)
    block = model.model.layers[component.layer]
    module, pre = {"resid_pre": (block, True), "attn_out": (block.self_attn, False),
                   "mlp_out": (block.mlp, False), "head": (block.self_attn.o_proj, True)}[component.kind]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    cols = (slice(None) if component.head is None
            else slice(component.head * head_dim, (component.head + 1) * head_dim))
    saved = {}

    def hooked(ids, fn):
        return hooked_logits(model, module, pre, ids, fn)[-1]

    def grab(x):
        saved["x"] = x[0, len(source) + component.position, cols].detach().clone()
        return x

    def put(x):
        x = x.clone()
        x[0, len(target) + component.position, cols] = saved["x"]
        return x

    hooked(source, grab)
    return float(score_fn(hooked(target, put)))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_right_aligned_unequal_pairs_equal_naive_with_prefix_reuse(llama, direction):
    """Pairs of different token lengths, right-aligned: no column is shared by all pairs, yet single-position
    cells reuse the clean prefix before their column (checked against one unpadded forward per cell)."""
    gen = torch.Generator().manual_seed(7)
    pairs = []
    for n_h, n_b in ((6, 9), (8, 5), (7, 7), (10, 6)):
        suffix = torch.randint(5, 97, (4,), generator=gen).tolist()
        pairs.append((torch.randint(5, 97, (n_h,), generator=gen).tolist() + suffix,
                      torch.randint(5, 97, (n_b,), generator=gen).tolist() + suffix))
    batch = build_pair_batch(pairs, 0, [f"u{i}" for i in range(len(pairs))], allow_unequal=True)
    comps = [Component(kind, layer, head, -k) for kind in ("resid_pre", "attn_out", "mlp_out", "head")
             for layer in range(3) for head in ((0, 3) if kind == "head" else (None,)) for k in (1, 2, 6)]
    engine = PatchEngine(llama, score_fn, max_rows=64)
    patched = engine.patch(batch, comps, direction)
    assert engine.work["prefix_batches"] > 0
    for j, comp in enumerate(comps):
        for i, (h, b) in enumerate(pairs):
            want = _right_aligned_naive(llama, h, b, comp, direction)
            assert abs(float(patched[j, i]) - want) < 1e-4, (comp.id, i, float(patched[j, i]), want)


def test_component_ids_parse_back():
    every = components_at(KINDS, 3, 2, [None, -1, -7])
    assert [Component.parse(c.id) for c in every] == every
    for bad in ("blocks.1.hook_z", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out[2]", "blocks.x.hook_attn_out",
                "blocks.1.hook_attn_out@3"):
        with pytest.raises(ValueError, match="'blocks"):
            Component.parse(bad)
