"""Safe output: every file lands whole or not at all, and one run at a time writes into an output folder.

* :func:`write_files` writes each text to a temporary file in the target's own folder, flushes it to disk, and
  only when *every* temporary file is complete moves them into place with ``os.replace`` (atomic on POSIX). A
  failure before that (disk full, no permission) removes the temporary files and leaves the earlier files as
  they were, so a report's JSON and Markdown never come from two different runs.
* :func:`output_lock` holds ``<out>/.refusal-eval.lock`` (created with ``O_EXCL``) for a whole command; a second
  run into the same folder stops with a message naming the lock and the process that holds it. A lock left by a
  process that no longer exists is taken over.
* :func:`check_writable` is called before any model work, so a bad ``--out`` fails in a second, not after the
  audit.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from refusal_eval.errors import ConfigError, ReportError
from refusal_eval.report.markdown import render_markdown
from refusal_eval.report.plots import PICTURE_NAMES, comparison_picture, render_pictures, report_pictures
from refusal_eval.report.schema import SCHEMA_VERSION, AuditReport, validate_json

LOCK_NAME = ".refusal-eval.lock"


def check_writable(out_dir: str | Path, option: str = "--out") -> Path:
    """Create ``out_dir`` if needed and prove a file can be written there; ConfigError otherwise."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder}: is a file, not a folder; give a folder for the reports")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {folder}: cannot write there ({exc.strerror or exc}); give a writable "
                          "folder") from exc
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(out_dir: str | Path) -> Iterator[Path]:
    """Hold the output folder's lock file for the duration of a command (see the module docstring)."""
    folder = check_writable(out_dir)
    lock = folder / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                holder = -1
            if holder > 0 and _pid_alive(holder) and holder != os.getpid():
                raise ConfigError(f"{folder} is in use by another refusal-eval run (process {holder}, lock "
                                  f"{lock}); wait for it, or give a different --out") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise ConfigError(f"cannot take the lock {lock}; remove it if no refusal-eval run is writing there")
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield folder
    finally:
        lock.unlink(missing_ok=True)


def write_files(texts: dict[Path, str | bytes]) -> None:
    """Write every (path, text or bytes) or none: temporary files first, then ``os.replace`` once all are
    complete."""
    staged: list[tuple[str, Path]] = []
    path = None
    try:
        for path, text in texts.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            binary = isinstance(text, bytes)
            with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException as exc:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ReportError(f"cannot write {path} ({exc.strerror or exc}); nothing was written and any "
                              "earlier files there are unchanged") from exc
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def write_json(report: AuditReport, path: str | Path) -> None:
    """Write a report's JSON atomically (whole or not at all)."""
    write_files({Path(path): report.model_dump_json(indent=1) + "\n"})


def write_with_pictures(texts: dict[Path, str], pictures: dict[str, bytes]) -> None:
    """Write the texts and the pictures (PNG bytes by name, beside the first text) together, then remove the
    pictures of an earlier run that this one did not draw, so the folder never shows stale pictures."""
    folder = next(iter(texts)).parent
    write_files({**texts, **{folder / name: data for name, data in pictures.items()}})
    for name in PICTURE_NAMES:
        if name not in pictures:
            (folder / name).unlink(missing_ok=True)


def write_reports(report: AuditReport, out_dir: str | Path, pictures: bool = True) -> tuple[Path, Path]:
    """Write report.json, report.md and (``pictures``) the PNGs under out_dir/<model name>/ together, and return
    the paths of the JSON and the Markdown."""
    folder = Path(out_dir) / report.model.name
    json_path, md_path = folder / "report.json", folder / "report.md"
    drawn = report_pictures(report) if pictures else {}
    write_with_pictures({json_path: report.model_dump_json(indent=1) + "\n",
                         md_path: render_markdown(report, pictures=drawn)}, drawn)
    return json_path, md_path


def write_schema_files(folder: str | Path) -> list[Path]:
    """Write both report kinds' JSON Schemas into ``folder`` (created if missing) under their shipped names; returns
    the paths."""
    from refusal_eval.report.kinds import KINDS, SCHEMA_FILES, schema_text

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"{folder}: is a file; --out takes a folder")
    texts = {folder / SCHEMA_FILES[k]: schema_text(k) for k in KINDS}
    write_files(texts)
    return list(texts)


def plot_report(raw: dict, path: str | Path, folder: str | Path) -> list[Path]:
    """Redraw the pictures of a report or comparison JSON (already read as ``raw``) into ``folder``, with its
    Markdown page rewritten beside them; returns the paths written (the Markdown last)."""
    folder = Path(folder)
    from refusal_eval.report.kinds import detect_kind

    if detect_kind(raw) == "comparison":
        from refusal_eval.report.comparison_markdown import render_comparison_markdown
        from refusal_eval.report.comparison_schema import ComparisonReport

        comparison = validate_json(raw, ComparisonReport, path, "the comparison report schema")
        drawn = render_pictures(comparison_picture(comparison))
        md_path, markdown = folder / "comparison.md", render_comparison_markdown(comparison, pictures=drawn)
    else:
        report = validate_json(raw, AuditReport, path, f"audit report schema {SCHEMA_VERSION}")
        drawn = report_pictures(report)
        md_path, markdown = folder / "report.md", render_markdown(report, pictures=drawn)
    write_with_pictures({md_path: markdown}, drawn)
    return [folder / name for name in drawn] + [md_path]
