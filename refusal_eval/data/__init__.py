"""Prompt pairs: schema, loading and validation."""

from refusal_eval.data.formats import PRESET_HUB_IDS, PRESETS, ColumnMap, PairSource, load_pair_source
from refusal_eval.data.pairs import PromptPair, file_sha256, load_pairs, select_split, shipped_dataset

__all__ = [
    "PRESETS",
    "PRESET_HUB_IDS",
    "ColumnMap",
    "PairSource",
    "PromptPair",
    "file_sha256",
    "load_pair_source",
    "load_pairs",
    "select_split",
    "shipped_dataset",
]
