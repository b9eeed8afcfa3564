"""Attribution patching: equals the first-order change of exact patching, tracks exact on the organism."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from refusal_eval import AuditConfig, audit
from refusal_eval.metrics import refusal_score
from refusal_eval.models.loading import load_model
from refusal_eval.patching import Component, PatchEngine, build_pair_batch, enumerate_components
from refusal_eval.patching.attribution import attribute

from .conftest import random_llama, random_pairs, score_fn


def directional_derivative(engine, batch, component, eps=1e-3):
    """(m(target + eps * (source - target) at the patched slots) - m(target)) / eps, by exact patching."""
    point = component.point
    source = engine.cache(batch.harmful_ids, batch.harmful_mask, [point])[point]
    target = engine.cache(batch.benign_ids, batch.benign_mask, [point])[point]
    mixed = {point: target + eps * (source - target)}
    masks, _ = engine._position_masks(batch.benign_ids, batch.benign_mask, batch.harmful_ids, batch.harmful_mask,
                                      [component])
    transform = engine._patch_transforms([component], mixed, masks)
    base = engine.scores(batch.benign_ids, batch.benign_mask)
    return (engine.scores(batch.benign_ids, batch.benign_mask, transform) - base) / eps


def test_attribution_is_the_first_order_term_of_exact_patching():
    loaded = random_llama(seed=4)
    loaded.model.double()
    engine = PatchEngine(loaded, lambda logits: score_fn(logits.double()).double(), max_rows=64)
    pairs = random_pairs(5, seed=8)
    batch = build_pair_batch(pairs, 0, list("abcde"))
    comps = [Component("resid_pre", 1), Component("attn_out", 0, position=-1), Component("mlp_out", 2),
             Component("head", 1, head=3), Component("head", 0, head=1, position=-2), Component("resid_post", 2)]
    base = engine.baseline(batch)[1]
    estimated = attribute(engine, batch, comps) - base
    for k, comp in enumerate(comps):
        torch.testing.assert_close(estimated[k].double(), directional_derivative(engine, batch, comp).double(),
                                   atol=2e-3, rtol=2e-3, msg=comp.id)


@pytest.fixture(scope="module")
def organism():
    loaded = load_model()
    tok = loaded.tokenizer
    from refusal_eval.audit import format_prompt
    from refusal_eval.data import load_pairs, shipped_dataset

    pairs = load_pairs(shipped_dataset(), split="eval")[:16]
    tokenized = [(format_prompt(tok, p.harmful), format_prompt(tok, p.benign)) for p in pairs]
    batch = build_pair_batch(tokenized, tok.pad_token_id, [p.id for p in pairs])
    refusal = torch.tensor(tok("I", add_special_tokens=False)["input_ids"][:1])
    compliance = torch.tensor([tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Sure", "Of", "Here")])
    engine = PatchEngine(loaded, lambda logits: refusal_score(logits, refusal, compliance), max_rows=256)
    return loaded, engine, batch


def test_head_grid_rank_correlation_on_the_organism(organism):
    loaded, engine, batch = organism
    comps = enumerate_components(["head"], loaded.n_layers, loaded.n_heads, batch.width, per_position=False)
    base = engine.baseline(batch)[1]
    exact = (engine.patch(batch, comps) - base).sum(1)
    estimated = (attribute(engine, batch, comps) - base).sum(1)
    rho = spearmanr(exact, estimated).statistic
    print(f"head grid rank correlation attribution vs exact: {rho:.3f}")
    assert rho >= 0.8


def test_attribution_verify_audit_labels_estimates():
    config = AuditConfig(max_pairs=10, n_boot=200, method="attribution+verify", verify_top=5, verify_random=5,
                         positions=["all"], tricky="")
    report = audit(config, progress=False)
    assert report.method == "attribution+verify" and report.attribution.n_verified == 10
    verified = set(report.attribution.verified_ids)
    for c in report.components:
        assert c.approximate == (c.id not in verified)
    assert report.attribution.spearman is not None
    plain = audit(config.model_copy(update={"method": "attribution"}), progress=False)
    assert plain.attribution.n_verified == 0 and all(c.approximate for c in plain.components)
