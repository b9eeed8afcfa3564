"""Exceptions with messages meant for the user (the CLI maps them to exit code 2)."""

from __future__ import annotations


class RefusalEvalError(Exception):
    """Base class for errors caused by the user's input (bad file, bad option, bad model)."""


class DataError(RefusalEvalError):
    """A pair file is malformed; the message names the file, the line and the problem."""


class ConfigError(RefusalEvalError):
    """An option or config value is invalid."""


class ModelError(RefusalEvalError):
    """A model cannot be loaded or its architecture is not supported."""


class ReportError(RefusalEvalError):
    """A report file does not validate against the schema."""


class MetricError(RefusalEvalError):
    """A refusal score came out NaN or infinite; the message names the pair and component."""
