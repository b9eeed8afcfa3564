"""LoRA (peft) adapters: merged into the model for an audit, named in the report, bad folders exit 2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_eval import AuditConfig, audit
from refusal_eval.cli import main
from refusal_eval.errors import ModelError
from refusal_eval.models.loading import load_model, shipped_model_path

peft = pytest.importorskip("peft", reason="adapters need peft: pip install peft")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter with non-zero (random) weights on the tiny-refuser's attention and MLP projections."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(shipped_model_path())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    folder = tmp_path_factory.mktemp("adapters") / "random-lora"
    model.save_pretrained(folder)
    return folder


def test_adapter_is_merged_into_the_weights(adapter):
    loaded = load_model(None, adapter=str(adapter))
    assert loaded.name == "tiny-refuser+random-lora" and "adapter" in loaded.source
    # independent computation: peft's own forward through the unmerged adapter
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(shipped_model_path()),
                                               str(adapter)).eval()
    plain = load_model(None)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
        base = plain.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-3  # the adapter changes the model
    assert loaded.weights_sha256() != plain.weights_sha256()


def test_audit_with_adapter_names_it(adapter):
    report = audit(AuditConfig(adapter=str(adapter), max_pairs=4, n_boot=200, n_permutations=200,
                               components=["mlp_out"], positions=["all"], tricky="", max_calibration_pairs=8),
                   progress=False)
    assert report.model.name == "tiny-refuser+random-lora" and report.config["adapter"] == str(adapter)


def test_bad_adapter_input_exits_2(tmp_path, adapter, capsys):
    assert main(["run", "--adapter", str(tmp_path), "--out", str(tmp_path), "--quiet"]) == 2
    assert "not a peft adapter folder" in capsys.readouterr().err
    two = ["run", "--model", "tiny-refuser", "--model", "tiny-refuser", "--adapter", str(adapter), "--out",
           str(tmp_path), "--quiet"]
    assert main(two) == 2
    assert "one per model" in capsys.readouterr().err
    with pytest.raises(ModelError, match="not a peft adapter folder"):
        load_model(None, adapter=str(tmp_path))


def test_base_and_adapter_audited_and_compared_in_one_run(adapter, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--model", "tiny-refuser", "--adapter", "none", "--model", "tiny-refuser", "--adapter",
            str(adapter), "--max-pairs", "6", "--n-boot", "200", "--n-permutations", "200", "--components",
            "mlp_out", "--positions", "all", "--tricky", "", "--max-calibration-pairs", "8", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    assert (out / "tiny-refuser" / "report.json").is_file()
    assert (out / "tiny-refuser+random-lora" / "report.json").is_file()
    assert (out / "comparison-tiny-refuser-vs-tiny-refuser+random-lora" / "comparison.json").is_file()
