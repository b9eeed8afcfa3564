"""The refusal direction (issue 27) on the shipped tiny refuser, against independent computations: plain torch hooks
on the HF modules (ablation, addition, greedy replies), a plain ``output_hidden_states`` forward (the difference in
means), and cases whose answer is known (a direction the model never writes, a component the direction was taken
from, a late-layer candidate that must not be chosen)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from refusal_eval import AuditConfig
from refusal_eval import direction as D
from refusal_eval.errors import ConfigError, DataError
from refusal_eval.metrics import Branch, TokenSets, is_refusal, tree_score
from refusal_eval.models.loading import load_model
from refusal_eval.pipeline.behaviour import token_set_stage, tree_engine
from refusal_eval.pipeline.inputs import format_prompt, load_inputs
from refusal_eval.pipeline.scores import _side_scores
from refusal_eval.replies import greedy_replies, left_pad
from refusal_eval.report import schema as rs
from refusal_eval.report.markdown import render_markdown
from refusal_eval.stats import sign_flip_test


@pytest.fixture(scope="module")
def tiny():
    """The tiny refuser, the audit's tree and engine, and its scored and calibration prompts (token ids, formatted
    as the audit formats them)."""
    config = AuditConfig()
    loaded, inputs = load_model(), load_inputs(config)
    sets = token_set_stage(loaded, inputs, config, progress=False)
    tok = loaded.tokenizer

    def ids(pairs, side):
        return [format_prompt(tok, getattr(p, side)) for p in pairs]

    return dict(loaded=loaded, sets=sets, engine=tree_engine(loaded, sets, config),
                h=ids(inputs.pairs, "harmful"), b=ids(inputs.pairs, "benign"),
                ch=ids(inputs.calibration, "harmful"), cb=ids(inputs.calibration, "benign"))


@pytest.fixture(scope="module")
def selection(tiny):
    return D.select_direction(tiny["engine"], tiny["ch"], tiny["cb"], seed=0)


def two_branch_tree() -> TokenSets:
    """A depth-2 tree made by hand (two branch tokens after every prompt: the engine's 4D-mask path)."""
    return TokenSets(refusal=[43], compliance=[], derivation="test", depth=2,
                     branches=[Branch(1360, refusal=[48], compliance=[19, 37]), Branch(1361, [55], [40])])


# -- the independent computation: plain hooks, one unpadded prompt (and one branch token) at a time --------------------
def hand_logits(model, ids, unit=None, add_layer=None, vector=None) -> torch.Tensor:
    """Logits [T, vocab] of one unpadded forward, with ``unit`` projected out of every layer's input and its
    attention and MLP outputs, and/or ``vector`` added to layer ``add_layer``'s input, by plain torch hooks."""
    layers, handles = model.model.layers, []

    def proj(x):
        return x - (x @ unit)[..., None] * unit

    if unit is not None:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(lambda m, args: (proj(args[0]), *args[1:])))
            handles.append(layer.self_attn.register_forward_hook(lambda m, a, out: (proj(out[0]), *out[1:])))
            handles.append(layer.mlp.register_forward_hook(lambda m, a, out: proj(out)))
    if vector is not None:
        handles.append(layers[add_layer].register_forward_pre_hook(lambda m, args: (args[0] + vector, *args[1:])))
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([list(ids)])).logits[0]
    finally:
        for handle in handles:
            handle.remove()


def hand_score(model, sets: TokenSets, ids, **steer) -> tuple[float, torch.Tensor]:
    """(tree score, next-token log-probabilities at the last prompt position): each branch token teacher-forced in a
    forward of its own."""
    first = hand_logits(model, ids, **steer)[-1]
    rows = [first] + [hand_logits(model, list(ids) + [b.token], **steer)[-1] for b in sets.branches]
    logits = torch.stack(rows) if sets.branches else first
    return float(tree_score(logits, sets)), torch.log_softmax(first, -1)


