"""Read prompt pairs from common table formats, local folders, the Hugging Face hub and public benchmark layouts.

`load_pair_source` turns a source string into validated `PromptPair`s plus plain-English notes for the report:

* a plain table (JSONL, JSON, CSV, Parquet, a `save_to_disk` folder or a hub id) with one row per pair and a
  harmful and a benign column (names remappable with `ColumnMap`);
* a public benchmark layout (`preset`): JailbreakBench JBB-Behaviors (``jbb``), XSTest v2 (``xstest``) or
  AdvBench harmful behaviors (``advbench``), each paired by the rules documented on its loader below.

Every table is read with the `datasets` library; JSONL files in the project's own schema keep going through
`load_pairs`, which reports problems by line. All other problems are reported by file, 1-based data row
(header not counted) and column, collected in one pass.
"""

from __future__ import annotations

import csv
import hashlib
import math
import random
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from refusal_eval.data.pairs import PromptPair, file_sha256, load_pairs, shipped_dataset
from refusal_eval.errors import ConfigError, DataError

PRESETS: tuple[str, ...] = ("jbb", "xstest", "advbench")
"""Names accepted by the `preset` argument."""

PRESET_HUB_IDS: dict[str, str] = {
    "jbb": "JailbreakBench/JBB-Behaviors",
    "xstest": "paul-rottger/xstest",
    "advbench": "walledai/AdvBench",
}
"""Hub ids of the public datasets, for a CLI default; `load_pair_source` never looks one up unasked."""

_JBB_HUB_CONFIG = "behaviors"
_JBB_FILES = {"harmful": "harmful-behaviors.csv", "benign": "benign-behaviors.csv"}
_JBB_COLUMNS = ("Index", "Goal", "Target", "Behavior", "Category", "Source")
_JBB_NEEDED = ("Index", "Goal", "Behavior", "Category")
_XSTEST_FILE = "xstest_prompts.csv"
_XSTEST_COLUMNS = ("id", "prompt", "type", "label", "focus", "note")
_XSTEST_NEEDED = ("id", "prompt", "type", "focus")
_ADVBENCH_FILE = "harmful_behaviors.csv"
_ADVBENCH_COLUMNS = ("goal", "target")

# XSTest v2: each contrast (unsafe) type and the safe type(s) whose prompts share its focus words.
XSTEST_FAMILIES: dict[str, tuple[str, ...]] = {
    "contrast_homonyms": ("homonyms",),
    "contrast_figurative_language": ("figurative_language",),
    "contrast_safe_targets": ("safe_targets",),
    "contrast_safe_contexts": ("safe_contexts",),
    "contrast_definitions": ("definitions",),
    "contrast_historical_events": ("historical_events",),
    "contrast_discr": ("real_group_nons_discr", "nons_group_real_discr"),
    "contrast_privacy": ("privacy_public", "privacy_fictional"),
}

