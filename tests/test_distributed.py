"""A sharded audit (torchrun, 2 processes, gloo on CPU) writes the report a single process writes: byte for byte
(apart from when it ran and how long it took) at equal thread counts, and with the same verdicts and numbers within
1e-6 relative (1e-5 absolute near 0) against one process with another thread count."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

OPTIONS = ["--max-pairs", "8", "--components", "attn_out,mlp_out,head", "--positions", "all,last", "--n-boot", "200",
           "--n-permutations", "200", "--batch-rows", "32", "--control", "random", "--quiet", "--no-pictures"]
# what differs between any two runs of the same audit: when, how long, the memory peak, and the --out in the command
RUN_FACTS = ("created", "runtime_seconds", "command")


def _env(threads: int = 1, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), **extra)  # torchrun gives each process one thread
    return env


NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")


def _differences(a, b, where: str = "") -> list[str]:
    """Where two reports differ beyond float rounding: numbers by more than 1e-6 relative (1e-5 absolute, for values
    near 0 such as the noise floor), or anything else at all (counts, verdicts, ids, words with numbers masked)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} against {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        # A heterogeneity category's CI: BCa over 7 pairs, where resamples that tie with the estimate (about 12 of
        # 2000) fall either side of it by the summation order, and the bias correction moves the bound by up to a few
        # thousandths (the examples check's tolerance, scripts/examples.py CATEGORY_CI_ABS).
        tol = 0.01 if ".by_category." in where and where.endswith(("ci_low", "ci_high")) else 1e-5 + 1e-6 * abs(b)
        return [] if abs(a - b) <= tol else [f"{where}: {a} against {b}"]
    if isinstance(a, str) and isinstance(b, str):
        return [] if NUMBER.sub("#", a) == NUMBER.sub("#", b) else [f"{where}: {a!r} against {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{where}: {a!r} against {b!r}"]


def _normalised(path: Path) -> str:
    report = json.loads(path.read_text())
    for key in RUN_FACTS:
        report.pop(key)
    report["engine"].pop("peak_memory_bytes")
    return json.dumps(report, indent=1)


def test_the_tolerance_catches_what_matters():
    base = {"share": 0.5, "floor": 0.0, "significant": True, "n": 3, "words": "share 0.512 [0.4, 0.6]"}
    assert _differences(base, {**base, "share": 0.5 + 1e-7, "floor": 2.9e-6, "words": "share 0.513 [0.4, 0.6]"}) == []
    for change in ({"share": 0.5001}, {"significant": False}, {"n": 4}, {"words": "no share"}, {"floor": 1e-4}):
        assert _differences(base, {**base, **change})


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
    # one process with 2 threads sums in another order: the same verdicts, numbers within rounding
    threads = subprocess.run([*cli, "--out", str(tmp_path / "threads")], env=_env(threads=2), capture_output=True,
                             text=True)
    assert threads.returncode == 0, threads.stderr
    c = json.loads(_normalised(tmp_path / "threads" / "tiny-refuser" / "report.json"))
    assert c["environment"].pop("threads") == 2
    sharded = json.loads(_normalised(b))
    assert sharded["environment"].pop("threads") == 1
    assert _differences(c, sharded) == []


@pytest.mark.parametrize("option", ["--circuit", "--resume"])
def test_options_a_sharded_run_cannot_honour_exit_2_before_any_work(option, tmp_path):
    done = subprocess.run([sys.executable, "-m", "refusal_eval", "run", "--max-pairs", "4", option,
                           "--out", str(tmp_path)], env=_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{option} is not available under torchrun" in done.stderr and "Traceback" not in done.stderr