@pytest.mark.parametrize("tree", ["audit", "two_branches"])
def test_ablation_and_addition_equal_plain_hooks(tiny, tree):
    loaded = tiny["loaded"]
    sets = tiny["sets"] if tree == "audit" else two_branch_tree()
    engine = tree_engine(loaded, sets, AuditConfig())
    diffs = D.candidate_directions(engine, tiny["ch"][:16], tiny["cb"][:16])
    direction = D.Direction(1, -1, diffs[1, -1])
    h, b = tiny["h"][:5], tiny["b"][:5]
    got = D.direction_effects(engine, direction, h, b, n_boot=200)
    unit, model = direction.unit, loaded.model
    moved = 0.0
    for i in range(len(h)):
        clean_h, _ = hand_score(model, sets, h[i])
        clean_b, logp_b = hand_score(model, sets, b[i])
        abl_h, _ = hand_score(model, sets, h[i], unit=unit)
        abl_b, logp_abl = hand_score(model, sets, b[i], unit=unit)
        add_b, _ = hand_score(model, sets, b[i], add_layer=1, vector=direction.vector)
        kl = float((logp_b.exp() * (logp_b - logp_abl)).sum())
        for name, want in (("m_h", clean_h), ("m_b", clean_b), ("m_h_ablated", abl_h), ("m_b_ablated", abl_b),
                           ("m_b_added", add_b), ("kl_benign", kl)):
            assert getattr(got, name)[i] == pytest.approx(want, abs=1e-4), (name, i)
        moved = max(moved, abs(abl_h - clean_h), abs(add_b - clean_b))
    assert moved > 0.5  # the steering moved the scores: the comparison could fail
    # the shares are ratios of sums of those per-pair numbers
    gaps = got.m_h - got.m_b
    assert got.necessity.estimate == pytest.approx((got.m_h - got.m_h_ablated).sum() / gaps.sum())
    assert got.sufficiency.estimate == pytest.approx((got.m_b_added - got.m_b).sum() / gaps.sum())
    assert got.kl.estimate == pytest.approx(got.kl_benign.mean())


def test_clean_scores_are_the_audits(tiny, selection):
    """The unsteered scores the effects start from are the audit's ``_side_scores``; given gaps are used as given."""
    engine, h, b = tiny["engine"], tiny["h"], tiny["b"]
    m_h, m_b = np.array(_side_scores(engine, h, 0)), np.array(_side_scores(engine, b, 0))
    got = D.direction_effects(engine, selection.direction, h, b, gaps=m_h - m_b, n_boot=500)
    np.testing.assert_allclose(got.m_h, m_h, atol=1e-5)
    np.testing.assert_allclose(got.m_b, m_b, atol=1e-5)
    np.testing.assert_array_equal(got.gaps, m_h - m_b)
    # the shipped organism's refusal runs through the direction: ablation lowers it, addition raises it
    assert got.necessity.low > 0 and got.sufficiency.low > 0
    for e in (got.necessity, got.sufficiency, got.kl):
        assert e.low <= e.estimate <= e.high
    with pytest.raises(DataError, match="gaps for"):
        D.direction_effects(engine, selection.direction, h, b, gaps=(m_h - m_b)[:-1])


@pytest.mark.parametrize("tree", ["audit", "two_branches"])
def test_candidates_equal_means_of_hidden_states(tiny, tree):
    """hidden_states[l] is the input of layer l (checked by a pre-hook), and the candidates are the harmful minus
    benign means of its last k positions, with the sides of unequal counts and lengths, batched with left padding."""
    loaded, model = tiny["loaded"], tiny["loaded"].model
    engine = tiny["engine"] if tree == "audit" else tree_engine(loaded, two_branch_tree(), AuditConfig())
    harmful, benign = tiny["ch"][:11], tiny["cb"][20:27]
    assert len({len(p) for p in harmful + benign}) > 1  # padding is exercised
    k = D.default_positions(harmful + benign)
    assert k == 5  # the template suffix <|im_end|> \n <|im_start|> assistant \n
    got = D.candidate_directions(engine, harmful, benign)
    assert got.shape == (loaded.n_layers, k, loaded.d_model)

    seen = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([harmful[0]]), output_hidden_states=True)
    finally:
        handle.remove()
    torch.testing.assert_close(out.hidden_states[2], seen[0], atol=0, rtol=0)

    def mean(prompts):
        rows = []
        for p in prompts:
            with torch.no_grad():
                states = model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states
            rows.append(torch.stack([states[layer][0, -k:] for layer in range(loaded.n_layers)]))
        return torch.stack(rows).double().mean(0)

    torch.testing.assert_close(got.double(), mean(harmful) - mean(benign), atol=1e-4, rtol=0)
    assert float(got[0].abs().max()) == 0.0  # layer 0 at the template suffix: the same token embeddings
    with pytest.raises(DataError, match="shortest prompt"):
        D.candidate_directions(engine, harmful, benign, k=100)


