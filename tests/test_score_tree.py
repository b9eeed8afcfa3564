"""The opening tree of depth 2: derivation from calibration openings, the score against a closed form, and exact
patching of a depth-2 score against an independent computation (plain hooks, one prompt and one branch at a time)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from refusal_eval.errors import MetricError
from refusal_eval.metrics import (
    AUTO_BRANCH_REPLIES,
    Branch,
    TokenSets,
    canonical_token_sets,
    check_branch_tokens,
    derive_token_sets,
    tree_score,
)
from refusal_eval.patching import Component, PatchEngine, build_pair_batch, enumerate_components

from .conftest import random_llama, random_pairs
from .test_patching import hooked_logits


class _Tok:
    """Decodes ids as <id>; id 0 is special."""

    all_special_ids = [0]

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


TOK = _Tok()
I_, SORRY, SURE, AM, D, CAN = 10, 11, 12, 13, 14, 15  # "I", "Sorry", "Sure", "'m", "'d", " can"


def llama3_style(n_ref: int = 12, n_com: int = 12):
    """Refusals "I'm sorry" (n_ref) and one "Sorry"; compliances "I'd be happy" (n_com) and one "Sure"; one
    refusal "I can't" and one compliance "I can" (second token ' can' ambiguous)."""
    openings = [(I_, AM)] * n_ref + [(SORRY, 1)] + [(I_, CAN)] + [(I_, D)] * n_com + [(SURE, 2)] + [(I_, CAN)]
    refused = [True] * (n_ref + 2) + [False] * (n_com + 2)
    return openings, refused


def test_depth_two_tree_from_openings():
    openings, refused = llama3_style()
    tree = derive_token_sets(openings, refused, TOK, depth=2)
    assert (tree.refusal, tree.compliance, tree.ambiguous, tree.depth) == ([SORRY], [SURE], [I_], 2)
    (branch,) = tree.branches
    assert (branch.token, branch.refusal, branch.compliance, branch.ambiguous) == (I_, [AM], [D], [CAN])
    assert branch.refusal_counts == {AM: 12, CAN: 1} and branch.compliance_counts == {D: 12, CAN: 1}
    assert tree.tail == [I_]
    assert "'<10>' branches on the second token" in tree.derivation
    assert "dropped as ambiguous: '<15>'" in tree.derivation
    assert not tree.warnings  # 12 + 1 replies on each side


def test_auto_depth_branches_only_on_a_frequent_ambiguous_token():
    openings, refused = llama3_style()
    assert derive_token_sets(openings, refused, TOK, depth="auto").depth == 2
    # the ambiguous "I" opens fewer than AUTO_BRANCH_REPLIES replies: depth 1, the leaves only
    few = (AUTO_BRANCH_REPLIES - 4) // 2
    openings, refused = llama3_style(few, few)
    tree = derive_token_sets(openings, refused, TOK, depth="auto")
    assert sum(1 for o in openings if o[0] == I_) < AUTO_BRANCH_REPLIES
    assert (tree.depth, tree.branches, tree.refusal, tree.compliance) == (1, [], [SORRY], [SURE])
    assert "auto branches only where one opens at least" in tree.derivation


def test_depth_one_is_todays_token_sets():
    """At depth 1 the second tokens change nothing: the sets, counts and ambiguous tokens of the first tokens."""
    openings, refused = llama3_style()
    by_pairs = derive_token_sets(openings, refused, TOK, depth=1)
    by_firsts = derive_token_sets([o[0] for o in openings], refused, TOK)
    for tree in (by_pairs, by_firsts):
        assert (tree.refusal, tree.compliance, tree.ambiguous, tree.branches, tree.depth) == (
            [SORRY], [SURE], [I_], [], 1)
    assert by_pairs.refusal_counts == by_firsts.refusal_counts


@pytest.mark.parametrize("depth", [0, 3, 4, "deep"])
def test_unknown_depth_is_refused(depth):
    openings, refused = llama3_style()
    with pytest.raises(MetricError, match="--score-depth"):
        derive_token_sets(openings, refused, TOK, depth=depth)


def test_a_calibration_set_too_small_to_branch_is_an_error():
    # only the ambiguous second token follows "I": nothing separates
    openings = [(I_, CAN), (SORRY, 1), (I_, CAN), (SURE, 2)]
    with pytest.raises(MetricError, match="too small to branch"):
        derive_token_sets(openings, [True, True, False, False], TOK, depth=2)
    # many replies, but the refusals and compliances share their first two tokens ("As an AI" / "As a quick
    # answer" where "As" is two tokens): depth 2 says a deeper tree would be needed; auto stays at depth 1
    openings = [(I_, CAN)] * 12 + [(SORRY, 1)] + [(I_, CAN)] * 12 + [(SURE, 2)]
    refused = [True] * 13 + [False] * 13
    with pytest.raises(MetricError, match="deeper tree"):
        derive_token_sets(openings, refused, TOK, depth=2)
    auto = derive_token_sets(openings, refused, TOK, depth="auto")
    assert auto.depth == 1 and "no second token that separates" in auto.derivation
    # no ambiguous first token at all: nothing to branch
    with pytest.raises(MetricError, match="nothing to branch"):
        derive_token_sets([(SORRY, 1), (SURE, 2)], [True, False], TOK, depth=2)


def test_every_refusal_opening_with_the_shared_token_is_scored_at_depth_two_only():
    """Llama-3 style: every refusal opens with "I". Depth 1 has no refusal token left (canonical fallback, with a
    warning); depth 2 scores the refusals by their second token."""
    openings = [(I_, AM)] * 12 + [(I_, D)] * 12 + [(SURE, 2)] * 3
    refused = [True] * 12 + [False] * 15
    deep = derive_token_sets(openings, refused, TOK, depth=2)
    assert deep.refusal == [] and deep.branches[0].refusal == [AM] and not deep.warnings


class _WordTok:
    """Splits on spaces and apostrophes into stable ids (a tokenizer stand-in for the canonical openings)."""

    all_special_ids: list[int] = []

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        words = text.replace("'", " '").split()
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 1) for w in words]}

    def decode(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return " ".join(inverse[i] for i in ids)


def test_canonical_openings_branch_on_the_shared_first_token():
    tok = _WordTok()
    shallow = canonical_token_sets(tok)
    deep = canonical_token_sets(tok, depth=2)
    i = tok("I")["input_ids"][0]
    assert i in shallow.ambiguous and i not in shallow.refusal + shallow.compliance
    (branch,) = [b for b in deep.branches if b.token == i]
    words = {name: {tok.decode([t]) for t in getattr(branch, name)} for name in ("refusal", "compliance")}
    assert {"'m", "am", "cannot", "apologize"} <= words["refusal"] and {"'d", "'ll"} <= words["compliance"]
    assert tok.decode(branch.ambiguous) == "can"  # "I can't" refuses, "I can help" complies
    assert (shallow.refusal, shallow.compliance) == (deep.refusal, deep.compliance)


def test_branch_tokens_that_cannot_be_appended_are_refused():
    tree = TokenSets([1], [2], "t", branches=[Branch(0, [3], [4])], depth=2)
    with pytest.raises(MetricError, match="special token"):
        check_branch_tokens(tree, TOK, 100)
    tree.branches = [Branch(500, [3], [4])]
    with pytest.raises(MetricError, match="outside the model's 100 input embeddings"):
        check_branch_tokens(tree, TOK, 100)
    tree.branches = [Branch(5, [3], [4])]
    check_branch_tokens(tree, TOK, 100)


TREE = TokenSets([1, 2], [3], "test", branches=[Branch(7, [11, 12], [13]), Branch(9, [14], [15, 16])], depth=2)


def closed_form(logits: torch.Tensor, tree: TokenSets, form: str) -> float:
    """P(refusal) and P(compliance) summed over the tree with plain probabilities, one term at a time."""
    probs = [[math.exp(v) for v in torch.log_softmax(row.double(), -1).tolist()] for row in logits]
    mass = {}
    for name in ("refusal", "compliance"):
        total = sum(probs[0][t] for t in getattr(tree, name))
        for j, branch in enumerate(tree.branches):
            total += probs[0][branch.token] * sum(probs[1 + j][t] for t in getattr(branch, name))
        mass[name] = total
    if form == "logdiff":
        return math.log(mass["refusal"]) - math.log(mass["compliance"])
    return math.log(mass["refusal"]) - math.log(1 - mass["refusal"])


@pytest.mark.parametrize("form", ["logdiff", "logodds"])
def test_tree_score_equals_the_closed_form(form):
    gen = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(5, 3, 20, generator=gen)
    got = tree_score(logits, TREE, form)
    for i in range(5):
        assert abs(float(got[i]) - closed_form(logits[i], TREE, form)) < 1e-4


def test_a_tree_without_branches_is_the_depth_one_score():
    from refusal_eval.metrics import refusal_score

    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(1))
    flat = TokenSets([1, 2], [3, 4], "t")
    assert torch.equal(tree_score(logits, flat), refusal_score(logits, torch.tensor([1, 2]), torch.tensor([3, 4])))
    with pytest.raises(ValueError, match="needs logits at 3 positions"):
        tree_score(torch.randn(4, 2, 20), TREE)


def naive_tree_patch(loaded, harmful, benign, component: Component, direction: str, tree: TokenSets) -> float:
    """One unpadded forward per cell *and per branch* (prompt + branch token), hooks on the HF Llama modules: the
    source activation is written at prompt positions only, and the score is read from the plain logits."""
    model = loaded.model
    target, source = (benign, harmful) if direction == "denoise" else (harmful, benign)
    block = model.model.layers[component.layer]
    module, pre = {
        "resid_pre": (block, True), "resid_post": (block, False), "attn_out": (block.self_attn, False),
        "mlp_out": (block.mlp, False), "head": (block.self_attn.o_proj, True),
    }[component.kind]
    length = len(target)
    positions = range(length) if component.position is None else [length + component.position]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    cols = slice(None) if component.head is None else slice(component.head * head_dim, (component.head + 1) * head_dim)
    rows = []
    for j, branch in enumerate(tree.branches):
        saved = {}

        def run(ids, fn, branch=branch):
            return hooked_logits(model, module, pre, ids + [branch.token], fn)

        def grab(x, saved=saved):
            saved["x"] = x.detach().clone()
            return x

        def put(x, saved=saved):
            x = x.clone()
            for p in positions:
                x[0, p, cols] = saved["x"][0, p, cols]
            return x

        run(source, grab)
        logits = run(target, put)
        if j == 0:
            rows.append(logits[-2])
        rows.append(logits[-1])
    return float(tree_score(torch.stack(rows)[None], tree)[0])


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("branches", [1, 2])
def test_depth_two_patching_equals_naive_hooks(direction, branches):
    """Every kind, all positions and each position, padded pairs: the engine (layer skip and prefix reuse on, several
    variants per forward) against one forward per cell and branch; and with both shortcuts off."""
    loaded = random_llama(seed=5)
    tree = TokenSets(TREE.refusal, TREE.compliance, "t", branches=TREE.branches[:branches], depth=2)
    pairs = random_pairs(4, seed=6, min_len=5, max_len=8)
    batch = build_pair_batch(pairs, 0, list("abcd"), tail=tree.tail)

    def fn(logits):
        return tree_score(logits, tree)

    comps = enumerate_components(["resid_pre", "attn_out", "mlp_out", "head", "resid_post"], 3, 4,
                                 batch.width - batch.tail)
    fast = PatchEngine(loaded, fn, max_rows=24, tail=tree.tail)
    patched = fast.patch(batch, comps, direction)
    assert fast.work["prefix_batches"] > 0  # the shortcut really ran
    slow = PatchEngine(loaded, fn, max_rows=24, tail=tree.tail, layer_skip=False, prefix_reuse=False)
    torch.testing.assert_close(patched, slow.patch(batch, comps, direction), atol=1e-5, rtol=0)
    harmful, benign = fast.baseline(batch)
    assert float((harmful - benign).abs().max()) > 1e-2
    # every all-position cell and a seeded sample of the per-position ones (the rest: the shortcut comparison above)
    every = [k for k, c in enumerate(comps) if c.position is None]
    each = [k for k, c in enumerate(comps) if c.position is not None and c.position >= -5]
    for k in every + random.Random(direction + str(branches)).sample(each, 16):
        for i, (h, b) in enumerate(pairs):
            naive = naive_tree_patch(loaded, h, b, comps[k], direction, tree)
            assert abs(float(patched[k, i]) - naive) < 1e-4, (comps[k], i)
    # the source's embeddings at every prompt position make the source run (the branch tokens are the same)
    whole = fast.patch(batch, [Component("resid_pre", 0)], direction)[0]
    torch.testing.assert_close(whole, harmful if direction == "denoise" else benign, atol=1e-5, rtol=0)


def test_depth_one_reproduces_the_committed_tiny_report():
    """--score-depth 1 is today's score: the shipped tiny refuser's token sets, both sides' scores for every pair and
    the patched effects of every layer's attention and MLP output at the last position equal the committed report
    (examples/reports/tiny-refuser), within the docs check's 1e-4."""
    import json
    from pathlib import Path

    import numpy as np

    from refusal_eval import AuditConfig
    from refusal_eval.audit import _side_scores, format_prompt, load_inputs, token_set_stage, tree_engine
    from refusal_eval.models.loading import load_model

    report = json.loads((Path(__file__).parents[1] / "examples/reports/tiny-refuser/report.json").read_text())
    config = AuditConfig(score_depth=1)
    loaded, inputs = load_model(), load_inputs(config)
    sets = token_set_stage(loaded, inputs, config, progress=False)
    assert sets.refusal == [t["id"] for t in report["metric"]["refusal_tokens"]]
    assert sets.compliance == [t["id"] for t in report["metric"]["compliance_tokens"]]
    engine = tree_engine(loaded, sets, config)
    tok, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    harmful = [format_prompt(tok, p.harmful) for p in inputs.pairs]
    benign = [format_prompt(tok, p.benign) for p in inputs.pairs]
    committed = {p["id"]: p for p in report["pairs"]}
    for side, ids in (("m_harmful", harmful), ("m_benign", benign)):
        want = np.array([committed[p.id][side] for p in inputs.pairs])
        np.testing.assert_allclose(_side_scores(engine, ids, pad), want, atol=1e-4, rtol=1e-4)
    used = [i for i, p in enumerate(inputs.pairs) if p.id in set(report["used_pair_ids"])]
    batch = build_pair_batch([(harmful[i], benign[i]) for i in used], pad, [inputs.pairs[i].id for i in used])
    comps = [Component(kind, layer, position=-1) for kind in ("attn_out", "mlp_out")
             for layer in range(loaded.n_layers)]
    effects = (engine.patch(batch, comps, "denoise") - engine.baseline(batch)[1][None, :]).numpy()
    by_id = {c["id"]: c for c in report["components"]}
    for comp, row in zip(comps, effects, strict=True):
        np.testing.assert_allclose(row, by_id[comp.id]["effects"], atol=1e-4, rtol=1e-4, err_msg=comp.id)


