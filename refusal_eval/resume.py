"""Resumable audits: the patching engine's finished work, appended beside the report as it is done.

``OUT/<model>/partial.jsonl`` starts with a header line (package version, model weight hash, dataset hash, the
audit's options) and gets one line per finished pair chunk of every patching pass (the effects of all of the pass's
components on those pairs, float32 values written exactly). ``refusal-eval run --resume`` reads it back after
checking the header against the new run, naming whatever differs; the engine then skips every chunk it finds, so the
final report has the same numbers as an uninterrupted run. The file is removed once the report is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from refusal_eval.errors import ConfigError

PARTIAL_NAME = "partial.jsonl"


def chunk_key(kind: str, direction: str, component_ids: Sequence[str], pair_ids: Sequence[str]) -> str:
    """Identity of one engine pass over one chunk of pairs: what is patched, how, and on which pairs."""
    digest = hashlib.sha256()
    for part in (kind, direction, "\0".join(component_ids), "\0".join(pair_ids)):
        digest.update(part.encode())
        digest.update(b"\1")
    return digest.hexdigest()[:32]


class ResultsLog:
    """The finished chunks of one audit (see the module docstring); ``get``/``put`` are the engine's hooks."""

    def __init__(self, path: str | Path, header: dict, resume: bool):
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))  # as it reads back from JSON
        self.found: dict[str, torch.Tensor] = {}
        self.reused = 0
        if resume:
            if not self.path.is_file():
                raise ConfigError(f"--resume: no unfinished audit at {self.path} (it is removed when a report is "
                                  "written); run without --resume")
            self._read()
            mode = "a"
        else:
            mode = "w"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, mode, encoding="utf-8")  # noqa: SIM115 (kept open for appends; close())
        if mode == "w":
            self._append({"header": self.header})

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            first = json.loads(lines[0])["header"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            first = None
        if first is None:
            raise ConfigError(f"--resume: {self.path} has no header line; run without --resume")
        differ = [key for key in sorted(set(first) | set(self.header)) if first.get(key) != self.header.get(key)]
        if "config" in differ:
            old, new = first.get("config") or {}, self.header.get("config") or {}
            options = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            differ.remove("config")
            differ += [f"option {k} ({old.get(k)!r} then, {new.get(k)!r} now)" for k in options]
        if differ:
            raise ConfigError(f"--resume: the unfinished audit in {self.path} was run with a different "
                              f"{', '.join(differ)}; run without --resume to start again")
        for number, line in enumerate(lines[1:], 2):
            try:
                record = json.loads(line)
                self.found[record["key"]] = torch.tensor(record["values"], dtype=torch.float32)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if number == len(lines):  # a last line cut short by the interruption: that chunk is redone
                    break
                raise ConfigError(f"--resume: {self.path}:{number} is damaged; run without --resume") from None

    def _append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def get(self, key: str) -> torch.Tensor | None:
        values = self.found.get(key)
        self.reused += values is not None
        return values

    def put(self, key: str, values: torch.Tensor) -> None:
        self._append({"key": key, "values": values.float().tolist()})

    def close(self, remove: bool = False) -> None:
        self._file.close()
        if remove:
            self.path.unlink(missing_ok=True)