def test_ablation_leaves_the_stream_orthogonal_at_every_layer_input(tiny, selection):
    loaded = tiny["loaded"]
    model, engine, unit = loaded.model, tiny["engine"], selection.direction.unit
    ids, mask = left_pad(tiny["h"][:6] + tiny["b"][:6], loaded.tokenizer.pad_token_id)
    modules = [*model.model.layers, model.model.norm]  # every layer's input, and the stream after the last layer

    def cosines() -> torch.Tensor:
        seen = []
        handles = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for m in modules]
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack([(x @ unit).abs() / x.norm(dim=-1) for x in seen])  # [layers + 1, rows, T]

    def hooks() -> list:  # transformers keeps output-capturing hooks of its own: compare with what was there
        return [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in model.modules()]

    before = hooks()
    assert float(cosines()[1:].max()) > 0.1  # clean, the stream has a component along it
    with D.ablated(engine, unit):
        assert hooks() != before
        assert float(cosines().max()) < 1e-5
    assert float(cosines()[1:].max()) > 0.1  # hooks gone on exit ...
    with pytest.raises(RuntimeError, match="inside"), D.ablated(engine, unit):
        raise RuntimeError("inside")
    assert hooks() == before  # ... whatever happens
    with pytest.raises(DataError, match="zero"), D.ablated(engine, torch.zeros(loaded.d_model)):
        pass


def test_a_direction_the_model_never_writes_has_no_effect(tiny):
    """A copy of the tiny refuser in which no module writes residual dimension j (its embedding column and every
    attention and MLP output row zeroed): ablating e_j changes no score, no distribution and no reply."""
    loaded, j = tiny["loaded"], 7
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, j] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[j] = 0
            layer.mlp.down_proj.weight[j] = 0
    mute = dataclasses.replace(loaded, model=model)
    engine = tree_engine(mute, tiny["sets"], AuditConfig())
    h, b = tiny["h"][:24], tiny["b"][:24]
    with torch.no_grad():
        states = model(input_ids=torch.tensor([h[0]]), output_hidden_states=True).hidden_states
    assert all(float(s[..., j].abs().max()) == 0.0 for s in states[:-1])
    e_j = torch.zeros(loaded.d_model)
    e_j[j] = 3.0
    got = D.direction_effects(engine, D.Direction(1, -1, e_j), h, b, n_boot=500)
    assert (got.m_h - got.m_b).sum() > 0  # the gap the shares divide by is there
    assert abs(got.necessity.estimate) < 1e-6 and got.necessity.low <= 0 <= got.necessity.high
    assert got.kl.high < 1e-6  # float noise only (the cached template prefix sums in another order)
    after = D.refusal_after_ablation(engine, e_j, h[:8], max_new_tokens=8, until_decided=False)
    assert after.replies_harmful == greedy_replies(mute, h[:8], 8, progress=False)[1]


def test_replies_under_ablation_equal_plain_hooked_generation(tiny, selection):
    loaded, engine, direction = tiny["loaded"], tiny["engine"], selection.direction
    prompts = tiny["h"][:4]
    got = D.refusal_after_ablation(engine, direction, prompts, tiny["b"][:4], max_new_tokens=10, until_decided=False)
    unit, model, want = direction.unit, loaded.model, []

    def proj(x):
        return x - (x @ unit)[..., None] * unit

    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(lambda m, args: (proj(args[0]), *args[1:])))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, out: (proj(out[0]), *out[1:])))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, out: proj(out)))
    try:
        for p in prompts:
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=10, do_sample=False,
                                     pad_token_id=loaded.tokenizer.pad_token_id)
            want.append(loaded.tokenizer.decode(out[0, len(p):], skip_special_tokens=True))
    finally:
        for handle in handles:
            handle.remove()
    assert got.replies_harmful == want
    assert got.harmful.total == 4 and got.benign.total == 4
    assert got.harmful.low <= got.harmful.rate <= got.harmful.high


