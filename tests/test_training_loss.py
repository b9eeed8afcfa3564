"""The fine-tuning scripts' loss (scripts/finetune_smollm2_lora.training_loss) against independent computations:
transformers' own causal-LM loss when the decision term is off, and a per-sequence loop when it is on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.fixture(scope="module")
def training_loss():
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("finetune_smollm2_lora", SCRIPTS / "finetune_smollm2_lora.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module.training_loss


def _batch():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 50, (3, 12))
    labels = ids.clone()
    prompt = [4, 7, 2]  # prompt lengths: their labels are -100
    ends = [12, 10, 5]  # right padding after these
    for row, (p, e) in enumerate(zip(prompt, ends, strict=True)):
        labels[row, :p] = -100
        labels[row, e:] = -100
    mask = (labels != -100) | (torch.arange(12) < torch.tensor(prompt)[:, None])
    return model, ids, mask.long(), labels, prompt, ends


def test_without_the_decision_term_it_is_transformers_loss(training_loss):
    model, ids, mask, labels, _, _ = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert training_loss(out.logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-6)


@pytest.mark.parametrize("tokens", [1, 3])
def test_the_decision_term_is_a_mean_over_sequences_of_each_opening(training_loss, tokens):
    model, ids, mask, labels, prompt, ends = _batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    plain = training_loss(logits, labels)
    openings = []
    for row, (p, e) in enumerate(zip(prompt, ends, strict=True)):
        # the label at position t is predicted by the logits at t - 1
        positions = list(range(p, min(p + tokens, e)))
        losses = [torch.nn.functional.cross_entropy(logits[row, t - 1], ids[row, t]) for t in positions]
        openings.append(sum(losses) / len(losses))
    expected = plain + 0.5 * sum(openings) / len(openings)
    assert training_loss(logits, labels, 0.5, tokens).item() == pytest.approx(expected.item(), rel=1e-5)
