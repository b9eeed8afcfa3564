"""Stage 1 of an audit, the inputs: everything read from disk before a model loads (scored, tricky-benign and
calibration pairs), and how a prompt becomes token ids (:func:`format_prompt`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from refusal_eval.config import AuditConfig
from refusal_eval.data.formats import PRESET_HUB_IDS, ColumnMap, load_pair_source
from refusal_eval.data.pairs import PromptPair, load_pairs, select_split, shipped_dataset
from refusal_eval.errors import DataError
from refusal_eval.models.loading import LoadedModel


def format_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of one user turn through the model's chat template, ready for the first reply token."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of trailing tokens the two sequences share (the chat-template suffix and more)."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


@dataclass
class Inputs:
    """The scored pairs, the tricky-benign pairs and the calibration pairs of an audit."""

    dataset_path: Path
    fingerprint: str
    pairs: list[PromptPair]
    tricky_path: Path | None
    tricky: list[PromptPair]
    calibration_path: Path | None
    calibration: list[PromptPair]
    calibration_note: str
    notes: list[str] = field(default_factory=list)


def _calibration(
    config: AuditConfig, dataset_path: Path, everything: list[PromptPair], pairs: list[PromptPair]
) -> tuple[Path | None, list, str]:
    """Pairs whose replies choose the token sets: never a scored prompt (choosing them on the scored pairs
    manufactures a gap). --calibration FILE, else the dataset's other split (train for an eval audit)."""
    if config.token_sets == "canonical":
        return None, [], "canonical token sets requested (--token-sets canonical)"
    scored = {p.harmful.strip() for p in pairs} | {p.benign.strip() for p in pairs}
    if config.calibration:
        path = Path(config.calibration)
        candidates = load_pairs(path)
        where = f"--calibration {path}"
    else:
        other = {"eval": "train", "train": "eval"}.get(config.split)
        if other is None:
            return None, [], ("the whole dataset is scored (--split all), so no disjoint calibration pairs exist: "
                              "canonical token sets are used (pass --calibration FILE to derive them)")
        candidates = [p for p in everything if p.split == other]
        path, where = dataset_path, f"the {other} split of {dataset_path.name}"
        if not candidates:
            return None, [], (f"{dataset_path.name} has no {other} split to calibrate on: canonical token sets are "
                              "used (pass --calibration FILE to derive them)")
    kept = [p for p in candidates if p.harmful.strip() not in scored and p.benign.strip() not in scored]
    dropped = len(candidates) - len(kept)
    if not kept:
        raise DataError(f"{path}: every calibration pair shares a prompt with the scored pairs; calibration prompts "
                        "must be disjoint from the scored ones (use another file or --token-sets canonical)")
    if config.max_calibration_pairs:
        kept = kept[: config.max_calibration_pairs]
    note = f"{len(kept)} calibration pairs from {where}"
    if dropped:
        note += f" ({dropped} left out because they share a prompt with the scored pairs)"
    return path, kept, note


def load_inputs(config: AuditConfig) -> Inputs:
    """Read and validate every pair file the audit needs (errors name file and line, before any model work)."""
    dataset = config.dataset or (PRESET_HUB_IDS[config.preset] if config.preset else str(shipped_dataset()))
    dataset_path = Path(dataset)
    columns = ColumnMap(harmful=config.harmful_column, benign=config.benign_column, id=config.id_column,
                        category=config.category_column, split=config.split_column)
    source = load_pair_source(dataset, config.preset, columns, seed=config.seed)
    everything, notes = source.pairs, list(source.notes)
    if config.split != "all" and all(p.split is None for p in everything):
        notes.append(f"{dataset_path.name} has no split field: all {len(everything)} pairs are scored (--split "
                     f"{config.split} applies to files that mark their pairs)")
        pairs = everything
    else:
        pairs = select_split(everything, config.split, dataset_path)
    if config.max_pairs:
        pairs = pairs[: config.max_pairs]
    if config.tricky is None:
        tricky_path = shipped_dataset("tricky_benign.jsonl") if config.dataset is None and not config.preset else None
    else:
        tricky_path = Path(config.tricky) if config.tricky else None
    tricky = load_pairs(tricky_path) if tricky_path else []
    calibration_path, calibration, note = _calibration(config, dataset_path, everything, pairs)
    return Inputs(dataset_path, source.fingerprint, pairs, tricky_path, tricky, calibration_path, calibration, note,
                  notes)


def check_prompt_lengths(loaded: LoadedModel, inputs: Inputs, config: AuditConfig) -> None:
    """DataError naming the pair when a chat-formatted prompt plus the reply would not fit the model's context
    (``max_position_embeddings``/``n_positions``); checked before any forward pass."""
    cfg = loaded.model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not limit:
        return
    room = int(limit) - config.max_new_tokens
    for what, pairs in (("pair", inputs.pairs), ("tricky pair", inputs.tricky),
                        ("calibration pair", inputs.calibration)):
        for pair in pairs:
            for side in ("harmful", "benign"):
                n = len(format_prompt(loaded.tokenizer, getattr(pair, side)))
                if n > room:
                    raise DataError(f"{what} {pair.id}: the {side} prompt is {n} tokens with the chat template; "
                                    f"with {config.max_new_tokens} reply tokens it exceeds the model's context of "
                                    f"{limit} positions. Shorten it or leave the pair out")
