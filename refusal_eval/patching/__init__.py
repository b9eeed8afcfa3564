"""Activation patching: components, tokenised pair batches and the exact batched engine.

``Component`` and the kinds need no torch; the engine's names are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib

from refusal_eval.patching.components import KINDS, Component, enumerate_components

_LAZY = {"PairBatch", "PatchEngine", "build_pair_batch"}

__all__ = ["KINDS", "Component", "PairBatch", "PatchEngine", "build_pair_batch", "enumerate_components"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module("refusal_eval.patching.exact"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'refusal_eval.patching' has no attribute '{name}'")
