"""Prompt pairs: schema, loading and validation."""

from refusal_eval.data.pairs import PromptPair, file_sha256, load_pairs, shipped_dataset

__all__ = ["PromptPair", "file_sha256", "load_pairs", "shipped_dataset"]
