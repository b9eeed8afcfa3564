"""refusal_eval: find where a language model's refusal of harmful requests lives."""

__version__ = "0.1.0"

from refusal_eval.audit import audit  # noqa: E402
from refusal_eval.config import AuditConfig  # noqa: E402
from refusal_eval.data.pairs import PromptPair, load_pairs  # noqa: E402
from refusal_eval.report.schema import AuditReport, load_report  # noqa: E402

__all__ = ["AuditConfig", "AuditReport", "PromptPair", "__version__", "audit", "load_pairs", "load_report"]
