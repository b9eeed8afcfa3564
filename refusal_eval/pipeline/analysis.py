"""What the model-touching stages computed for one model (:class:`Analysis`): the output of
:func:`refusal_eval.pipeline.audit.analyse`, read by the controls and the report."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refusal_eval.data.pairs import PromptPair
from refusal_eval.metrics import TokenSets
from refusal_eval.models.loading import LoadedModel
from refusal_eval.patching.components import Component
from refusal_eval.patching.exact import PairBatch, PatchEngine
from refusal_eval.report import schema as rs
from refusal_eval.stats import Interval, PermutationResult, Resolution


@dataclass
class Analysis:
    """What the stages computed for one model on the inputs (no report formatting)."""

    loaded: LoadedModel
    pairs: list[PromptPair]
    harmful_ids: list[list[int]]
    benign_ids: list[list[int]]
    replies: tuple[list[str], list[str]]
    refused: tuple[list[bool], list[bool]]
    behaviour: rs.Behaviour
    token_sets: TokenSets
    m_h: list[float]
    m_b: list[float]
    used: list[int]
    exclusions: list[rs.Exclusion]
    full_alignment: bool
    gap_all: rs.Gap
    gap: rs.Gap
    shares_defined: bool
    shares_reason: str
    validity: rs.ScoreValidity | None
    validity_tricky: rs.ScoreValidity | None
    engine: PatchEngine
    batch: PairBatch
    suffix: int
    components: list[Component]
    effects: np.ndarray
    approximate: np.ndarray
    attribution_info: rs.AttributionInfo | None
    permutation: PermutationResult
    intervals: Interval | None
    floor: np.ndarray | None  # [C] NaN where not sampled
    resolution: Resolution
    significant: np.ndarray | None
    warnings: list[str] = field(default_factory=list)
    alignment: str = "full"
    on_full: np.ndarray | None = None  # [C] mixed alignment: the component was patched on equal-length pairs only
    full_cols: list[int] | None = None  # mixed alignment: columns of ``used`` whose sides have equal token length
    gap_full: rs.Gap | None = None  # mixed alignment: the gap over those pairs
    floor_bound: float | None = None  # the noise floor the rules use (sampled: FLOOR_FACTOR x the largest)
    search: rs.SearchInfo | None = None  # how the cells were chosen (None: given by another analysis)

    @property
    def gaps(self) -> np.ndarray:
        """[P] the patched pairs' gaps m_h - m_b, in the order of the effects' columns."""
        return np.array(self.m_h)[self.used] - np.array(self.m_b)[self.used]

    @property
    def largest_effect(self) -> np.ndarray:
        """[C] each component's largest |effect| over the pairs it was patched on."""
        return np.nanmax(np.abs(self.effects), axis=1)

    @property
    def refuses(self) -> bool:
        """The behaviour gate: harmful refusal's interval lies wholly above benign over-refusal's."""
        return bool(self.behaviour.refuses)

    @property
    def n_significant(self) -> int:
        return 0 if self.significant is None else int(self.significant.sum())
