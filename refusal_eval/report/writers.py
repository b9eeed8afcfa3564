"""Write an audit's JSON and Markdown reports to ``<out>/<model>/``."""

from __future__ import annotations

from pathlib import Path

from refusal_eval.report.markdown import render_markdown
from refusal_eval.report.schema import AuditReport


def write_reports(report: AuditReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.json and report.md under out_dir/<model name>/ and return their paths."""
    folder = Path(out_dir) / report.model.name
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "report.json", folder / "report.md"
    report.write_json(json_path)
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path