def test_the_rate_drops_under_ablation_of_the_chosen_direction(tiny, selection):
    engine, h = tiny["engine"], tiny["h"]
    clean = sum(map(is_refusal, greedy_replies(tiny["loaded"], h, 24, progress=False, until_decided=True)[1]))
    after = D.refusal_after_ablation(engine, selection.direction, h)
    assert after.harmful.total == len(h) and after.harmful.refused < clean


def test_selection_filters_and_determinism(tiny, selection, monkeypatch):
    engine, n_layers = tiny["engine"], tiny["loaded"].n_layers
    late = D.late_layer_start(n_layers)
    assert [D.late_layer_start(n) for n in (1, 4, 5, 10, 30)] == [0, 3, 4, 8, 24]
    assert len(selection.candidates) == n_layers * len(selection.positions)
    assert set(selection.fit_pairs).isdisjoint(selection.selection_pairs)
    assert sorted(selection.fit_pairs + selection.selection_pairs) == list(range(len(tiny["ch"])))
    chosen = selection.chosen
    assert chosen is not None and chosen.survives and chosen.layer < late
    live = [c for c in selection.candidates if c.layer < late and c.norm > 0]
    assert all(np.isfinite(c.ranked_change) for c in live)
    assert not any(c.checked or np.isfinite(c.ranked_change) for c in selection.candidates if c not in live)
    # the checked ones are the best ranked, CHECK_BATCH at a time, up to the first batch with a survivor
    ranked = sorted(live, key=lambda c: c.ranked_change)
    checked = [c for c in selection.candidates if c.checked]
    assert ranked[: len(checked)] == sorted(checked, key=lambda c: c.ranked_change)
    assert len(checked) % D.CHECK_BATCH == 0 or len(checked) == len(live)
    last = (len(checked) - 1) // D.CHECK_BATCH * D.CHECK_BATCH  # where the last batch checked starts
    assert any(c.survives for c in ranked[last : len(checked)]) and not any(c.survives for c in ranked[:last])
    for c in selection.candidates:
        assert c.survives == (c.checked and c.kl <= D.MAX_KL and c.addition_change > 0), c
        if c.survives:
            assert chosen.ablated_harmful <= c.ablated_harmful
        assert bool(c.verdict) == (not c.survives)
    assert selection.grid("kl").shape == (n_layers, len(selection.positions))
    assert selection.rank_pairs == selection.selection_pairs[: D.RANK_PAIRS]
    fit = [tiny["ch"][i] for i in selection.fit_pairs], [tiny["cb"][i] for i in selection.fit_pairs]
    diffs = D.candidate_directions(engine, *fit)
    torch.testing.assert_close(selection.direction.vector, diffs[chosen.layer, chosen.position])
    # every candidate batched as a variant reads what the one-direction path (checked by hand above) reads
    held = [tiny["ch"][i] for i in selection.selection_pairs], [tiny["cb"][i] for i in selection.selection_pairs]
    for c in (chosen, ranked[0], ranked[-1]):
        one = D.direction_effects(engine, D.Direction(c.layer, c.position, diffs[c.layer, c.position]), *held,
                                  n_boot=100)
        r = len(selection.rank_pairs)
        assert c.ranked_change == pytest.approx((one.m_h_ablated[:r] - one.m_h[:r]).mean(), abs=1e-4)
        if c.checked:
            assert c.addition_change == pytest.approx((one.m_b_added - one.m_b).mean(), abs=1e-4)
            assert c.kl == pytest.approx(one.kl_benign.mean(), abs=1e-5)
        # the harmful side is measured in full only where the filters pass (it cannot change their verdict)
        if c.survives:
            assert c.ablated_harmful == pytest.approx(one.m_h_ablated.mean(), abs=1e-4)
        else:
            assert np.isnan(c.ablated_harmful)
    again = D.select_direction(engine, tiny["ch"], tiny["cb"], seed=0)
    assert repr(again.candidates) == repr(selection.candidates) and again.chosen == selection.chosen  # NaN != NaN
    other = D.select_direction(engine, tiny["ch"][:40], tiny["cb"][:40], seed=1)
    assert other.fit_pairs != D.split_pairs(40, 0)[0]
    # a late layer is never chosen, however much its ablation lowers the refusal score
    late_best = dataclasses.replace(selection.candidates[-1], ablated_harmful=-1e9)
    late_best.discarded = D._discard_reasons(late_best.layer, 1.0, 0.0, 1.0, late)
    assert D._choose([late_best, chosen], n_layers)[0] is chosen
    monkeypatch.setattr(D, "MAX_KL", -1.0)  # nothing survives: no direction, and why
    none = D.select_direction(engine, tiny["ch"][:12], tiny["cb"][:12], seed=0)
    assert none.chosen is None and none.direction is None and "no candidate survives" in none.reason


