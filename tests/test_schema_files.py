"""Both report kinds are first-class (issue 14, item 5): `validate` tells audit from comparison reports, `schema`
prints either, and both JSON Schemas ship in the package with stable ids. Light: no model is loaded."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest

from refusal_eval.cli import main
from refusal_eval.compare import ComparisonReport as ReExported
from refusal_eval.errors import ReportError
from refusal_eval.report.comparison_schema import COMPARISON_SCHEMA_VERSION, ComparisonReport
from refusal_eval.report.kinds import (
    REGENERATE,
    SCHEMA_FILES,
    VERSIONS,
    detect_kind,
    json_schema,
    load_report,
    schema_text,
    shipped_schema,
)

ROOT = Path(__file__).resolve().parent.parent
AUDITS = sorted((ROOT / "examples" / "reports").glob("*/report.json"))
COMPARISONS = sorted((ROOT / "examples" / "reports").glob("comparison-*/comparison.json"))
TINY_COMPARISON = ROOT / "examples" / "reports" / "comparison-tiny-refuser-vs-tiny-refuser-no-drugs" / "comparison.json"
IDS = {"audit": "urn:refusal-eval:schema:audit-report:1", "comparison": "urn:refusal-eval:schema:comparison-report:1"}


def test_the_committed_examples_exist():
    assert AUDITS and COMPARISONS and TINY_COMPARISON in COMPARISONS


@pytest.mark.parametrize("path", AUDITS + COMPARISONS, ids=lambda p: p.parent.name)
def test_validate_tells_the_kind_of_each_committed_report(path, capsys):
    kind = "comparison" if path.name == "comparison.json" else "audit"
    assert detect_kind(json.loads(path.read_text())) == kind
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: valid {kind} report (schema ")
    assert main(["validate", "--kind", kind, str(path)]) == 0


def test_validate_prints_what_a_comparison_compares(capsys):
    raw = json.loads(TINY_COMPARISON.read_text())
    assert main(["validate", str(TINY_COMPARISON)]) == 0
    assert capsys.readouterr().out == (
        f"{TINY_COMPARISON}: valid comparison report (schema {COMPARISON_SCHEMA_VERSION}, tiny-refuser -> "
        f"tiny-refuser-no-drugs, {len(raw['components'])} components compared, {len(raw['ranking'])} significant "
        "changes)\n")


def test_a_file_of_neither_kind_gets_one_error_naming_missing_keys(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema_version": "1.0", "name": "x", "components": []}))
    assert main(["validate", str(other)]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(f"error: {other}: neither an audit nor a comparison report")
    assert "lacks config, model, dataset, metric" in err and "lacks a, b, same_dataset, paired" in err
    assert "--kind" in err


def test_a_circuit_result_is_named_as_such(capsys):
    assert main(["validate", str(ROOT / "examples" / "reports" / "tiny-refuser" / "circuit.json")]) == 2
    err = capsys.readouterr().err
    assert "neither an audit nor a comparison report" in err and "circuit result" in err


@pytest.mark.parametrize(("path", "wrong", "seen"), [(TINY_COMPARISON, "audit", "comparison"),
                                                     (AUDITS[0], "comparison", "audit")])
def test_a_kind_that_does_not_match_the_file_says_what_it_looks_like(path, wrong, seen, capsys):
    assert main(["validate", "--kind", wrong, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: --kind {wrong}, but it looks like a")
    assert f"{seen} report" in err and f"--kind {seen}" in err and err.count("\n") == 1


def test_a_broken_comparison_lists_only_the_comparison_fields(tmp_path, capsys):
    raw = json.loads(TINY_COMPARISON.read_text())
    del raw["ranking"]
    raw["a"]["name"] = 3
    raw["paired"] = "maybe"
    bad = tmp_path / "comparison.json"
    bad.write_text(json.dumps(raw))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: does not match comparison report schema {COMPARISON_SCHEMA_VERSION}:")
    problems = err.splitlines()[1:]
    assert sorted(p.split(":")[0].strip() for p in problems) == ["a.name", "paired", "ranking"]


def test_a_broken_audit_is_still_an_audit(tmp_path, capsys):
    raw = json.loads(AUDITS[0].read_text())
    del raw["gap"], raw["pairs"], raw["environment"]
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps(raw))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not match audit report schema" in err and "environment" in err and "ranking" not in err


def test_invalid_json_names_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "comparison.json"
    bad.write_text('{"a": 1,\n "b": }')
    assert main(["validate", str(bad)]) == 2
    assert capsys.readouterr().err == f"error: {bad}: not valid JSON (line 2, column 7: Expecting value)\n"


def test_load_report_of_a_comparison_says_so():
    with pytest.raises(ReportError, match="is a comparison report .* not an audit report"):
        load_report(TINY_COMPARISON)


def test_the_comparison_schema_lives_apart_and_compare_re_exports_it():
    assert ReExported is ComparisonReport


@pytest.mark.parametrize("kind", ["audit", "comparison"])
def test_schema_prints_a_draft_2020_12_schema_with_a_stable_id(kind, capsys):
    assert main(["schema", "--kind", kind]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$id"] == IDS[kind]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == f"refusal-eval {kind} report"
    assert schema["type"] == "object" and "schema_version" in schema["properties"]
    version = schema["properties"]["schema_version"]  # the exact versions the major version covers
    assert version["default"] == VERSIONS[kind] and VERSIONS[kind] in version.get("enum", [version.get("const")])
    assert all(v.startswith(IDS[kind][-1] + ".") for v in version.get("enum", [version.get("const")]))


def test_schema_defaults_to_the_audit_report(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["$id"] == IDS["audit"]


def test_schema_out_writes_both_files(tmp_path, capsys):
    assert main(["schema", "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 's' / name}" for name in SCHEMA_FILES.values()]
    for kind, name in SCHEMA_FILES.items():
        assert (tmp_path / "s" / name).read_text() == schema_text(kind)


@pytest.mark.parametrize("kind", ["audit", "comparison"])
def test_the_shipped_schema_files_are_current_and_found_as_package_resources(kind):
    shipped = shipped_schema(kind)
    assert shipped == files("refusal_eval") / "schemas" / SCHEMA_FILES[kind] and shipped.is_file()
    assert shipped.read_text(encoding="utf-8") == schema_text(kind), f"stale schema file: run `{REGENERATE}`"
    assert json.loads(shipped.read_text(encoding="utf-8"))["$id"] == IDS[kind]


@pytest.mark.parametrize("path", AUDITS + COMPARISONS, ids=lambda p: p.parent.name)
def test_the_committed_reports_match_the_shipped_json_schemas(path):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (not a dependency)")
    kind = "comparison" if path.name == "comparison.json" else "audit"
    schema = json.loads(shipped_schema(kind).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(json.loads(path.read_text()))


def test_json_schema_matches_the_pydantic_models():
    assert json_schema("comparison")["properties"].keys() == ComparisonReport.model_fields.keys()
