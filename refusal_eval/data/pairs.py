"""Harmful/benign prompt pairs: the pydantic schema and a validating JSONL loader."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import jsonlines
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from refusal_eval.errors import DataError

Split = Literal["train", "eval"]


class PromptPair(BaseModel):
    """One harmful request and its benign minimal-pair twin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    category: str = Field(min_length=1)
    harmful: str
    benign: str
    source: str = Field(min_length=1)
    split: Split | None = None
    notes: str | None = None

    @field_validator("harmful", "benign")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty prompt")
        return value

    @model_validator(mode="after")
    def _sides_differ(self) -> PromptPair:
        if self.harmful.strip() == self.benign.strip():
            raise ValueError("harmful and benign sides are identical; a pair needs two different prompts")
        return self


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (dataset identity in reports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "sides"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] == "extra_forbidden":
            message = "unknown field (allowed: id, category, harmful, benign, source, split, notes)"
        parts.append(f"field '{where}': {message}")
    return "; ".join(parts)


def load_pairs(
    path: str | Path,
    split: Split | Literal["all"] = "all",
) -> list[PromptPair]:
    """Load and validate a JSONL pair file; raise DataError naming file and line on any problem."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a pair file. Pass --dataset PATH to a JSONL file of pairs.")
    if not path.is_file():
        raise DataError(f"{path}: no such pair file. Pass --dataset PATH to a JSONL file of pairs.")
    try:
        head = path.read_text(encoding="utf-8").lstrip()[:1]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); a pair file is UTF-8 JSONL") from exc
    if head == "[":
        raise DataError(f"{path}: holds a JSON array; a pair file is JSONL, one JSON object per line "
                        "(convert with: jq -c '.[]' FILE > pairs.jsonl)")
    # Read every line and collect all problems, so the user fixes the file in one pass.
    pairs: list[PromptPair] = []
    problems: list[str] = []
    first_line_of: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        current = [0]

        def non_empty_lines():
            for line_number, raw in enumerate(handle, start=1):
                if raw.strip():
                    current[0] = line_number
                    yield raw

        reader = jsonlines.Reader(non_empty_lines())
        while True:
            try:
                obj = reader.read()
            except EOFError:
                break
            except jsonlines.InvalidLineError as exc:
                problems.append(f"{path}:{current[0]}: malformed JSON ({exc.__cause__ or exc})")
                continue
            number = current[0]
            if not isinstance(obj, dict):
                problems.append(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                continue
            try:
                pair = PromptPair.model_validate(obj)
            except ValidationError as exc:
                problems.append(f"{path}:{number}: pair '{obj.get('id', '?')}': {_describe(exc)}")
                continue
            if pair.id in first_line_of:
                problems.append(
                    f"{path}:{number}: duplicate id '{pair.id}' (first used on line {first_line_of[pair.id]})"
                )
                continue
            first_line_of[pair.id] = number
            pairs.append(pair)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} problem(s) in {path}:\n  {shown}{more}")
    if not pairs:
        raise DataError(f"{path}: the file holds no pairs")
    return select_split(pairs, split, path)


def select_split(pairs: list[PromptPair], split: Split | Literal["all"], path: str | Path) -> list[PromptPair]:
    """The pairs of one split ('all': every pair); DataError naming the file when none has it."""
    if split == "all":
        return pairs
    chosen = [p for p in pairs if p.split == split]
    if not chosen:
        raise DataError(f"{path}: no pair has split '{split}'. Use --split all to use every pair.")
    return chosen


def shipped_dataset(name: str = "refusal_pairs.jsonl") -> Path:
    """Path of a curated dataset shipped with the project (repo checkout or installed wheel)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "datasets" / name, here / "_shipped_datasets" / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"shipped dataset '{name}' not found next to the package; pass --dataset PATH")
