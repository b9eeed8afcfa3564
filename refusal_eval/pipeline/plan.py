"""Stage 4 of an audit, the patch plan: which components are patched on which pairs (one family of pairs, or two
under mixed alignment)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from refusal_eval.config import AuditConfig
from refusal_eval.errors import DataError
from refusal_eval.models.loading import LoadedModel
from refusal_eval.patching.components import Component, components_at
from refusal_eval.patching.exact import PairBatch, build_pair_batch
from refusal_eval.pipeline.inputs import Inputs, common_suffix
from refusal_eval.pipeline.scores import Scores, _gap
from refusal_eval.report import schema as rs


def _positions_wanted(config: AuditConfig, width: int, suffix: int) -> list[int | None]:
    wanted: set[int | None] = set()
    if "all" in config.positions:
        wanted.add(None)
    if "each" in config.positions:
        wanted.update(range(-width, 0))
    if "suffix" in config.positions:
        wanted.update(range(-suffix, 0))
    if "last" in config.positions:
        wanted.add(-1)
    return sorted(wanted, key=lambda p: (p is not None, p or 0))


@dataclass
class PatchPlan:
    """Stage output: the components to patch and the pair batches they are patched on. ``families`` are
    (component rows, pair columns, batch): one family, or under mixed alignment the components patched at the
    aligned suffix on every pair and the all-position ones (``on_full``) on the equal-length pairs
    (``full_cols``, whose gap is ``gap_full``)."""

    batch: PairBatch
    suffix: int
    components: list[Component]
    families: list[tuple[np.ndarray, list[int], PairBatch]]
    on_full: np.ndarray | None
    full_cols: list[int] | None
    gap_full: rs.Gap | None
    warnings: list[str]

    def subset(self, rows: Sequence[int]) -> PatchPlan:
        """The plan for the components ``rows`` (indices into ``components``, in that order) only: the same pairs
        and batches, each family keeping its own components."""
        index = {int(k): i for i, k in enumerate(rows)}
        families = [(np.array([index[int(k)] for k in fam_rows if int(k) in index], dtype=int), cols, batch)
                    for fam_rows, cols, batch in self.families]
        return replace(self, components=[self.components[int(k)] for k in rows], families=families,
                       on_full=None if self.on_full is None else self.on_full[np.asarray(rows, dtype=int)])

    def cells(self, ids: Sequence[str]) -> PatchPlan:
        """The plan for the components with these ids (another analysis's cells, e.g. the random-weights control
        patches the audit's); DataError naming an id the grid does not have."""
        index = {c.id: k for k, c in enumerate(self.components)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise DataError(f"component {missing[0]} is not in this audit's grid ({len(missing)} missing)")
        return self.subset([index[i] for i in ids])


def plan_stage(loaded: LoadedModel, inputs: Inputs, harmful_ids, benign_ids, scores: Scores,
               config: AuditConfig, tail: Sequence[int] = ()) -> PatchPlan:
    """Which components are patched on which pairs (see :class:`PatchPlan`), with the score's branch tokens
    (``tail``) after every prompt; DataError when none can be."""
    tok, pairs, used = loaded.tokenizer, inputs.pairs, scores.used
    warnings = []
    batch = build_pair_batch([(harmful_ids[i], benign_ids[i]) for i in used], tok.pad_token_id,
                             [pairs[i].id for i in used], allow_unequal=scores.alignment != "full", tail=tail)
    suffix = min(common_suffix(harmful_ids[i], benign_ids[i]) for i in used)
    full_cols = gap_full = None
    if scores.alignment == "mixed":
        full_cols = [k for k, i in enumerate(used) if len(harmful_ids[i]) == len(benign_ids[i])]
        span = max(suffix, 1)  # right-aligned positions every pair shares (the last one always)
        width = max((len(harmful_ids[used[k]]) for k in full_cols), default=span)
        components = components_at(config.components, loaded.n_layers, loaded.n_heads,
                                   _positions_wanted(config, width, span))
        on_full = np.array([c.position is None or c.position < -span for c in components])
        if len(full_cols) < 2:
            warnings.append(f"only {len(full_cols)} of {len(used)} pair(s) have sides of equal token length: the "
                            "all-position patches (and 'each' before the shared suffix) need at least 2 and are "
                            "left out")
            components = [c for c, f in zip(components, on_full, strict=True) if not f]
            on_full = np.zeros(len(components), dtype=bool)
        if not components:
            raise DataError("no component can be patched: add 'last' or 'suffix' to --positions")
        if on_full.any():
            gap_full = _gap(scores.gaps[full_cols], config)
            warnings.append(f"mixed alignment: {len(used) - len(full_cols)} of {len(used)} pairs have sides of "
                            f"unequal token length; {int(on_full.sum())} all-position component(s) use the "
                            f"{len(full_cols)} equal-length pairs, the other {int((~on_full).sum())} use every pair "
                            f"(right-aligned: the last {span} position(s))")
        families = [(np.flatnonzero(~on_full), list(range(len(used))), batch)]
        if on_full.any():
            full_batch = build_pair_batch([(harmful_ids[used[k]], benign_ids[used[k]]) for k in full_cols],
                                          tok.pad_token_id, [batch.pair_ids[k] for k in full_cols], tail=tail)
            families.append((np.flatnonzero(on_full), full_cols, full_batch))
    else:
        components = components_at(config.components, loaded.n_layers, loaded.n_heads,
                                   _positions_wanted(config, batch.prompt_width, suffix))
        on_full = None
        families = [(np.arange(len(components)), list(range(len(used))), batch)]
    return PatchPlan(batch, suffix, components, families, on_full, full_cols, gap_full, warnings)