def test_cosines_with_patched_differences(tiny, selection):
    """The direction taken at (layer, -1) from some pairs has cosine 1 with the residual stream's mean difference
    there on the same pairs; layer 0's stream (the same last token on both sides) has no difference: NaN."""
    engine = tiny["engine"]
    h, b = tiny["ch"][:20], tiny["cb"][:20]
    vector = D.candidate_directions(engine, h, b, k=1)[2, 0]
    cos = D.direction_cosines(engine, D.Direction(2, -1, vector), h, b, n_boot=300)
    by_id = {c.component: c for c in cos}
    assert len(cos) == 3 * tiny["loaded"].n_layers
    assert by_id["blocks.2.hook_resid_pre@-1"].cosine == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(by_id["blocks.0.hook_resid_pre@-1"].cosine)
    for c in cos:
        assert np.isnan(c.cosine) or (c.low <= c.cosine <= c.high and -1 - 1e-9 <= c.low and c.high <= 1 + 1e-9)
    # the audit's scored pairs: the mean difference of the layer's MLP output, by hand
    diff = D.last_positions(engine, tiny["h"], [("mlp_out", 1)])[:, 0, 0] - D.last_positions(
        engine, tiny["b"], [("mlp_out", 1)])[:, 0, 0]
    unit = selection.direction.unit
    want = float(diff.mean(0) @ unit / diff.mean(0).norm())
    got = D.direction_cosines(engine, selection.direction, tiny["h"], tiny["b"], kinds=["mlp_out"], n_boot=300)
    assert got[1].component == "blocks.1.hook_mlp_out@-1" and got[1].cosine == pytest.approx(want, abs=1e-5)


def test_bad_input_is_a_clear_error(tiny, selection):
    engine, h, b = tiny["engine"], tiny["h"], tiny["b"]
    with pytest.raises(DataError, match="pair up"):
        D.direction_effects(engine, selection.direction, h, b[:-1])
    with pytest.raises(DataError, match="no harmful prompts"):
        D.candidate_directions(engine, [], b)
    with pytest.raises(DataError, match="outside the model"):
        D.candidate_directions(engine, [[5, 10**6]], b)
    with pytest.raises(DataError, match="at least 4"):
        D.select_direction(engine, h[:3], b[:3])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        D.select_direction(engine, h, b, fraction=1.0)
    with pytest.raises(DataError, match="length"):
        D.direction_effects(engine, D.Direction(1, -1, torch.zeros(tiny["loaded"].d_model)), h, b)
    with pytest.raises(DataError, match="not one of"):
        D.direction_effects(engine, dataclasses.replace(selection.direction, layer=9), h, b)


def test_variant_effects_equal_one_direction_at_a_time(tiny, selection):
    """Several directions batched as variants read what :func:`direction_effects` (checked by hand above) reads for
    each alone; a zero vector is a no-op with no share."""
    engine, h, b = tiny["engine"], tiny["h"][:6], tiny["b"][:6]
    vectors = selection.diffs[:, -1]
    clean = D.direction_effects(engine, D.Direction(1, -1, vectors[1]), h, b, n_boot=100)
    gaps = clean.m_h - clean.m_b
    got = D.variant_effects(engine, [1, 2], vectors[[1, 2]], h, b, gaps=gaps, n_boot=200)
    for v, layer in enumerate((1, 2)):
        one = D.direction_effects(engine, D.Direction(layer, -1, vectors[layer]), h, b, gaps=gaps, n_boot=200)
        for name in ("m_h_ablated", "m_b_ablated", "m_b_added", "kl_benign"):
            np.testing.assert_allclose(getattr(got, name)[v], getattr(one, name), atol=1e-5, err_msg=name)
        assert got.necessity[v].estimate == pytest.approx(one.necessity.estimate, abs=1e-6)
        assert got.sufficiency[v].estimate == pytest.approx(one.sufficiency.estimate, abs=1e-6)
        assert got.kl[v].estimate == pytest.approx(one.kl.estimate, abs=1e-6)
    zero = D.variant_effects(engine, [0], torch.zeros(1, tiny["loaded"].d_model), h, b, gaps=gaps, n_boot=100)
    assert zero.necessity == [None] and zero.sufficiency == [None] and zero.norms == [0.0]
    np.testing.assert_allclose(zero.m_h_ablated[0], zero.m_h, atol=1e-5)  # the cached prefix: float noise
    with pytest.raises(DataError, match="layers"):
        D.variant_effects(engine, [9], vectors[[1]], h, b)


