"""The audit report attached to an inspect_ai eval log by ``inspect eval refusal_eval/refusal_circuit``.

``refusal-eval gate`` accepts such a log (``.eval``, or a ``.json`` log written with ``--log-format json``) in place
of a report.json: :func:`is_inspect_log` tells the two apart from the file's first bytes, and
:func:`report_from_inspect_log` reads the ``audit`` sample's ``refusal_audit`` score metadata back into an
:class:`~refusal_eval.report.schema.AuditReport`. inspect_ai is imported only here, and only for an inspect log;
neither this module nor inspect_ai's log reader imports torch.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from refusal_eval.errors import ReportError
from refusal_eval.report.schema import SCHEMA_VERSION, AuditReport, validate_json

AUDIT_SAMPLE_ID = "audit"  # the refusal_circuit sample that runs the patching audit
AUDIT_SCORER = "refusal_audit"  # its scorer
REPORT_KEY = "audit_report"  # score metadata: the AuditReport as a JSON object
MARKDOWN_KEY = "audit_report_markdown"  # score metadata: the report's Markdown
HEADLINE_KEY = "headline"  # score metadata: the numbers of the log's refusal_audit metrics

_JSON_LOG = re.compile(rb'^\s*\{\s*"version"\s*:\s*\d+\s*,\s*"status"\s*:')


def is_inspect_log(path: str | Path) -> bool:
    """True for an inspect_ai eval log: a ``.eval`` (zip) file, or JSON that opens with inspect's
    ``{"version": N, "status": ...}`` (a report.json opens with ``schema_version``)."""
    path = Path(path)
    if path.suffix.lower() == ".eval" and path.is_file():
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(256)
    except OSError:
        return False  # load_report says what is wrong with the path
    if head.startswith(b"PK\x03\x04"):  # a zip: inspect's .eval holds _journal/start.json (and header.json)
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return False
        return "header.json" in names or any(n.startswith("_journal/") for n in names)
    return bool(_JSON_LOG.match(head))


def report_from_inspect_log(path: str | Path) -> AuditReport:
    """The AuditReport a ``refusal_circuit`` eval attached to its ``audit`` sample; ReportError (exit 2) for a log
    without one, naming the task and why (another task, or the audit failed)."""
    try:
        from inspect_ai.log import read_eval_log, read_eval_log_sample
    except ImportError as exc:
        raise ReportError(f"{path}: is an inspect_ai eval log; reading it needs inspect_ai "
                          "(pip install 'refusal-eval[inspect]')") from exc
    try:
        header = read_eval_log(str(path), header_only=True)
    except Exception as exc:  # inspect raises plain exceptions for unreadable logs
        raise ReportError(f"{path}: looks like an inspect_ai eval log but cannot be read ({exc})") from exc
    task, status = header.eval.task, header.status
    none_attached = (f"{path}: inspect_ai log of task {task} (status {status}) has no attached refusal_eval audit "
                     f"report; only `inspect eval refusal_eval/refusal_circuit` attaches one (its "
                     f"'{AUDIT_SAMPLE_ID}' sample)")
    try:
        sample = read_eval_log_sample(str(path), id=AUDIT_SAMPLE_ID,
                                      exclude_fields={"events", "attachments", "store", "messages"})
    except IndexError as exc:
        raise ReportError(none_attached) from exc
    except Exception as exc:
        raise ReportError(f"{path}: cannot read the '{AUDIT_SAMPLE_ID}' sample of this inspect_ai log ({exc})") from exc
    score = (sample.scores or {}).get(AUDIT_SCORER)
    raw = (score.metadata or {}).get(REPORT_KEY) if score is not None else None
    if raw is None:
        why = f": the audit failed ({sample.error.message})" if sample.error is not None else ""
        raise ReportError(none_attached + why)
    if not isinstance(raw, dict):
        raise ReportError(f"{path}: the attached audit report is a {type(raw).__name__}, not a report object")
    return validate_json(raw, AuditReport, f"{path} (sample '{AUDIT_SAMPLE_ID}')",
                         f"audit report schema {SCHEMA_VERSION}")
