"""inspect_ai extension registry (entry point group ``inspect_ai``): the tasks, solver, scorers and metrics of
:mod:`refusal_eval.inspect_tasks`, named ``refusal_eval/<name>`` (e.g. ``inspect eval refusal_eval/refusal_behaviour``).
"""

from refusal_eval.inspect_tasks import (  # noqa: F401
    audit_headline,
    refusal_audit,
    refusal_behaviour,
    refusal_circuit,
    refusal_generate,
    refusal_matcher,
    refusal_rates,
    refusal_rates_by_category,
)
