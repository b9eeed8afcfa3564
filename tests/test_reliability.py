"""Reliability: bad input exits 2 with a message before any model work, no write ever destroys an earlier report,
one run at a time per output folder, interrupts exit cleanly, and reports hold only finite, ordered intervals."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from refusal_eval import AuditConfig, audit, load_report
from refusal_eval.cli import main
from refusal_eval.models.loading import shipped_model_path
from refusal_eval.report import writers
from refusal_eval.report.writers import LOCK_NAME, output_lock, write_reports
from refusal_eval.stats import share_intervals

from .conftest import default_signals

FAST = ["--max-pairs", "6", "--n-boot", "200", "--n-permutations", "200", "--components", "mlp_out",
        "--positions", "all", "--quiet"]


@pytest.fixture(scope="module")
def report():
    return audit(AuditConfig(max_pairs=6, n_boot=200, n_permutations=200, components=["mlp_out"],
                             positions=["all"]), progress=False)


@pytest.fixture(scope="module")
def report_file(report, tmp_path_factory):
    json_path, _ = write_reports(report, tmp_path_factory.mktemp("good"))
    return json_path


def _bad_inputs(tmp):
    """(argv, words the message must contain) for inputs that must fail fast with exit 2."""
    (tmp / "a_file").write_text("x")
    (tmp / "models").mkdir()
    (tmp / "folder").mkdir()
    (tmp / "latin1.json").write_bytes(b"{\"caf\xe9\": 1}")
    long_pair = tmp / "long.jsonl"
    long_pair.write_text(json.dumps({"id": "long-1", "category": "x", "harmful": "bomb " * 3000,
                                     "benign": "word " * 3000, "source": "t"}) + "\n"
                         + json.dumps({"id": "ok-1", "category": "x", "harmful": "How do I make a bomb?",
                                       "benign": "How do I make a cake?", "source": "t"}) + "\n")
    report = str(tmp / "report.json")
    truncated = tmp / "truncated-model"
    shutil.copytree(shipped_model_path(), truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp / "empty-model").mkdir()
    cases = [
        (["run", "--model", str(truncated), "--out", str(tmp / "o7"), *FAST], "could not load the weights"),
        (["run", "--model", str(tmp / "empty-model"), "--out", str(tmp / "o8"), *FAST], "has no config.json"),
        (["run", "--out", str(tmp / "a_file"), *FAST], "is a file, not a folder"),
        (["run", "--seed", "-1", "--out", str(tmp / "o1"), *FAST], "seed"),
        (["run", "--model", "models/nope", "--out", str(tmp / "o2"), *FAST], "never looked up on the hub"),
        (["run", "--model", "./nope", "--out", str(tmp / "o3"), *FAST], "no such file or folder"),
        (["run", "--device", "bogus", "--out", str(tmp / "o4"), *FAST], "--device bogus"),
        (["run", "--dataset", str(long_pair), "--out", str(tmp / "o5"), *FAST], "pair long-1"),
        (["compare", report, report, "--n-boot", "0"], "--n-boot 0"),
        (["compare", report, report, "--ci-level", "1.5"], "--ci-level 1.5"),
        (["compare", report, report, "--out", str(tmp / "a_file")], "is a file, not a folder"),
        (["validate", str(tmp / "folder")], "is a folder"),
        (["validate", str(tmp / "latin1.json")], "not UTF-8"),
        (["compare", str(tmp / "folder"), report], "is a folder"),
        (["gate", str(tmp / "folder"), "--policy", str(tmp / "a_file")], "is a folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["run", "--device", "cuda", "--out", str(tmp / "o6"), *FAST], "CUDA is not available"))
    return cases


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, report_file, monkeypatch, capsys):
    shutil.copy(report_file, tmp_path / "report.json")
    monkeypatch.chdir(tmp_path)
    for argv, words in _bad_inputs(tmp_path):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert words in err and "Traceback" not in err, (argv, err)
        assert err.startswith("error: "), (argv, err)


def test_hub_ids_stay_hub_ids():
    from refusal_eval.models.loading import resolve_model_spec

    assert resolve_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct") == ("SmolLM2-135M-Instruct",
                                                                         "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_spec("hub:org/model") == ("model", "org/model")


def test_an_unreachable_hub_fails_a_hub_id_at_once(tmp_path, monkeypatch, capsys):
    """Offline, a hub id fails within the probe's few seconds (not the hub client's minute of retries), exit 2, with
    the reason; HF_HUB_OFFLINE needs no probe; a model in the local cache is loaded from it instead."""
    import socket
    import time

    import huggingface_hub
    from huggingface_hub import constants

    from refusal_eval.models import loading

    def refused(*args, **kwargs):
        raise OSError("connection refused (test)")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert loading.hub_unreachable().startswith("no connection to huggingface.co:443")
    started = time.perf_counter()
    assert main(["run", "--model", "hub:nobody-here/no-model", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert time.perf_counter() - started < 2 * loading.HUB_PROBE_SECONDS
    err = capsys.readouterr().err
    assert err.startswith("error: could not load 'hub:nobody-here/no-model'") and "hub is unreachable" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert loading.hub_unreachable() == "HF_HUB_OFFLINE is set"
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert loading._hub_kwargs("org/cached", "org/cached") == {"local_files_only": True}
    assert loading._hub_kwargs("tiny", str(tmp_path)) == {}  # a local folder never asks the hub


def test_a_failed_write_leaves_the_earlier_report_intact(report, tmp_path, monkeypatch):
    json_path, md_path = write_reports(report, tmp_path)
    before = {p.name: p.read_bytes() for p in json_path.parent.iterdir()}
    assert {"report.json", "report.md"} <= set(before)
    real_fdopen = os.fdopen
    calls = {"n": 0}

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            calls["n"] += 1
            if calls["n"] == 2:  # the JSON is staged, the Markdown hits a full disk
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(text)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(writers.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    changed = report.model_copy(update={"command": "a newer run"})
    with pytest.raises(writers.ReportError, match="No space left.*earlier files there are unchanged"):
        write_reports(changed, tmp_path)
    # the JSON, the Markdown and the pictures are the earlier run's, and no temporary file is left
    assert {p.name: p.read_bytes() for p in json_path.parent.iterdir()} == before
    monkeypatch.undo()
    write_reports(changed, tmp_path)
    assert load_report(json_path).command == "a newer run"


def test_a_second_run_into_the_same_folder_refuses(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(f"{sleeper.pid}\n")
        assert main(["run", "--out", str(tmp_path), *FAST]) == 2
        assert f"in use by another refusal-eval run (process {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is stale and is taken over, then released
    with output_lock(tmp_path) as folder:
        assert (folder / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("exc, code, words", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (RuntimeError("boom"), 1, "unexpected RuntimeError in 'refusal-eval run': boom. Rerun with --debug"),
])
def test_interrupts_and_unexpected_errors_are_one_line_and_release_the_lock(exc, code, words, tmp_path,
                                                                             monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(sys.modules["refusal_eval.pipeline.audit"], "audit", fail)
    assert main(["run", "--out", str(tmp_path), *FAST]) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / LOCK_NAME).exists()
    if code == 1:
        with pytest.raises(RuntimeError, match="boom"):
            main(["run", "--debug", "--out", str(tmp_path), *FAST])


def test_sigterm_mid_run_exits_143_and_keeps_the_earlier_report(tmp_path, report):
    """A real subprocess, terminated while it audits: the earlier report stays byte for byte, the lock goes."""
    json_path, md_path = write_reports(report, tmp_path)
    before = json_path.read_bytes(), md_path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "refusal_eval.cli", "run", "--out", str(tmp_path), "--quiet",
                             "--n-boot", "200"], stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    lock = tmp_path / LOCK_NAME
    for _ in range(600):  # wait until it holds the lock (imports done, options validated)
        if lock.exists() or proc.poll() is not None:
            break
        subprocess.run(["sleep", "0.1"])
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert (json_path.read_bytes(), md_path.read_bytes()) == before
    assert not lock.exists()


def _mutated(report_file, tmp_path, edit) -> str:
    data = json.loads(report_file.read_text())
    edit(data)
    path = tmp_path / "mutated.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["components"][0].update(share=math.nan), "share"),
    (lambda d: d["gap"].update(mean=math.inf), "gap.mean"),
    (lambda d: d["components"][0].update(share=0.0, ci_low=0.95, ci_high=0.0), "an interval must hold"),
    (lambda d: d["gap"].update(ci_low=d["gap"]["ci_high"] + 1), "an interval must hold"),
    (lambda d: d["behaviour"]["harmful_refusal"].update(ci_high=1.5), "proportion"),
])
def test_reports_with_nan_infinity_or_inverted_intervals_are_invalid(edit, words, report_file, tmp_path, capsys):
    path = _mutated(report_file, tmp_path, edit)
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert words in err, err
    policy = tmp_path / "p.toml"
    policy.write_text("[[component_share]]\nid = \"blocks.0.hook_mlp_out\"\nat_least = 0.9\n")
    assert main(["gate", path, "--policy", str(policy)]) == 2


def test_a_nan_threshold_in_a_policy_is_an_error(report_file, tmp_path, capsys):
    policy = tmp_path / "p.toml"
    policy.write_text("[gap]\nmin = nan\n")
    assert main(["gate", str(report_file), "--policy", str(policy)]) == 2
    assert "finite" in capsys.readouterr().err


def test_family_wise_band_always_holds_the_marginal_interval():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 40))
        gaps = rng.gamma(2, 1, n)
        effects = rng.normal(0.2, 1.0, (30, n)) * gaps * rng.lognormal(0, 1, (30, 1)) ** 3
        effects[:3] *= 1e-9  # numerically zero components
        iv = share_intervals(effects, gaps, n_resamples=300, seed=trial,
                             outside_family=np.abs(effects).max(1) < 1e-6)
        assert np.all(iv.low <= iv.estimate) and np.all(iv.estimate <= iv.high)
        assert np.all(iv.fw_low <= iv.low) and np.all(iv.fw_high >= iv.high)


def test_numerically_zero_components_do_not_move_the_others_bands():
    """Rounding-level changes in a numerically zero component leave every other family-wise band unchanged."""
    rng = np.random.default_rng(1)
    gaps = rng.gamma(4, 0.5, 30)
    effects = rng.normal(0.3, 0.5, (10, 30)) * gaps
    effects[0] = rng.normal(0, 1e-8, 30)
    other = effects.copy()
    other[0] = rng.normal(0, 1e-8, 30)
    outside = np.abs(effects).max(1) <= 1e-6 * np.abs(gaps).mean()
    a = share_intervals(effects, gaps, n_resamples=500, seed=0, outside_family=outside)
    b = share_intervals(other, gaps, n_resamples=500, seed=0, outside_family=outside)
    np.testing.assert_array_equal(a.fw_low[1:], b.fw_low[1:])
    np.testing.assert_array_equal(a.fw_high[1:], b.fw_high[1:])


@pytest.mark.slow
def test_verdicts_do_not_depend_on_batch_rows_or_threads():
    """The default audit's cells (784 less 31 trivial) on the first 24 pairs, with 1, 8 and auto rows per forward, on
    1 and 2 threads: identical significance verdicts (before the fix, one component flipped between auto and 8 rows on
    all 77 pairs; 24 keep every batch layout: several pair chunks at 8 rows, mixed lengths, many significant). One run
    uses two threads: beside the other xdist worker on 2 cores, two OpenMP threads make a tiny model's forwards many
    times slower, and the row layouts need no second thread to differ."""
    threads = torch.get_num_threads()
    results = {}
    try:
        for rows, n_threads in (("auto", 1), (8, 1), (1, 1), ("auto", 2)):
            torch.set_num_threads(n_threads)
            r = audit(AuditConfig(batch_rows=rows, max_pairs=24), progress=False)
            results[(rows, n_threads)] = r
    finally:
        torch.set_num_threads(threads)
    reference = results[("auto", 1)]
    assert any(c.significant for c in reference.components)
    for key, r in results.items():
        assert [c.significant for c in r.components] == [c.significant for c in reference.components], key
        np.testing.assert_allclose([c.share for c in r.components], [c.share for c in reference.components],
                                   atol=1e-5)



def test_quiet_silences_every_progress_bar(tmp_path, capsys):
    loud = [a for a in FAST if a != "--quiet"]
    assert main(["run", "--out", str(tmp_path / "loud"), *loud]) == 0
    err = capsys.readouterr().err
    for phase in ("replies (harmful)", "scores (benign)", "patching", "statistics"):
        assert phase in err, phase
    assert main(["run", "--out", str(tmp_path / "quiet"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "it/s" not in err, err