def test_replies_under_addition_equal_plain_hooked_generation(tiny, selection):
    loaded, engine, direction = tiny["loaded"], tiny["engine"], selection.direction
    prompts = tiny["b"][:3]
    rate, replies = D.refusal_after_addition(engine, direction, prompts, max_new_tokens=8, until_decided=False)
    model, want = loaded.model, []
    layer = model.model.layers[direction.layer]
    handle = layer.register_forward_pre_hook(lambda m, args: (args[0] + direction.vector, *args[1:]))
    try:
        for p in prompts:
            with torch.no_grad():
                out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                     pad_token_id=loaded.tokenizer.pad_token_id)
            want.append(loaded.tokenizer.decode(out[0, len(p):], skip_special_tokens=True))
    finally:
        handle.remove()
    assert replies == want
    assert (rate.refused, rate.total) == (sum(map(is_refusal, want)), 3)
    with pytest.raises(DataError, match="not one of"), D.added(engine, 9, direction.vector):
        pass


# -- in the audit report (issue 27) ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
    """The gate tests' small audit of the tiny refuser (8 pairs): one audit for both files."""
    from tests.test_gate import small_audit

    return small_audit()


def test_the_report_holds_a_valid_direction_section(report):
    d = report.refusal_direction
    assert report.schema_version == rs.SCHEMA_VERSION == "1.8"
    assert d is not None and d.computed and d.reason is None
    assert rs.RefusalDirection.model_validate(d.model_dump()) == d
    n_layers, late = report.model.n_layers, D.late_layer_start(report.model.n_layers)
    f = d.filters
    assert (f.max_kl, f.min_addition_change, f.late_layer_fraction, f.selection_fraction, f.late_layer_start) == (
        D.MAX_KL, D.MIN_ADDITION_CHANGE, D.LATE_LAYER_FRACTION, D.SELECTION_FRACTION, late)
    assert d.layer < late and d.position in f.positions and len(d.vector) == report.model.d_model
    assert d.n_candidates == n_layers * len(f.positions) and 1 <= d.n_surviving <= d.n_checked <= d.n_candidates
    assert d.rank_pair_ids == d.selection_pair_ids[: D.RANK_PAIRS]
    fit, held = set(d.fit_pair_ids), set(d.selection_pair_ids)
    assert not fit & held and len(fit | held) == report.dataset.n_calibration
    assert not (fit | held) & {p.id for p in report.pairs}  # never a scored pair
    assert d.n_pairs == report.dataset.n_used and d.refusal_before == report.behaviour.harmful_refusal
    assert d.refusal_after_ablation.total == len(report.pairs)
    assert d.over_refusal_before == report.behaviour.benign_over_refusal
    assert d.tricky_over_refusal_after_addition.total == report.dataset.n_tricky
    chosen = next(x for x in d.layers if x.layer == d.layer)
    assert [x.layer for x in d.layers] == list(range(n_layers)) and not chosen.discarded
    assert chosen.ablation.ci_low > 0 and chosen.addition.ci_low > 0  # on the ranking pairs, as on the patched
    assert d.necessity.ci_low > 0 and d.sufficiency.ci_low > 0  # the organism's refusal runs through it
    # the patching view, read independently from the report's components
    chain = sorted((c for c in report.components if c.kind == "resid_pre" and c.position == -1
                    and c.trivial is None and c.ci_low is not None), key=lambda c: c.layer)
    assert d.stream_layer == next((c.layer for c in chain if c.ci_low > 0.5), None)
    assert ("do not agree" in d.agreement) == (d.stream_layer is not None and d.layer < d.stream_layer)
    writers = {c.id: c for c in rs.rank_writers(report.components)}
    assert d.cosines and all(c.ranked in writers and c.share == writers[c.ranked].share for c in d.cosines)
    assert all(-1 <= c.ci_low <= c.cosine <= c.ci_high <= 1 for c in d.cosines if c.cosine is not None)
    markdown = render_markdown(report)
    assert "## Refusal direction" in markdown and "**Refusal direction**" in markdown  # the glossary
    assert (f"Refusal left after removing one direction: {100 * d.refusal_after_ablation.rate:.1f}% "
            in markdown) and d.agreement in markdown


