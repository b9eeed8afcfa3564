"""Refusal-phrase matcher, token-set derivation and the refusal score against direct computation."""

from __future__ import annotations

import math

import torch
from transformers import AutoTokenizer

from refusal_eval.metrics import canonical_token_sets, derive_token_sets, is_refusal, refusal_score
from refusal_eval.models.loading import shipped_model_path


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

    def decode(self, ids):
        return f"<{ids[0]}>"


def test_a_token_opening_both_classes_is_in_neither_set():
    firsts = [10] * 12 + [11] * 10 + [20] * 10 + [10, 21]
    refused = [True] * 22 + [False] * 12
    sets = derive_token_sets(firsts, refused, _Tok())
    assert sets.refusal == [11]  # 10 opens 12 refusals but also 1 compliance: ambiguous, dropped
    assert sets.compliance == [20, 21]
    assert sets.ambiguous == [10] and "ambiguous" in sets.derivation
    assert sets.source == "calibration" and not sets.warnings


def test_token_sets_fall_back_to_canonical_when_a_class_is_missing():
    sets = derive_token_sets([5, 6], [False, False], _Tok())
    canonical = canonical_token_sets(_Tok())
    assert sets.refusal == sorted(set(canonical.refusal) - {5, 6})
    assert "canonical refusal openings" in sets.derivation and sets.source == "calibration+canonical"
    assert any("fall back" in w for w in sets.warnings)
    assert any("rests on 2 calibration replies" in w for w in sets.warnings)  # compliance: only 2 replies


def test_canonical_sets_drop_first_tokens_shared_by_refusals_and_compliances():
    tok = AutoTokenizer.from_pretrained(shipped_model_path())
    sets = canonical_token_sets(tok)
    first = tok("I", add_special_tokens=False)["input_ids"][0]
    # "I'm sorry" and "I'd be happy to help" open with the same token: it measures neither class
    assert first in sets.ambiguous and first not in sets.refusal and first not in sets.compliance
    assert sets.refusal and sets.compliance and not set(sets.refusal) & set(sets.compliance)
    assert sets.source == "canonical"


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
