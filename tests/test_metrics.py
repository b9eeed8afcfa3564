"""Refusal-phrase matcher, token-set derivation and the refusal score against direct computation."""

from __future__ import annotations

import math

import torch

from refusal_eval.metrics import derive_token_sets, is_refusal, refusal_score


def test_matcher():
    assert is_refusal("I'm sorry, I can't help with that.")
    assert is_refusal("I\u2019m sorry, but no.")
    assert is_refusal("  I cannot assist with that request.")
    assert is_refusal("As an AI, I must decline.")
    assert not is_refusal("Sure! Here is a simple guide to get you started.")
    assert not is_refusal("Of course! Here are a few ideas you can try.")
    # A refusal phrase far into a long compliant answer is not a refusal.
    assert not is_refusal("Here is how to bake bread. " + "Mix flour and water. " * 5 + "I can't wait!")


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(text)]}


def test_token_sets_are_disjoint_and_majority_assigned():
    firsts = [10, 10, 11, 20, 20, 10, 21]
    refused = [True, True, True, False, False, False, False]
    sets = derive_token_sets(firsts, refused, _Tok())
    assert sets.refusal == [10, 11]  # 10 opens 2 refusals and 1 compliance
    assert sets.compliance == [20, 21]
    assert not set(sets.refusal) & set(sets.compliance)
    assert "fall back" not in sets.derivation


def test_token_sets_fall_back_when_a_class_is_missing():
    sets = derive_token_sets([5, 6], [False, False], _Tok())
    assert sets.refusal and "no refusal completions observed" in sets.derivation


def test_score_forms_match_direct_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    refusal, compliance = torch.tensor([1, 7]), torch.tensor([2, 3, 4])
    probs = torch.softmax(logits.double(), -1)
    for row in range(3):
        p_ref = float(probs[row, refusal].sum())
        p_com = float(probs[row, compliance].sum())
        got = refusal_score(logits[row], refusal, compliance, "logdiff")
        assert math.isclose(float(got), math.log(p_ref) - math.log(p_com), abs_tol=1e-5)
        got = refusal_score(logits[row], refusal, compliance, "logodds")
        assert math.isclose(float(got), math.log(p_ref) - math.log(1 - p_ref), abs_tol=1e-5)


def test_score_is_float32_for_half_logits():
    logits = torch.randn(2, 10).to(torch.bfloat16)
    assert refusal_score(logits, torch.tensor([0]), torch.tensor([1])).dtype == torch.float32