def test_the_stored_direction_is_the_difference_in_means_of_its_fit_pairs(report, tiny):
    """Recomputed by hand: plain ``output_hidden_states`` forwards of the fit pairs named in the report (hidden state l
    is layer l's input, checked above), one unpadded prompt at a time."""
    d = report.refusal_direction
    by_id = {p.id: p for p in load_inputs(AuditConfig()).calibration}
    loaded = tiny["loaded"]

    def mean(side: str) -> torch.Tensor:
        rows = []
        for i in d.fit_pair_ids:
            ids = format_prompt(loaded.tokenizer, getattr(by_id[i], side))
            with torch.no_grad():
                states = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            rows.append(states[d.layer][0, d.position].double())
        return torch.stack(rows).mean(0)

    want = (mean("harmful") - mean("benign")).numpy()
    np.testing.assert_allclose(d.vector, want, rtol=1e-4, atol=1e-4)
    assert d.norm == pytest.approx(float(np.linalg.norm(want)), rel=1e-5)


def test_the_reported_shares_equal_plain_hooks(report, tiny):
    """Necessity and sufficiency over the report's patched pairs, by the plain hooks of the first test (the audit's
    gaps in the denominator)."""
    from refusal_eval.pipeline.behaviour import token_sets_of

    d, model, tok = report.refusal_direction, tiny["loaded"].model, tiny["loaded"].tokenizer
    sets = token_sets_of(report.metric)
    pairs = {p.id: p for p in load_inputs(AuditConfig(max_pairs=8)).pairs}
    scored = {p.id: p for p in report.pairs}
    vector = torch.tensor(d.vector)
    unit = vector / vector.norm()
    removed, added, gaps = [], [], []
    for i in report.used_pair_ids:
        h, b = (format_prompt(tok, getattr(pairs[i], side)) for side in ("harmful", "benign"))
        removed.append(hand_score(model, sets, h)[0] - hand_score(model, sets, h, unit=unit)[0])
        added.append(hand_score(model, sets, b, add_layer=d.layer, vector=vector)[0] - hand_score(model, sets, b)[0])
        gaps.append(scored[i].m_harmful - scored[i].m_benign)
    assert d.necessity.estimate == pytest.approx(sum(removed) / sum(gaps), abs=1e-4)
    assert d.sufficiency.estimate == pytest.approx(sum(added) / sum(gaps), abs=1e-4)
    # the permutation null of the components on these per-pair effects (8 pairs: every sign vector, exact p)
    perm = report.controls.permutation
    p = sign_flip_test(np.array([removed, added]), perm.n_permutations, perm.seed).p
    assert d.p_necessity == pytest.approx(p[0], abs=1 / 2 ** len(removed)) and d.p_necessity < 0.05
    assert d.p_sufficiency == pytest.approx(p[1], abs=1 / 2 ** len(added))


