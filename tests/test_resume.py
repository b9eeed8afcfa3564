"""Resume: an interrupted audit continues from OUT/<model>/partial.jsonl and ends with the report an uninterrupted
run writes (same numbers and verdicts); a changed model, dataset or option is named and refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from refusal_eval import AuditConfig, audit, load_report
from refusal_eval.errors import ConfigError
from refusal_eval.resume import PARTIAL_NAME

from .conftest import default_signals

OPTIONS = ["--max-pairs", "8", "--n-boot", "200", "--n-permutations", "200", "--components", "head",
           "--positions", "all,each", "--batch-rows", "2"]
CONFIG = dict(max_pairs=8, n_boot=200, n_permutations=200, components=["head"], positions=["all", "each"],
              batch_rows=2)
# what legitimately differs between two runs of the same audit
VOLATILE = {"created", "runtime_seconds", "engine", "environment", "command"}


def _numbers(report) -> dict:
    data = json.loads(report.model_dump_json())
    return {k: v for k, v in data.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def uninterrupted():
    return audit(AuditConfig(**CONFIG), progress=False)


def test_resume_reuses_every_chunk_and_changes_nothing(uninterrupted, tmp_path):
    partial = tmp_path / PARTIAL_NAME
    first = audit(AuditConfig(**CONFIG), progress=False, partial=partial)
    lines = partial.read_text().splitlines()
    assert json.loads(lines[0])["header"]["config"]["n_boot"] == 200 and len(lines) > 2
    again = audit(AuditConfig(**CONFIG), progress=False, partial=partial, resume=True)
    assert _numbers(first) == _numbers(uninterrupted) == _numbers(again)
    assert again.engine.patched_forwards == 0 < first.engine.patched_forwards  # nothing was patched again


def test_resume_names_what_differs(tmp_path):
    partial = tmp_path / PARTIAL_NAME
    audit(AuditConfig(**{**CONFIG, "max_pairs": 4}), progress=False, partial=partial)
    with pytest.raises(ConfigError, match=r"different option max_pairs \(4 then, 5 now\)"):
        audit(AuditConfig(**{**CONFIG, "max_pairs": 5}), progress=False, partial=partial, resume=True)
    with pytest.raises(ConfigError, match="no unfinished audit"):
        audit(AuditConfig(**CONFIG), progress=False, partial=tmp_path / "none" / PARTIAL_NAME, resume=True)


def _command(out) -> list[str]:
    return [sys.executable, "-m", "refusal_eval.cli", "run", "--out", str(out), "--quiet", *OPTIONS]


@pytest.fixture(scope="module")
def uninterrupted_cli(tmp_path_factory):
    """The same command run to the end in its own process (same thread count as the interrupted ones)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_command(out), check=True, capture_output=True, timeout=600)
    return load_report(out / "tiny-refuser" / "report.json")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_killed_run_resumes_to_the_uninterrupted_report(sig, code, uninterrupted_cli, tmp_path):
    """A real `refusal-eval run` subprocess, signalled once some chunks are on disk, then `--resume`d."""
    command = _command(tmp_path)
    partial = tmp_path / "tiny-refuser" / PARTIAL_NAME
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if partial.is_file() and len(partial.read_text().splitlines()) >= 3:  # header + two chunks
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and not (tmp_path / "tiny-refuser" / "report.json").exists()
    done = len(partial.read_text().splitlines()) - 1
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed: {done} finished chunk(s)" in resumed.stderr
    report = load_report(tmp_path / "tiny-refuser" / "report.json")
    assert _numbers(report) == _numbers(uninterrupted_cli)
    assert not partial.exists()


def test_resume_with_nothing_to_resume_exits_2(tmp_path, capsys):
    from refusal_eval.cli import main

    assert main(["run", "--out", str(tmp_path), "--resume", *OPTIONS, "--quiet"]) == 2
    assert "--resume: no unfinished audit" in capsys.readouterr().err
