"""End to end: `refusal-eval run | schema | validate` on the shipped tiny refuser, in temp dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig, AutoModelForCausalLM

from refusal_eval import AuditConfig, audit, load_report
from refusal_eval.cli import main
from refusal_eval.data import shipped_dataset
from refusal_eval.models.loading import shipped_model_path
from refusal_eval.report import AuditReport
from refusal_eval.report.markdown import render_markdown

FAST = ["--max-pairs", "10", "--n-boot", "200", "--quiet"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    assert main(["run", "--out", str(out), *FAST]) == 0
    return out / "tiny-refuser"


def test_run_writes_valid_reports(small_run):
    report = load_report(small_run / "report.json")
    assert report.model.name == "tiny-refuser" and report.model.architecture == "llama"
    assert report.dataset.n_pairs == 10 and len(report.used_pair_ids) == report.dataset.n_used
    assert report.gap.separated and report.gap.ci_low > 0
    # the default search leaves the trivial cells out (test_noising_direction checks one's identity) and says so
    assert report.search.mode == "adaptive" and report.search.n_trivial > 0
    assert not any(c.trivial for c in report.components)
    for c in report.components:
        assert len(c.effects) == report.dataset.n_used
        assert c.ci_low <= c.share + 1e-9 and c.share <= c.ci_high + 1e-9
    assert report.metric.refusal_tokens and report.metric.compliance_tokens
    assert report.stats.n_resamples == 200 and report.stats.method == "BCa"
    assert report.command.startswith("refusal-eval run")
    markdown = (small_run / "report.md").read_text()
    for heading in ("## Summary", "## Behaviour", "## Top writers", "Residual stream at the last prompt token",
                    "## Per layer", "## resid_pre: layer", "## Reading this report", "## Refusal direction"):
        assert heading in markdown
    # the refusal direction is on by default, drawn beside the other pictures
    assert report.refusal_direction.computed and report.config["refusal_direction"] == "on"
    assert (small_run / "direction.png").is_file() and "](direction.png)" in markdown


def test_report_round_trips_through_schema(small_run):
    raw = json.loads((small_run / "report.json").read_text())
    again = AuditReport.model_validate(raw)
    assert json.loads(again.model_dump_json()) == raw


def test_same_seed_same_numbers(tmp_path, small_run):
    assert main(["run", "--out", str(tmp_path), *FAST]) == 0
    a = load_report(small_run / "report.json")
    b = load_report(tmp_path / "tiny-refuser" / "report.json")
    assert [c.model_dump() for c in a.components] == [c.model_dump() for c in b.components]
    assert a.gap == b.gap and a.behaviour == b.behaviour and a.model.weights_sha256 == b.model.weights_sha256


def test_schema_and_validate_commands(small_run, tmp_path, capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["schema_version"]["default"] == "1.8"
    assert main(["validate", str(small_run / "report.json")]) == 0
    broken = json.loads((small_run / "report.json").read_text())
    del broken["gap"]
    broken["model"]["n_layers"] = "four"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "gap" in err and "model.n_layers" in err


def test_bad_dataset_exits_2_naming_the_line(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"id": "x", "category": "c", "harmful": "a", "benign": "b", "source": "s"}\n{"id": "y"\n')
    assert main(["run", "--dataset", str(data), "--out", str(tmp_path), "--quiet"]) == 2
    assert "pairs.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_bad_option_exits_2(tmp_path, capsys):
    assert main(["run", "--components", "resid_pre,nonsense", "--out", str(tmp_path), "--quiet"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["run", "--model", str(tmp_path / "missing"), "--out", str(tmp_path), "--quiet"]) == 2


def test_bad_refusal_direction_option_exits_2_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import refusal_eval.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exc:
        main(["run", "--refusal-direction", "maybe", "--out", str(tmp_path), "--quiet"])
    assert exc.value.code == 2
    assert "--refusal-direction: invalid choice: 'maybe'" in capsys.readouterr().err
    with pytest.raises(ValidationError, match="refusal_direction"):
        AuditConfig(refusal_direction="maybe")


def test_noising_direction(tmp_path):
    config = AuditConfig(direction="noise", max_pairs=8, n_boot=200, components=["resid_pre", "mlp_out"],
                         positions=["all"], search="exhaustive")  # the trivial cells are patched too
    report = audit(config, progress=False)
    assert report.direction == "noise"
    assert report.component("blocks.0.hook_resid_pre").share == pytest.approx(1.0, abs=1e-4)
    assert not any(c.position is not None for c in report.components)


def test_model_that_does_not_separate_gets_undefined_shares(tmp_path):
    """All-zero weights give identical scores on both sides: gap 0, so shares must not be printed."""
    folder = tmp_path / "flat-model"
    source = shipped_model_path()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(folder)
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, folder / f.name)
    config = AuditConfig(model=str(folder), max_pairs=6, n_boot=200, positions=["all"])
    report = audit(config, progress=False)
    assert not report.gap.separated and report.gap.verdict == "includes_zero"
    assert report.shares_defined is False and "not separated" in report.shares_reason
    assert all(c.share is None and c.ci_low is None and c.significant is None for c in report.components)
    assert any("UNDEFINED SHARES" in w for w in report.warnings)
    assert report.behaviour.refuses is False  # it never refuses either
    assert not report.refusal_direction.computed and report.refusal_direction.vector is None
    assert report.refusal_direction.reason.startswith("not computed: its effects are shares of the gap, and shares "
                                                      "are undefined")
    assert "NO CIRCUIT REPORTED" in render_markdown(report)


def test_reversed_model_is_reported_reversed_without_shares(tmp_path):
    """Swapping the sides makes harmful prompts score lower: every pair stays in (no selection on the score) and
    the report says *reversed*, with no shares."""
    data = tmp_path / "swapped.jsonl"
    rows = [json.loads(line) for line in open(shipped_dataset())]
    rows = [r for r in rows if r.get("split") == "eval"][:8]
    data.write_text("".join(json.dumps({**r, "harmful": r["benign"], "benign": r["harmful"]}) + "\n" for r in rows))
    # calibrate on the shipped file: its eval pairs share prompts with the scored ones and are left out
    config = AuditConfig(dataset=str(data), calibration=str(shipped_dataset()), n_boot=200, positions=["all"],
                         components=["mlp_out"], tricky="", force_shares=True)
    report = audit(config, progress=False)
    assert report.dataset.n_used == 8 and not report.dataset.exclusions
    assert report.gap.verdict == "reversed" and report.gap.ci_high < 0 and not report.gap.separated
    assert report.dataset.n_calibration == sum(1 for r in open(shipped_dataset())) - 8  # all but the scored 8
    assert report.shares_defined is False and all(c.share is None for c in report.components)
    assert any(w.startswith("REVERSED") for w in report.warnings)
    assert "REVERSED" in render_markdown(report)


def test_non_finite_scores_are_errors_naming_pair_and_component(monkeypatch):
    """A NaN anywhere is an error that names the pair (and component), never a silent number."""
    from refusal_eval.errors import MetricError
    from refusal_eval.patching.exact import PatchEngine

    original = PatchEngine.patch

    def poisoned(self, batch, components, direction="denoise"):
        values = original(self, batch, components, direction)
        values[1, 2] = float("nan")
        return values

    monkeypatch.setattr(PatchEngine, "patch", poisoned)
    config = AuditConfig(max_pairs=4, n_boot=200, components=["mlp_out"], positions=["all"], tricky="")
    with pytest.raises(MetricError, match=r"pair \S+, component blocks\.1\.hook_mlp_out"):
        audit(config, progress=False)
    monkeypatch.setattr(PatchEngine, "patch", original)
    original_scores = PatchEngine.scores

    def nan_scores(self, ids, mask, transforms=None):
        values = original_scores(self, ids, mask, transforms).clone()
        values[0] = float("inf")
        return values

    monkeypatch.setattr(PatchEngine, "scores", nan_scores)
    with pytest.raises(MetricError, match="refusal score is not finite"):
        audit(config, progress=False)


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_batch_rows_must_be_auto_or_positive(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--batch-rows", value])
    assert exc.value.code == 2
    assert "neither 'auto' nor a positive number of rows" in capsys.readouterr().err


def test_batch_rows_auto_is_resolved_in_the_report(small_run):
    report = load_report(small_run / "report.json")
    assert report.config["batch_rows"] == "auto"
    assert report.engine is not None and 1 <= report.engine.batch_rows <= 256
    assert report.engine.layer_skip and report.engine.prefix_reuse
    assert report.engine.patched_forwards > 0 and report.engine.forward_equivalents > 0


def test_calibration_sharing_every_prompt_with_the_scored_pairs_exits_2(tmp_path, capsys):
    """Token sets chosen on the scored prompts are circular: refused before any model work."""
    args = ["run", "--split", "all", "--calibration", str(shipped_dataset()), "--out", str(tmp_path), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "calibration" in err and "disjoint" in err
    assert not (tmp_path / "tiny-refuser").exists()


def test_pair_file_without_split_is_scored_whole(tmp_path):
    """A file that marks no split is used whole under the default --split eval, with a note; the token sets
    then come from the canonical openings (no disjoint calibration pairs exist)."""
    rows = [json.loads(line) for line in open(shipped_dataset())][:6]
    data = tmp_path / "nosplit.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n" for r in rows))
    report = audit(AuditConfig(dataset=str(data), n_boot=200, n_permutations=200, components=["mlp_out"],
                               positions=["all"]), progress=False)
    assert report.dataset.n_pairs == 6 and report.dataset.split == "eval"
    assert any("no split field: all 6 pairs are scored" in w for w in report.warnings)
    assert report.metric.token_set_source == "canonical" and report.dataset.n_calibration == 0


@pytest.mark.parametrize("preset, folder, n_pairs", [("jbb", "jbb", None), ("xstest", "xstest", None),
                                                     ("advbench", "advbench/harmful_behaviors.csv", 5)])
def test_audit_of_a_public_preset(preset, folder, n_pairs, tmp_path):
    """Each preset end to end on its fixture: scored whole (no split), canonical token sets, notes in the report."""
    from pathlib import Path

    from refusal_eval.data import load_pair_source

    data = Path(__file__).parent / "fixtures" / folder
    expected = load_pair_source(str(data), preset, seed=0)
    out = tmp_path / "out"
    args = ["run", "--dataset", str(data), "--preset", preset, "--positions", "last", "--components", "mlp_out",
            "--n-boot", "200", "--n-permutations", "200", "--out", str(out), "--quiet"]
    assert main(args) == 0
    report = load_report(out / "tiny-refuser" / "report.json")
    assert report.dataset.n_pairs == len(expected.pairs) == (n_pairs or len(expected.pairs))
    assert report.dataset.sha256 == expected.fingerprint and report.config["preset"] == preset
    assert report.dataset.alignment == "right" and report.dataset.n_used == report.dataset.n_pairs
    assert report.metric.token_set_source == "canonical"
    assert any("no split field" in w for w in report.warnings)
    assert all(note in report.warnings for note in expected.notes)


def test_canonical_token_sets_and_no_noise_floor_on_request():
    report = audit(AuditConfig(token_sets="canonical", noise_floor=False, max_pairs=6, n_boot=200,
                               n_permutations=200, components=["mlp_out"], positions=["all"], tricky=""),
                   progress=False)
    assert report.metric.token_set_source == "canonical" and "--token-sets canonical" in report.metric.derivation
    assert report.dataset.n_calibration == 0 and report.dataset.calibration_path is None
    assert report.controls.noise_floor is None
    assert all(c.noise_floor is None for c in report.components)
    # without a floor the resolution assumes float32 rounding (1e-6 of the mean gap); negligible is still decided
    assert report.stats.resolution_effect == pytest.approx(1e-3 * np.abs(
        [p.m_harmful - p.m_benign for p in report.pairs if p.used]).mean(), rel=1e-3)
    assert all(isinstance(c.within_noise, bool) for c in report.components)


def test_light_commands_and_the_plugin_never_load_torch():
    """--help, schema, validate, gate and the pytest plugin import neither torch nor transformers (issue 14)."""
    import subprocess
    import sys

    reports = Path(__file__).resolve().parent.parent / "examples" / "reports"
    report = reports / "tiny-refuser" / "report.json"
    comparison = reports / "comparison-tiny-refuser-vs-tiny-refuser-no-drugs" / "comparison.json"
    code = (
        "import sys, contextlib, io\n"
        "from refusal_eval.cli import main\n"
        "import refusal_eval.pytest_plugin\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    for argv in (['schema'], ['schema', '--kind', 'comparison'], ['validate', sys.argv[1]],\n"
        "                 ['validate', sys.argv[2]], ['validate', '--kind', 'comparison', sys.argv[2]]):\n"
        "        assert main(argv) == 0, argv\n"
        "    for argv in (['--help'], ['gate', '--help'], ['run', '--help']):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(report), str(comparison)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_audit_stays_the_function_whatever_was_imported_first():
    """``refusal_eval.audit`` names the function, also after the submodule of the same name was imported."""
    import subprocess
    import sys

    code = ("import refusal_eval.audit, refusal_eval.patching.exact\n"
            "from refusal_eval import audit, AuditConfig\n"
            "from refusal_eval.patching import PatchEngine\n"
            "assert callable(audit) and audit.__name__ == 'audit', audit\n"
            "assert isinstance(PatchEngine, type)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_library_deprecation_warnings_are_hidden_unless_debug():
    """transformers' FutureWarnings (e.g. `is_gradient_checkpointing is deprecated`) are not the user's to act on;
    --debug shows them, and this package's own warnings always pass."""
    from refusal_eval.cli import quiet_library_warnings

    def emitted(debug: bool) -> list[tuple[str, str]]:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_library_warnings(debug):
                for module in ("transformers.modeling_utils", "peft.tuners", "refusal_eval.audit"):
                    warnings.warn_explicit("deprecated", FutureWarning, "f.py", 1, module=module)
                warnings.warn_explicit("odd", UserWarning, "f.py", 2, module="transformers.generation")
        return [(str(w.message), w.filename) for w in caught]

    assert emitted(debug=False) == [("deprecated", "f.py"), ("odd", "f.py")]
    assert len(emitted(debug=True)) == 4


def test_device_auto_takes_what_the_machine_has(monkeypatch, capsys):
    from refusal_eval.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == "mps" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("auto (default: cuda if present, then mps, then cpu)", "embed,resid_pre", "what refusal needs",
                  "log-odds of the refusal tokens", "which pairs of the dataset are scored", "Audit a causal LM"):
        assert words in text