def test_why_the_direction_is_not_measured(tiny, monkeypatch):
    from types import SimpleNamespace

    from refusal_eval.pipeline import refusal_direction as stage

    calibration = load_inputs(AuditConfig()).calibration
    a = SimpleNamespace(shares_defined=True, shares_reason="", loaded=tiny["loaded"], engine=tiny["engine"])
    inputs = SimpleNamespace(calibration=calibration[:12], tricky=[])
    assert stage.not_measured(a, inputs, AuditConfig()) is None
    assert stage.not_measured(a, inputs, AuditConfig(refusal_direction="off")) == (
        "not computed: turned off (--refusal-direction off)")
    assert "--device-map" in stage.not_measured(a, inputs, AuditConfig(device_map="auto"))
    flat = SimpleNamespace(shares_defined=False, shares_reason="the gap over the patched pairs is not separated")
    assert "shares are undefined (the gap over the patched pairs is not separated)" in stage.not_measured(
        flat, inputs, AuditConfig())
    assert stage.not_measured(flat, inputs, AuditConfig(), shares=False) is None  # the random-weights control
    few = SimpleNamespace(calibration=calibration[:3])
    assert "3 calibration pair(s)" in stage.not_measured(a, few, AuditConfig())
    off = stage.direction_section(stage.direction_stage(a, inputs, AuditConfig(refusal_direction="off")), [], a,
                                  AuditConfig())
    assert not off.computed and off.reason.endswith("--refusal-direction off)") and off.vector is None
    shown = render_markdown(rs.AuditReport.model_validate(
        {**rs.AuditReport.model_validate(_shipped_raw()).model_dump(), "refusal_direction": off.model_dump()}))
    assert "## Refusal direction" in shown and "Refusal direction: not computed: turned off" in shown
    # no candidate survives the filters: the section keeps the selection, with the reason
    monkeypatch.setattr(D, "MAX_KL", -1.0)
    found = stage.direction_stage(a, inputs, AuditConfig())
    none = stage.direction_section(found, [], a, AuditConfig())
    assert none.reason.startswith("no direction chosen: no candidate survives") and not none.computed
    assert none.n_surviving == 0 and none.filters.max_kl == -1.0 and none.vector is None
    assert len(none.fit_pair_ids) + len(none.selection_pair_ids) == 12


def _shipped_raw() -> dict:
    """The committed SmolLM2 refuser report (schema 1.5, no direction section), as JSON."""
    import json
    from pathlib import Path

    reports = Path(__file__).resolve().parents[1] / "examples" / "reports"
    path = reports / "SmolLM2-135M-Instruct.Q4_1+smollm2-refuser-lora" / "report.json"
    return json.loads(path.read_text())


def test_reports_before_schema_1_7_load_without_a_section():
    old = rs.AuditReport.model_validate(_shipped_raw())
    assert old.schema_version in ("1.5", "1.6") and old.refusal_direction is None
    assert "## Refusal direction" not in render_markdown(old)


def test_ranked_selection_chooses_what_measuring_every_candidate_chooses(tiny, selection, monkeypatch):
    """The cost cut (rank on a few prompts, then measure the best ranked until one survives) against Arditi's
    selection with every candidate measured on every selection pair: the same choice on the tiny refuser."""
    monkeypatch.setattr(D, "RANK_PAIRS", 10**6)
    monkeypatch.setattr(D, "CHECK_BATCH", 10**6)
    full = D.select_direction(tiny["engine"], tiny["ch"], tiny["cb"], seed=0)
    live = [c for c in full.candidates if c.layer < D.late_layer_start(full.n_layers) and c.norm > 0]
    assert all(c.checked for c in live) and full.rank_pairs == full.selection_pairs
    assert (full.chosen.layer, full.chosen.position) == (selection.chosen.layer, selection.chosen.position)
    assert full.chosen.ablated_harmful == pytest.approx(selection.chosen.ablated_harmful, abs=1e-5)


def test_the_template_prefix_is_run_once_per_candidate_where_it_agrees(tiny, monkeypatch):
    """The shared chat-template opening is cached when the cached forward reproduces the full one; a model where it
    does not (here: a cache path made wrong on purpose) and a two-branch score (4D masks) get full forwards."""
    engine = tiny["engine"]
    probe = D._probe(engine)
    seqs = tiny["ch"][:6]
    prefix, rest = D._prefix_plan(engine, probe, seqs)
    n = prefix.shape[0]
    assert n >= 2 and all(r == s[n:] for r, s in zip(rest, seqs, strict=True))
    branched = tree_engine(tiny["loaded"], two_branch_tree(), AuditConfig())
    assert D._prefix_plan(branched, D._probe(branched), seqs) == (None, seqs)
    wrong = D._prefixed_scores
    monkeypatch.setattr(D, "_prefixed_scores", lambda *a, **k: wrong(*a, **k) + 0.01)
    assert D._prefix_plan(engine, probe, seqs) == (None, seqs)
