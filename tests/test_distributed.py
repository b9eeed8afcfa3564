"""A sharded audit (torchrun, 2 processes, gloo on CPU) writes the report a single process writes, byte for byte
apart from when it ran and how long it took."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

OPTIONS = ["--max-pairs", "8", "--components", "attn_out,mlp_out,head", "--positions", "all,last", "--n-boot", "200",
           "--n-permutations", "200", "--batch-rows", "32", "--control", "random", "--quiet", "--no-pictures"]
# what differs between any two runs of the same audit: when, how long, the memory peak, and the --out in the command
RUN_FACTS = ("created", "runtime_seconds", "command")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **extra)  # torchrun gives each process one thread; so does the reference run
    return env


def _normalised(path: Path) -> str:
    report = json.loads(path.read_text())
    for key in RUN_FACTS:
        report.pop(key)
    report["engine"].pop("peak_memory_bytes")
    return json.dumps(report, indent=1)


@pytest.mark.slow
def test_two_gloo_processes_write_the_single_process_report(tmp_path):
    cli = [sys.executable, "-m", "refusal_eval", "run", *OPTIONS]
    one = subprocess.run([*cli, "--out", str(tmp_path / "one")], env=_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "-m", "refusal_eval", "run", *OPTIONS, "--out", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "sharded over 2 processes" in two.stderr
    # process 0 alone prints the summary, once
    assert two.stdout.count("refusal localised") == one.stdout.count("refusal localised") == 1
    a, b = (tmp_path / d / "tiny-refuser" / "report.json" for d in ("one", "two"))
    assert _normalised(a) == _normalised(b)  # every number and verdict, to the last bit
    report = json.loads(b.read_text())
    assert report["controls"]["random"] is not None and report["engine"]["patched_forwards"] > 2


@pytest.mark.parametrize("option", ["--circuit", "--resume"])
def test_options_a_sharded_run_cannot_honour_exit_2_before_any_work(option, tmp_path):
    done = subprocess.run([sys.executable, "-m", "refusal_eval", "run", "--max-pairs", "4", option,
                           "--out", str(tmp_path)], env=_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{option} is not available under torchrun" in done.stderr and "Traceback" not in done.stderr
