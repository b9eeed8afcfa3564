"""Fuzzing (hypothesis): the pair loader, the report validator and the policy loader either accept their input or
raise the project's own error with a message; never another exception (which the CLI would show as a crash)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refusal_eval.data.formats import load_pair_source
from refusal_eval.data.pairs import load_pairs
from refusal_eval.errors import DataError, ReportError
from refusal_eval.gate import GateError, load_policy
from refusal_eval.report.kinds import load_report

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FIELDS = ["id", "category", "harmful", "benign", "source", "split", "extra"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
rows = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=7) | st.fixed_dictionaries(
    {"id": st.text(max_size=8), "category": st.text(max_size=8), "harmful": st.text(max_size=30),
     "benign": st.text(max_size=30), "source": st.text(max_size=5), "split": st.sampled_from(["train", "eval", "x"])})


def _load_or_own_error(data: bytes, suffix: str, load, error: type[Exception]) -> None:
    """Write ``data`` to a temporary file and load it: success, or ``error`` naming the file (nothing else)."""
    handle = tempfile.NamedTemporaryFile("wb", suffix=suffix, delete=False)
    handle.write(data)
    handle.close()
    path = Path(handle.name)
    try:
        load(path)
    except error as exc:
        assert str(path) in str(exc)
    finally:
        path.unlink()


@SETTINGS
@given(lines=st.lists(rows.map(json.dumps) | st.text(max_size=40), max_size=6))
def test_pair_loader_accepts_or_names_the_problem(lines):
    _load_or_own_error("\n".join(lines).encode(), ".jsonl", load_pairs, DataError)


@SETTINGS
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_any_bytes_in_a_pair_file_are_data_or_an_error(data, suffix):
    _load_or_own_error(data, suffix, lambda path: load_pair_source(str(path)), DataError)


@pytest.fixture(scope="module")
def report_json(tmp_path_factory):
    from refusal_eval import AuditConfig, audit

    report = audit(AuditConfig(max_pairs=4, n_boot=100, n_permutations=100, components=["mlp_out"],
                               positions=["all"]), progress=False)
    return json.loads(report.model_dump_json())


def _leaves(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and node:
        for i, value in enumerate(node[:3]):
            yield from _leaves(value, (*path, i))
    else:
        yield path


@SETTINGS
@given(data=st.data())
def test_report_validator_accepts_or_names_the_field(report_json, data):
    """A valid report with one leaf replaced by an arbitrary JSON value: valid, or a ReportError."""
    leaves = list(_leaves(report_json))
    target = data.draw(st.sampled_from(leaves))
    value = data.draw(json_values)
    mutated = json.loads(json.dumps(report_json))
    node = mutated
    for key in target[:-1]:
        node = node[key]
    if target:
        node[target[-1]] = value
    _load_or_own_error(json.dumps(mutated, allow_nan=True).encode(), ".json", load_report, ReportError)


toml_scalars = st.one_of(st.integers(-5, 5).map(str), st.floats(allow_nan=True, allow_infinity=True).map(
    lambda f: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(f), repr(f))), st.sampled_from(
    ['"ci"', '"estimate"', '"familywise"', "true", '"blocks.0.hook_mlp_out"', '"x"']))
toml_keys = st.sampled_from(["min_refusal_rate", "max_over_refusal", "on", "min", "separated", "at_least",
                             "at_most", "id", "kind", "layer", "top_k", "max_drop", "bogus"])
toml_sections = st.sampled_from(["[behaviour]", "[gap]", "[[component_share]]", "[[layer_share]]", "[baseline]",
                                 "[nonsense]", ""])


@SETTINGS
@given(blocks=st.lists(st.tuples(toml_sections, st.lists(st.tuples(toml_keys, toml_scalars), max_size=4)),
                       max_size=4), noise=st.text(max_size=20))
def test_policy_loader_accepts_or_names_the_rule(blocks, noise):
    text = "\n".join(f"{section}\n" + "\n".join(f"{k} = {v}" for k, v in pairs) for section, pairs in blocks)
    for candidate in (text, text + "\n" + noise):
        _load_or_own_error(candidate.encode(), ".toml", load_policy, GateError)
