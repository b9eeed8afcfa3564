"""Audit report: pydantic schema, JSON Schema export and Markdown rendering."""

from refusal_eval.report.kinds import load_report
from refusal_eval.report.schema import SCHEMA_VERSION, AuditReport, report_json_schema

__all__ = ["SCHEMA_VERSION", "AuditReport", "load_report", "report_json_schema"]
