"""Activation patching: components, tokenised pair batches and the exact batched engine."""

from refusal_eval.patching.components import KINDS, Component, enumerate_components
from refusal_eval.patching.exact import PairBatch, PatchEngine, build_pair_batch

__all__ = ["KINDS", "Component", "PairBatch", "PatchEngine", "build_pair_batch", "enumerate_components"]