@pytest.mark.parametrize("depth", ["0", "4"])
def test_cli_refuses_a_depth_it_does_not_have(depth, tmp_path, capsys):
    from refusal_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--score-depth", depth, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--score-depth" in err and "invalid choice" in err and "Traceback" not in err


def test_cli_depth_two_without_an_ambiguous_opening_exits_2_before_the_audit(tmp_path, capsys):
    """The tiny refuser opens refusals and compliances with different tokens: depth 2 has nothing to branch, and says
    so (exit 2, no report written) after the calibration replies, before any scored reply or patch."""
    from refusal_eval.cli import main

    code = main(["run", "--score-depth", "2", "--max-pairs", "4", "--max-calibration-pairs", "12", "--tricky", "",
                 "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "nothing to branch" in err and "--score-depth 1 or auto" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("report.json"))


def test_an_attention_implementation_without_4d_masks_is_a_model_error():
    """Several branches need a 4D mask; an implementation that takes none (flash attention) is named, with what to
    do, before any forward."""
    from refusal_eval.errors import ModelError
    from refusal_eval.patching.exact import _tail_inputs

    mask = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ModelError, match="'flash_attention_2' does not take"):
        _tail_inputs(mask, 2, torch.zeros(1), "flash_attention_2")
    position_ids, allowed = _tail_inputs(mask, 2, torch.zeros(1), "sdpa")
    assert position_ids[0].tolist() == [0, 1, 2, 3, 4, 4]  # both branch columns sit right after the prompt
    assert allowed[0, 0, 5].tolist() == [True, True, True, True, False, True]  # prompt and itself, not branch 1
