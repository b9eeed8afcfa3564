"""The audit pipeline, one module per stage, each importing only the stages before it:

``inputs`` -> ``behaviour`` (replies, the opening tree) -> ``scores`` (scores and gap) -> ``plan`` -> ``effects`` ->
``statistics`` -> ``analysis`` (what the stages computed) -> ``controls`` -> ``build`` (the report) -> ``audit``
(:func:`refusal_eval.pipeline.audit.audit` runs them all, the random-weights control included).

Nothing is imported here: ``import refusal_eval.pipeline`` loads no stage (and no torch).
"""
