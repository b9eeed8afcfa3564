"""The two kinds of report JSON: an audit (``report.json``) and a comparison (``comparison.json``).

What ``refusal-eval validate`` and ``refusal-eval schema`` share: telling the kinds apart, loading either,
their JSON Schemas and the schema files shipped in the package (``refusal_eval/schemas/``).

How a file's kind is told: from its top-level keys. Each kind has keys the other lacks (an audit ``model``,
``dataset``, ``metric``, ``pairs``, ``positions``, ``environment``, …; a comparison ``a``, ``b``, ``paired``,
``ranking``, ``compared_pair_ids``, …). A file is of the kind whose own required keys it holds at least half of,
and more of them than of the other kind's; otherwise it is neither (a hand-made file, a circuit.json), and
``validate --kind`` checks it against one schema anyway. The files carry no ``kind`` field: reports written
before this module existed are told apart the same way.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from refusal_eval.errors import ReportError
from refusal_eval.report.comparison_schema import (
    COMPARISON_SCHEMA_VERSION,
    ComparisonReport,
    comparison_json_schema,
)
from refusal_eval.report.schema import SCHEMA_VERSION, AuditReport, read_json, report_json_schema, validate_json

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

Kind = Literal["audit", "comparison"]
KINDS: tuple[Kind, ...] = ("audit", "comparison")
MODELS: dict[str, type[BaseModel]] = {"audit": AuditReport, "comparison": ComparisonReport}
VERSIONS = {"audit": SCHEMA_VERSION, "comparison": COMPARISON_SCHEMA_VERSION}
SCHEMA_FILES = {"audit": "audit-report.schema.json", "comparison": "comparison-report.schema.json"}
REGENERATE = "refusal-eval schema --out refusal_eval/schemas"
_SHOWN = 4  # missing keys named per kind in the "neither" error


def _own_keys(kind: str) -> list[str]:
    """The required top-level keys of ``kind`` that the other kind does not have, in schema order."""
    other = MODELS["comparison" if kind == "audit" else "audit"].model_fields
    return [name for name, f in MODELS[kind].model_fields.items() if f.is_required() and name not in other]


def detect_kind(raw: dict) -> Kind | None:
    """``"audit"`` or ``"comparison"`` from a report's top-level keys (see the module docstring), else None."""
    found = {k: sum(key in raw for key in _own_keys(k)) / len(_own_keys(k)) for k in KINDS}
    audit, comparison = found["audit"], found["comparison"]
    if audit >= 0.5 and audit > comparison:
        return "audit"
    if comparison >= 0.5 and comparison > audit:
        return "comparison"
    return None


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (", …" if len(keys) > _SHOWN else "")


def _a(kind: str) -> str:
    return f"{'an' if kind == 'audit' else 'a'} {kind}"


def _neither(raw: dict, path: str | Path) -> ReportError:
    parts = []
    for k in KINDS:
        own = _own_keys(k)
        missing = [key for key in own if key not in raw]
        parts.append(f"it lacks {_some(missing)} ({len(missing)} of the {len(own)} keys only {_a(k)} report has)")
    hint = ""
    if "circuits" in raw and "nodes" in raw:
        hint = " It looks like a circuit result (circuit.json), which validate does not check."
    return ReportError(f"{path}: neither an audit nor a comparison report: as an audit {parts[0]}; as a "
                       f"comparison {parts[1]}.{hint} Pass --kind audit or --kind comparison to check it against "
                       "that schema anyway")


def load_report(path: str | Path) -> AuditReport:
    """Read and validate a report JSON; ReportError names the file and the failing fields."""
    raw = read_json(path)
    if detect_kind(raw) == "comparison":
        raise ReportError(f"{path}: is a comparison report (what `refusal-eval compare` writes), not an audit "
                          "report; give a report.json")
    return validate_json(raw, AuditReport, path, f"audit report schema {SCHEMA_VERSION}")


def load_any(path: str | Path, kind: Kind | None = None) -> tuple[Kind, BaseModel]:
    """Read a report JSON, tell its kind (or check it is ``kind``) and validate it against that kind's schema.

    ReportError names the file and: what it looks like when it is neither kind or not the ``kind`` asked for;
    otherwise the fields failing the schema of its kind (only that kind's).
    """
    raw = read_json(path)
    seen = detect_kind(raw)
    if kind is None:
        if seen is None:
            raise _neither(raw, path)
        kind = seen
    elif seen is not None and seen != kind:
        keys = _some([key for key in _own_keys(seen) if key in raw])
        raise ReportError(f"{path}: --kind {kind}, but it looks like {_a(seen)} report (it has {keys}); drop "
                          f"--kind or pass --kind {seen}")
    report = validate_json(raw, MODELS[kind], path, f"{kind} report schema {VERSIONS[kind]}")
    return kind, report


def json_schema(kind: Kind = "audit") -> dict:
    """The JSON Schema (draft 2020-12) of a report kind, with its stable ``$id``."""
    return report_json_schema() if kind == "audit" else comparison_json_schema()


def schema_text(kind: Kind = "audit") -> str:
    """The schema as written to its shipped file (and printed by ``refusal-eval schema``)."""
    import json

    return json.dumps(json_schema(kind), indent=2) + "\n"


def shipped_schema(kind: Kind) -> Traversable:
    """The schema file shipped in the package (``refusal_eval/schemas/<kind>-report.schema.json``)."""
    return files("refusal_eval").joinpath("schemas", SCHEMA_FILES[kind])
