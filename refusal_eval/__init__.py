"""refusal_eval: find where a language model's refusal of harmful requests lives.

The public names are imported on first use (PEP 562), so ``import refusal_eval`` — and with it the command
line's ``--help``, ``validate``, ``schema``, ``gate`` and the pytest plugin — does not load torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "audit": "refusal_eval.pipeline.audit",
    "AuditConfig": "refusal_eval.config",
    "PromptPair": "refusal_eval.data.pairs",
    "load_pairs": "refusal_eval.data.pairs",
    "AuditReport": "refusal_eval.report.schema",
    "load_report": "refusal_eval.report.kinds",
}

__all__ = ["AuditConfig", "AuditReport", "PromptPair", "__version__", "audit", "load_pairs", "load_report"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'refusal_eval' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type: ``refusal_eval.audit`` stays the function even after the submodule of the same
    name is imported (the import system then sets the package attribute to the submodule)."""

    def __setattr__(self, name: str, value) -> None:
        if name == "audit" and isinstance(value, types.ModuleType):
            value = value.audit
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