_SUFFIX_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_FORMAT_NAMES = {".jsonl": "JSONL", ".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}
_MAX_SHOWN = 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Suffixes that mark a string as a file path even when it has the owner/name shape of a hub id.
_FILE_SUFFIXES = {*_SUFFIX_FORMATS, ".arrow", ".tsv", ".txt", ".zip", ".gz"}


@dataclass(frozen=True)
class ColumnMap:
    """Which column of a plain table holds each pair field; None means the default name."""

    harmful: str | None = None
    benign: str | None = None
    id: str | None = None
    category: str | None = None
    split: str | None = None

    def is_default(self) -> bool:
        """True when every column is unset or set to its default name."""
        return all(getattr(self, f.name) in (None, f.name) for f in fields(self))


@dataclass(frozen=True)
class PairSource:
    """Pairs read from one source, with what the report should say about them."""

    pairs: list[PromptPair]
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    description: str = ""


@dataclass
class _Table:
    """One table of rows; `label` names it in messages (a file path, or a folder plus split name)."""

    label: str
    columns: list[str]
    rows: list[dict[str, Any]]


@dataclass
class _Read:
    tables: dict[str, _Table]
    fingerprint: str
    description: str
    files: list[tuple[str, Path]] = field(default_factory=list)  # (name in the fingerprint, path)


class _Problems:
    """Collects row problems and raises them all as one DataError."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, table: _Table, row: int, column: str | Sequence[str], message: str) -> None:
        where = "column " + (
            f"'{column}'" if isinstance(column, str) else " and ".join(f"'{c}'" for c in column)
        )
        self.items.append(f"{table.label}: row {row}, {where}: {message}")

    def raise_if_any(self, what: str) -> None:
        if not self.items:
            return
        shown = "\n  ".join(self.items[:_MAX_SHOWN])
        more = f"\n  ... and {len(self.items) - _MAX_SHOWN} more" if len(self.items) > _MAX_SHOWN else ""
        raise DataError(
            f"{len(self.items)} problem(s) in {what} (rows are 1-based data rows, header not counted):\n"
            f"  {shown}{more}\nFix these rows (or map other columns) and run again."
        )


# --------------------------------------------------------------------------------------------- public entry


def load_pair_source(
    source: str,
    preset: str | None = None,
    columns: ColumnMap | None = None,
    seed: int = 0,
) -> PairSource:
    """Read and validate the pairs of `source` (path or hub id), optionally in a public benchmark layout.

    `seed` only matters for the ``advbench`` preset (its synthetic benign matching). Splits are not filtered
    here: pass `PairSource.pairs` to `select_split`.
    """
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown dataset preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    if preset is not None and columns is not None and not columns.is_default():
        raise ConfigError(
            f"column options (--harmful-column etc.) apply to plain tables only; the '{preset}' preset "
            "reads its benchmark's fixed columns. Drop either the preset or the column options."
        )
    columns = columns or ColumnMap()
    if not source or not source.strip():
        raise DataError("empty dataset source: pass a file, a folder or a hub id (owner/name)")
    path = Path(source).expanduser()
    if not path.exists():
        if not _looks_like_hub_id(source):
            raise DataError(
                f"{source}: no such file or folder. Pass --dataset PATH to an existing pair file or folder "
                "(or a Hugging Face hub id written as owner/name)."
            )
        return _from_hub(source, preset, columns, seed)
    if preset == "jbb":
        return _jbb(_read_jbb_local(path))
    if preset == "xstest":
        return _xstest(_read_single_local(path, _XSTEST_FILE, "XSTest v2", _XSTEST_COLUMNS))
    if preset == "advbench":
        return _advbench(_read_single_local(path, _ADVBENCH_FILE, "AdvBench", _ADVBENCH_COLUMNS), seed)
    if path.is_file() and path.suffix.lower() == ".jsonl" and columns.is_default():
        pairs = load_pairs(path)
        return PairSource(pairs=pairs, notes=[], fingerprint=file_sha256(path),
                          description=f"JSONL pair file {path} ({len(pairs)} pairs)")
    if path.is_dir():
        read = _read_folder(path)
    else:
        read = _read_file(path)
    return _plain(read, columns, source_name=path.name)


# --------------------------------------------------------------------------------------------------- reading


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the `datasets` progress bars while reading (restored afterwards)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _looks_like_hub_id(source: str) -> bool:
    if source.startswith((".", "/", "~")) or "\\" in source:
        return False
    if Path(source).suffix.lower() in _FILE_SUFFIXES:
        return False
    return bool(_HUB_ID.match(source))


def _table_from_dataset(label: str, dataset: Any) -> _Table:
    return _Table(label=label, columns=list(dataset.column_names), rows=dataset.to_list())


def _read_file(path: Path) -> _Read:
    """Read one JSON/JSONL/CSV/Parquet file with `datasets.load_dataset` (in a throwaway cache)."""
    import datasets

    suffix = path.suffix.lower()
    builder = _SUFFIX_FORMATS.get(suffix)
    if builder is None:
        raise DataError(
            f"{path}: unsupported file type '{path.suffix or '(none)'}'. Pass a .jsonl, .json, .csv or .parquet "
            "file, a folder written by datasets' save_to_disk, or a hub id (owner/name)."
        )
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # Read every cell as text exactly as written: no 'NA'/'None' to null, no '007' to 7.
        header = _csv_header(path)
        kwargs = {"keep_default_na": False,
                  "features": datasets.Features({name: datasets.Value("string") for name in header})}
    try:
        with tempfile.TemporaryDirectory(prefix="refusal-eval-datasets-") as cache, _quiet_datasets():
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                            keep_in_memory=True, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # the datasets builders raise many types; the user needs the cause and the file
        cause = exc.__cause__ or exc
        if "corresponds to no data" in str(cause):
            raise DataError(f"{path}: the file holds no pairs (no data rows)") from exc
        raise DataError(
            f"{path}: could not be read as {_FORMAT_NAMES[suffix]} ({type(cause).__name__}: {cause}). "
            "Check that the file is valid and UTF-8 encoded."
        ) from exc
    table = _table_from_dataset(str(path), dataset)
    return _Read(tables={"train": table}, fingerprint=file_sha256(path),
                 description=f"{_FORMAT_NAMES[suffix]} file {path} ({len(table.rows)} rows)", files=[(path.name, path)])


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), None)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from exc
    if not header:
        raise DataError(f"{path}: the CSV file is empty (no header row)")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise DataError(f"{path}: the header names column(s) {', '.join(map(repr, duplicated))} more than once; "
                        "give every column a distinct name")
    return header


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_folder(path: Path) -> _Read:
    """Read a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    if not _is_saved_dataset(path):
        hint = ""
        if all((path / name).is_file() or (path / "data" / name).is_file() for name in _JBB_FILES.values()):
            hint = " It looks like JailbreakBench JBB-Behaviors: pass --preset jbb."
        elif (path / _XSTEST_FILE).is_file():
            hint = " It looks like XSTest: pass --preset xstest."
        elif (path / _ADVBENCH_FILE).is_file():
            hint = " It looks like AdvBench: pass --preset advbench."
        raise DataError(
            f"{path}: is a folder but not a dataset saved with datasets' save_to_disk (no dataset_dict.json or "
            f"state.json).{hint} Otherwise pass the pair file itself (.jsonl, .json, .csv or .parquet)."
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # corrupt or foreign folder: say which
        raise DataError(f"{path}: could not be read with datasets.load_from_disk ({type(exc).__name__}: {exc})"
                        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        tables = {name: _table_from_dataset(f"{path} (split '{name}')", ds) for name, ds in loaded.items()}
        what = f"splits {', '.join(tables)}"
    else:
        tables = {"train": _table_from_dataset(str(path), loaded)}
        what = f"{len(tables['train'].rows)} rows"
    files = [(p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file()]
    return _Read(tables=tables, fingerprint=_files_sha256(files),
                 description=f"dataset saved with save_to_disk in {path} ({what})", files=files)


def _files_sha256(files: Sequence[tuple[str, Path]]) -> str:
    """sha256 over (name, size, bytes) of each file in name order; a single file gives its plain sha256.

    Names are relative to the source (never absolute), so the same files give the same fingerprint anywhere.
    """
    if len(files) == 1:
        return file_sha256(files[0][1])
    digest = hashlib.sha256()
    for name, path in sorted(files):
        digest.update(name.encode("utf-8") + b"\0" + str(path.stat().st_size).encode("ascii") + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _hub_read(hub_id: str, config: str | None = None) -> _Read:
    """Every split of a hub dataset; a DataError (never a traceback) when the hub cannot be reached."""
    import datasets

    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(hub_id, config) if config else datasets.load_dataset(hub_id)
    except Exception as exc:  # offline, unknown id, gated repo...: all end the same way for the user
        shown = f"{hub_id}" + (f" (config '{config}')" if config else "")
        raise DataError(
            f"{shown}: could not load this dataset from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "The hub may be unreachable or the id wrong: download the files and pass a local path instead."
        ) from exc
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    tables = {name: _table_from_dataset(f"{hub_id} (split '{name}')", ds) for name, ds in loaded.items()}
    prints = "\n".join(f"{name}={getattr(ds, '_fingerprint', '')}" for name, ds in sorted(loaded.items()))
    tag = f"{hub_id}:{config}" if config else hub_id
    return _Read(tables=tables, fingerprint=f"{tag}@{hashlib.sha256(prints.encode()).hexdigest()}",
                 description=f"Hugging Face hub dataset {tag} (splits {', '.join(tables)})")


def _from_hub(hub_id: str, preset: str | None, columns: ColumnMap, seed: int) -> PairSource:
    if preset == "jbb":
        read = _hub_read(hub_id, _JBB_HUB_CONFIG)
        missing = [s for s in ("harmful", "benign") if s not in read.tables]
        if missing:
            raise DataError(f"{hub_id}: has splits {', '.join(read.tables)}, but the JBB-Behaviors layout needs "
                            f"splits 'harmful' and 'benign' (config '{_JBB_HUB_CONFIG}')")
        return _jbb(_Read({s: read.tables[s] for s in ("harmful", "benign")}, read.fingerprint, read.description))
    if preset == "xstest":
        return _xstest(_hub_read(hub_id))
    if preset == "advbench":
        return _advbench(_hub_read(hub_id), seed)
    return _plain(_hub_read(hub_id), columns, source_name=hub_id)


def _read_jbb_local(path: Path) -> _Read:
    """The two JBB-Behaviors CSVs from a folder (or its data/ subfolder), or a saved DatasetDict."""
    if path.is_file():
        raise DataError(
            f"{path}: the jbb preset reads a folder holding both {_JBB_FILES['harmful']} and "
            f"{_JBB_FILES['benign']} (or the hub id {PRESET_HUB_IDS['jbb']}); pass that folder."
        )
    if _is_saved_dataset(path):
        read = _read_folder(path)
        if not {"harmful", "benign"} <= set(read.tables):
            raise DataError(f"{path}: a saved dataset for the jbb preset needs splits 'harmful' and 'benign'; "
                            f"it has {', '.join(read.tables)}")
        return _Read({s: read.tables[s] for s in ("harmful", "benign")}, read.fingerprint,
                     f"JBB-Behaviors: {read.description}")
    for folder in (path, path / "data"):
        files = {side: folder / name for side, name in _JBB_FILES.items()}
        if all(f.is_file() for f in files.values()):
            tables = {side: _read_file(f).tables["train"] for side, f in files.items()}
            named = [(f.name, f) for f in files.values()]
            return _Read(tables=tables, fingerprint=_files_sha256(named),
                         description=f"JBB-Behaviors: 2 CSV files in {folder}", files=named)
    raise DataError(
        f"{path}: no {_JBB_FILES['harmful']} and {_JBB_FILES['benign']} in this folder or its data/ subfolder. "
        f"Pass the JBB-Behaviors folder holding both, or the hub id {PRESET_HUB_IDS['jbb']}."
    )


def _read_single_local(path: Path, file_name: str, layout: str, expected: Sequence[str]) -> _Read:
    """A one-table preset: the file itself, a folder (or data/ subfolder) holding `file_name`, or a saved dataset."""
    if path.is_file():
        return _read_file(path)
    if _is_saved_dataset(path):
        return _read_folder(path)
    for candidate in (path / file_name, path / "data" / file_name):
        if candidate.is_file():
            return _read_file(candidate)
    raise DataError(f"{path}: no {file_name} in this folder or its data/ subfolder; pass the {layout} CSV file "
                    f"(columns {','.join(expected)}) or a folder holding it.")


def _canonical_headers(read: _Read, expected: Sequence[str]) -> list[str]:
    """Rename, in place, a column that matches an expected name but for case (``goal`` for JBB's ``Goal``), where
    exactly one does; the notes say which were read so."""
    notes = []
    for table in read.tables.values():
        for name in expected:
            found = [c for c in table.columns if c.casefold() == name.casefold()]
            if name in table.columns or len(found) != 1:
                continue
            table.columns[table.columns.index(found[0])] = name
            for record in table.rows:
                record[name] = record.pop(found[0], None)
            notes.append(f"{table.label}: column '{found[0]}' read as '{name}' (header case differs)")
    return notes


def _require_columns(table: _Table, needed: Sequence[str], layout: str, expected: Sequence[str]) -> None:
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise DataError(
            f"{table.label}: missing column(s) {', '.join(missing)} for the {layout} layout. Expected columns "
            f"{','.join(expected)}; the file has {', '.join(table.columns) or 'no columns'}."
        )


# --------------------------------------------------------------------------------------------------- cells


def _text(value: Any) -> str | None:
    """A cell as text; None for a missing cell (null, NaN or absent)."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _prompt(problems: _Problems, table: _Table, row: int, column: str, value: Any) -> str | None:
    """A prompt cell, or None after recording why it is unusable."""
    text = _text(value)
    if text is None or not text.strip():
        problems.add(table, row, column, "empty or missing prompt text; every row needs a non-empty prompt")
        return None
    return text


def _validate(
    problems: _Problems,
    table: _Table,
    row: int,
    fields_to_columns: dict[str, str],
    **values: Any,
) -> PromptPair | None:
    """Build a PromptPair; on failure record each error against the column it came from."""
    try:
        return PromptPair(**values)
    except ValidationError as exc:
        for item in exc.errors():
            name = str(item["loc"][0]) if item["loc"] else ""
            message = item["msg"].removeprefix("Value error, ")
            if name:
                problems.add(table, row, fields_to_columns.get(name, name), f"{message} (got {values.get(name)!r})")
            else:  # a model-level rule (identical sides) concerns both prompt columns
                problems.add(table, row, (fields_to_columns["harmful"], fields_to_columns["benign"]), message)
        return None


def _check_unique(problems: _Problems, seen: dict[str, tuple[str, int]], pair: PromptPair, table: _Table,
                  row: int, column: str) -> bool:
    if pair.id in seen:
        first_label, first_row = seen[pair.id]
        where = f"row {first_row}" if first_label == table.label else f"{first_label} row {first_row}"
        problems.add(table, row, column, f"duplicate id '{pair.id}' (first used on {where}); ids must be unique")
        return False
    seen[pair.id] = (table.label, row)
    return True


# ------------------------------------------------------------------------------------------------ plain table


def _resolve_column(table: _Table, name: str, default: str, given: str | None, required: bool) -> str | None:
    """The column to read for one field: the given name, or the default when the table has it."""
    if given is not None:
        if given not in table.columns:
            raise DataError(
                f"{table.label}: no column '{given}' (asked for as the {name} column). The columns are: "
                f"{', '.join(table.columns) or '(none)'}. Pass --{name}-column NAME with one of these."
            )
        return given
    if default in table.columns:
        return default
    if required:
        raise DataError(
            f"{table.label}: no '{default}' column for the {name} prompts. The columns are: "
            f"{', '.join(table.columns) or '(none)'}. Pass --{name}-column NAME to say which column holds them."
        )
    return None


def _plain(read: _Read, columns: ColumnMap, source_name: str) -> PairSource:
    """One pair per row: harmful/benign columns required; id, category, split, source and notes optional."""
    problems = _Problems()
    pairs: list[PromptPair] = []
    seen: dict[str, tuple[str, int]] = {}
    wanted = [given or name for given, name in ((columns.harmful, "harmful"), (columns.benign, "benign"),
                                                (columns.id, "id"), (columns.category, "category"),
                                                (columns.split, "split"), (None, "source"), (None, "notes"))]
    notes: list[str] = _canonical_headers(read, wanted)
    for table in read.tables.values():
        harmful = _resolve_column(table, "harmful", "harmful", columns.harmful, required=True)
        benign = _resolve_column(table, "benign", "benign", columns.benign, required=True)
        id_col = _resolve_column(table, "id", "id", columns.id, required=False)
        category = _resolve_column(table, "category", "category", columns.category, required=False)
        split = _resolve_column(table, "split", "split", columns.split, required=False)
        source = "source" if "source" in table.columns else None
        notes_col = "notes" if "notes" in table.columns else None
        assert harmful is not None and benign is not None
        to_columns = {"harmful": harmful, "benign": benign, "id": id_col or "id", "category": category or "category",
                      "split": split or "split", "source": source or "source", "notes": notes_col or "notes"}
        for row, record in enumerate(table.rows, start=1):
            harmful_text = _prompt(problems, table, row, harmful, record.get(harmful))
            benign_text = _prompt(problems, table, row, benign, record.get(benign))
            if harmful_text is None or benign_text is None:
                continue
            pair_id = _text(record.get(id_col)) if id_col else None
            if id_col and (pair_id is None or not pair_id.strip()):
                problems.add(table, row, id_col, "missing id; fill it in or drop the id column to number rows")
                continue
            split_value = (_text(record.get(split)) or "").strip() if split else ""
            pair = _validate(
                problems, table, row, to_columns,
                id=pair_id.strip() if pair_id else f"row-{row}",
                category=((_text(record.get(category)) or "").strip() if category else "") or "uncategorised",
                harmful=harmful_text,
                benign=benign_text,
                source=((_text(record.get(source)) or "").strip() if source else "") or source_name,
                split=split_value or None,
                notes=(_text(record.get(notes_col)) or None) if notes_col else None,
            )
            if pair is not None and _check_unique(problems, seen, pair, table, row, id_col or "(row number)"):
                pairs.append(pair)
        if id_col is None:
            notes.append(f"{table.label} has no id column, so pairs are named by row number (row-1, row-2, ...)")
        if category is None:
            notes.append(f"{table.label} has no category column, so every pair's category is 'uncategorised'")
    problems.raise_if_any(read.description)
    if len(read.tables) > 1:
        notes.append(f"read {len(read.tables)} splits ({', '.join(read.tables)}) as one pair list; split names are "
                     "not used as train/eval labels (add a 'split' column for that)")
    if not pairs:
        raise DataError(f"{read.description}: holds no pairs")
    return PairSource(pairs=pairs, notes=notes, fingerprint=read.fingerprint,
                      description=f"{read.description}: {len(pairs)} pairs")


# ---------------------------------------------------------------------------------------------------- presets


def _jbb(read: _Read) -> PairSource:
    """JBB-Behaviors: harmful and benign rows paired on equal `Behavior`; text = `Goal`, id = jbb-<harmful Index>."""
    problems = _Problems()
    renamed = _canonical_headers(read, _JBB_COLUMNS)
    by_side: dict[str, dict[str, tuple[_Table, int, dict[str, Any]]]] = {}
    for side in ("harmful", "benign"):
        table = read.tables[side]
        _require_columns(table, _JBB_NEEDED, "JailbreakBench JBB-Behaviors", _JBB_COLUMNS)
        rows: dict[str, tuple[_Table, int, dict[str, Any]]] = {}
        for row, record in enumerate(table.rows, start=1):
            behavior = (_text(record.get("Behavior")) or "").strip()
            if not behavior:
                problems.add(table, row, "Behavior", "missing behavior name; pairs are matched on it")
                continue
            if behavior in rows:
                problems.add(table, row, "Behavior", f"behavior '{behavior}' already on row {rows[behavior][1]}; "
                             "each behavior must appear once per file")
                continue
            rows[behavior] = (table, row, record)
        by_side[side] = rows
    pairs: list[PromptPair] = []
    seen: dict[str, tuple[str, int]] = {}
    for behavior, (h_table, h_row, h_record) in by_side["harmful"].items():
        if behavior not in by_side["benign"]:
            continue
        b_table, b_row, b_record = by_side["benign"][behavior]
        harmful = _prompt(problems, h_table, h_row, "Goal", h_record.get("Goal"))
        benign = _prompt(problems, b_table, b_row, "Goal", b_record.get("Goal"))
        index = (_text(h_record.get("Index")) or "").strip()
        if not index:
            problems.add(h_table, h_row, "Index", "missing index; it names the pair (jbb-<Index>)")
        if harmful is None or benign is None or not index:
            continue
        if harmful.strip() == benign.strip():
            problems.add(h_table, h_row, "Goal", f"same text as the benign Goal ({b_table.label} row {b_row}); "
                         "a pair needs two different prompts")
            continue
        pair = _validate(problems, h_table, h_row, {"id": "Index", "category": "Category", "harmful": "Goal",
                                                    "benign": "Goal"},
                         id=f"jbb-{index}", category=(_text(h_record.get("Category")) or "").strip(),
                         harmful=harmful, benign=benign, source="jbb")
        if pair is not None and _check_unique(problems, seen, pair, h_table, h_row, "Index"):
            pairs.append(pair)
    problems.raise_if_any(read.description)
    harmful_only = [b for b in by_side["harmful"] if b not in by_side["benign"]]
    benign_only = [b for b in by_side["benign"] if b not in by_side["harmful"]]
    notes = [
        f"JBB-Behaviors: {len(pairs)} harmful and benign behaviors paired on the Behavior column (harmful text = "
        "harmful Goal, benign text = benign Goal). The benign goals match the harmful ones by topic, not by a "
        "minimal edit, so the two sides differ in wording and length.",
        "JBB-Behaviors has no train/eval split: every pair has no split, so only --split all selects them.",
        *renamed,
    ]
    if harmful_only or benign_only:
        notes.append(
            f"{len(harmful_only) + len(benign_only)} behavior(s) present on one side only were left out "
            f"({len(harmful_only)} harmful only{_examples(harmful_only)}, {len(benign_only)} benign only"
            f"{_examples(benign_only)})."
        )
    if not pairs:
        raise DataError(f"{read.description}: no behavior appears in both files, so there are no pairs")
    what = read.description if read.description.startswith("JBB-Behaviors") else f"JBB-Behaviors: {read.description}"
    return PairSource(pairs=pairs, notes=notes, fingerprint=read.fingerprint, description=f"{what}: {len(pairs)} pairs")


def _examples(items: Sequence[str], limit: int = 3) -> str:
    if not items:
        return ""
    shown = ", ".join(f"'{item}'" for item in items[:limit])
    return f": {shown}" + (", ..." if len(items) > limit else "")


def _id_order(value: str) -> tuple[int, int, str]:
    """Sort key for ids: numbers numerically, then other ids as text."""
    stripped = value.strip()
    return (0, int(stripped), "") if stripped.isdigit() else (1, 0, stripped)


def _xstest(read: _Read) -> PairSource:
    """XSTest v2: each contrast_X prompt paired with the safe prompt of the same focus in X's safe family."""
    problems = _Problems()
    renamed = _canonical_headers(read, _XSTEST_COLUMNS)
    contrast: list[tuple[_Table, int, str, str, str, str]] = []  # table, row, id, type, focus, prompt
    safe: dict[tuple[str, str], list[tuple[str, _Table, int, str]]] = {}  # (type, focus) -> [(id, table, row, text)]
    unknown: dict[str, int] = {}
    safe_types = {t for family in XSTEST_FAMILIES.values() for t in family}
    for table in read.tables.values():
        _require_columns(table, _XSTEST_NEEDED, "XSTest v2", _XSTEST_COLUMNS)
        for row, record in enumerate(table.rows, start=1):
            kind = (_text(record.get("type")) or "").strip()
            if not kind.startswith("contrast_") and kind not in safe_types:
                continue
            row_id = (_text(record.get("id")) or "").strip()
            if not row_id:
                problems.add(table, row, "id", "missing id")
                continue
            text = _prompt(problems, table, row, "prompt", record.get("prompt"))
            if text is None:
                continue
            focus = (_text(record.get("focus")) or "").strip().casefold()
            if kind.startswith("contrast_"):
                if kind not in XSTEST_FAMILIES:
                    unknown[kind] = unknown.get(kind, 0) + 1
                    continue
                contrast.append((table, row, row_id, kind, focus, text))
            elif focus:
                safe.setdefault((kind, focus), []).append((row_id, table, row, text))
    pairs: list[PromptPair] = []
    seen: dict[str, tuple[str, int]] = {}
    unmatched: dict[str, int] = {}
    ambiguous = 0
    for table, row, row_id, kind, focus, text in contrast:
        candidates = [c for t in XSTEST_FAMILIES[kind] for c in safe.get((t, focus), [])] if focus else []
        family = kind.removeprefix("contrast_")
        if not candidates:
            unmatched[family] = unmatched.get(family, 0) + 1
            continue
        if len(candidates) > 1:
            ambiguous += 1
        _, safe_table, safe_row, safe_text = min(candidates, key=lambda c: _id_order(c[0]))
        if text.strip() == safe_text.strip():
            problems.add(table, row, "prompt", f"same text as its safe counterpart ({safe_table.label} row "
                         f"{safe_row}); a pair needs two different prompts")
            continue
        pair = _validate(problems, table, row, {"id": "id", "harmful": "prompt", "benign": "prompt"},
                         id=f"xstest-{row_id}", category=family, harmful=text, benign=safe_text, source="xstest")
        if pair is not None and _check_unique(problems, seen, pair, table, row, "id"):
            pairs.append(pair)
    problems.raise_if_any(read.description)
    notes = [
        f"XSTest v2: {len(pairs)} contrast (unsafe) prompts each paired with the safe prompt of the same focus in "
        "the matching safe type (discr and privacy draw on two safe types each). The sides share a focus word or "
        "topic but are not minimal edits.",
        "XSTest has no train/eval split: every pair has no split, so only --split all selects them.",
    ]
    if ambiguous:
        notes.append(f"{ambiguous} contrast prompt(s) had several safe prompts with the same focus; the one with the "
                     "smallest id was used.")
    if unmatched:
        detail = ", ".join(f"{family}: {count}" for family, count in sorted(unmatched.items()))
        notes.append(f"{sum(unmatched.values())} contrast prompt(s) with no safe prompt of the same focus were left "
                     f"out ({detail}).")
    if unknown:
        detail = ", ".join(f"{kind}: {count}" for kind, count in sorted(unknown.items()))
        notes.append(f"{sum(unknown.values())} prompt(s) of unknown contrast type(s) were left out ({detail}); "
                     f"known types: {', '.join(XSTEST_FAMILIES)}.")
    if not pairs:
        raise DataError(f"{read.description}: no contrast prompt has a safe counterpart, so there are no pairs")
    notes += renamed
    return PairSource(pairs=pairs, notes=notes, fingerprint=read.fingerprint,
                      description=f"XSTest v2: {read.description}: {len(pairs)} pairs")


def _advbench(read: _Read, seed: int) -> PairSource:
    """AdvBench goals, each matched with a benign prompt of the shipped pairs by a seeded shuffle (synthetic)."""
    problems = _Problems()
    renamed = _canonical_headers(read, (*_ADVBENCH_COLUMNS, "prompt"))
    goals: list[tuple[_Table, int, str, str]] = []  # table, row, goal column, text
    for table in read.tables.values():
        # The CSV names the column 'goal'; the hub mirror calls it 'prompt'.
        column = "goal" if "goal" in table.columns else "prompt" if "prompt" in table.columns else None
        if column is None:
            _require_columns(table, ("goal",), "AdvBench harmful_behaviors.csv", _ADVBENCH_COLUMNS)
        assert column is not None
        for row, record in enumerate(table.rows, start=1):
            text = _prompt(problems, table, row, column, record.get(column))
            if text is not None:
                goals.append((table, row, column, text))
    pool_path = shipped_dataset()
    pool = list(dict.fromkeys(p.benign for p in load_pairs(pool_path)))
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < len(goals):
        batch = list(pool)
        rng.shuffle(batch)
        order.extend(batch)
    pairs: list[PromptPair] = []
    for number, ((table, row, column, text), benign) in enumerate(zip(goals, order, strict=False), start=1):
        pair = _validate(problems, table, row, {"harmful": column, "benign": "(matched benign prompt)"},
                         id=f"advbench-{number if len(read.tables) > 1 else row}", category="advbench",
                         harmful=text, benign=benign, source="advbench")
        if pair is not None:
            pairs.append(pair)
    problems.raise_if_any(read.description)
    if not pairs:
        raise DataError(f"{read.description}: holds no AdvBench goals")
    notes = [
        "pairing is synthetic: AdvBench has harmful prompts only; each is paired with a benign prompt from "
        f"{pool_path.name} by a seeded shuffle (seed {seed}), so the pairs are not minimal and differ in length",
        "AdvBench has no train/eval split: every pair has no split, so only --split all selects them.",
    ]
    if len(goals) > len(pool):
        notes.append(f"there are more AdvBench goals ({len(goals)}) than benign prompts ({len(pool)}), so benign "
                     "prompts are reused (reshuffled on each pass)")
    # The pairs depend on the benign pool too, so its bytes are part of the fingerprint.
    if read.files:
        fingerprint = _files_sha256([*(("advbench/" + n, p) for n, p in read.files), ("benign/" + pool_path.name,
                                                                                      pool_path)])
    else:
        fingerprint = f"{read.fingerprint}+{file_sha256(pool_path)}"
    notes += renamed
    return PairSource(pairs=pairs, notes=notes, fingerprint=fingerprint,
                      description=f"AdvBench: {read.description}, paired with benign prompts from {pool_path}: "
                                  f"{len(pairs)} pairs")
