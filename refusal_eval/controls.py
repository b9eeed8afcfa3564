"""Controls that tell a refusal circuit from an artefact: a re-initialised copy of the model audited the same
way, the numerical noise floor of patching, components that are trivial by construction, and findings in words.

The label-permutation null (sign flips within pairs) lives in :func:`refusal_eval.stats.sign_flip_test`; the
audit applies it to the gap and to every component.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from refusal_eval.models.adapters import get_adapter
from refusal_eval.models.loading import LoadedModel
from refusal_eval.patching.components import Component
from refusal_eval.report import schema as rs

if TYPE_CHECKING:  # the audit imports this module
    from refusal_eval.audit import Analysis, Inputs
    from refusal_eval.config import AuditConfig


def trivial_reason(component: Component, n_layers: int) -> str | None:
    """Why a component's patch is the whole input or output of the run by construction (None if it is not).

    Such a patch moves the score by the whole gap (or by exactly what the prompt's own tokens do) whatever the
    model computes, so it checks the engine but says nothing about where refusal is computed."""
    kind, layer, position = component.kind, component.layer, component.position
    if kind in ("embed", "resid_pre") and position is None:
        return "the whole input of the layer at every position: the other run's entire residual stream"
    if kind == "resid_post" and layer == n_layers - 1 and position in (None, -1):
        return "the final residual stream at the scored position: the other run's output"
    if kind == "embed" or (kind == "resid_pre" and layer == 0):
        return "the token swap itself: the other prompt's token embedding at this position"
    return None


def last_position_finding(results: Sequence[rs.ComponentResult], level: float) -> list[str]:
    """In words: the first layer from which the last-position residual stream carries most of the gap (its
    share's CI lies above 0.5), from the ``resid_pre@-1`` components."""
    chain = sorted((c for c in results if c.kind == "resid_pre" and c.position == -1 and c.share is not None
                    and c.ci_low is not None), key=lambda c: c.layer)
    if not chain:
        return []
    pct = f"{level:.0%}"
    first = next((c for c in chain if c.ci_low > 0.5), None)
    if first is None:
        best = max(chain, key=lambda c: c.share or 0)
        return [f"At no layer does the residual stream at the last prompt token carry most of the gap: its largest "
                f"share is {best.share:.3f} ({pct} CI [{best.ci_low:.3f}, {best.ci_high:.3f}]) at layer {best.layer}, "
                "so the harmful signal reaches the scored position only after the last layer's input, or is spread."]
    before = [c for c in chain if c.layer < first.layer]
    text = (f"From layer {first.layer} on, the residual stream at the last prompt token carries most of the gap: "
            f"`{first.id}` has share {first.share:.3f} ({pct} CI [{first.ci_low:.3f}, {first.ci_high:.3f}])")
    if before:
        prev = before[-1]
        text += f", against {prev.share:.3f} [{prev.ci_low:.3f}, {prev.ci_high:.3f}] at layer {prev.layer}"
    return [text + ". The harmful signal has been moved to the scored position by then."]


def noise_floor_info(analysis: Analysis, config: AuditConfig) -> rs.NoiseFloor | None:
    """Summary of the identity-patch noise floor: the largest score change from patching each component with
    its own activation, in the audit's dtype and with the engine's shortcuts."""
    floor = analysis.floor
    if floor is None:
        return None
    largest = analysis.largest_effect
    return rs.NoiseFloor(
        dtype=config.dtype, max_abs=float(floor.max(initial=0.0)), median_abs=float(np.median(floor)) if floor.size
        else 0.0, n_within=int(((largest > 0) & (largest <= analysis.resolution.effect)).sum()),
        n_exact_zero=int((largest == 0).sum()),
    )


def reinitialised(loaded: LoadedModel, seed: int) -> LoadedModel:
    """A copy of the model with the same config and tokenizer and freshly initialised (seeded) weights."""
    torch.manual_seed(seed)
    param = next(loaded.model.parameters())
    model = AutoModelForCausalLM.from_config(loaded.model.config).to(dtype=param.dtype, device=param.device).eval()
    return LoadedModel(model, loaded.tokenizer, get_adapter(model), f"{loaded.name} (re-initialised)",
                       loaded.source, loaded.dtype, loaded.device)


def random_control(
    analysis: Analysis, inputs: Inputs, config: AuditConfig, analyse: Callable[..., Analysis], progress: bool
) -> rs.RandomControl:
    """The same audit (pairs, calibration, options) on a seeded re-initialised copy of the model.

    Shares are computed with the behaviour gate overridden, so the control also shows what the statistics
    alone would have claimed; ``n_significant`` applies the audit's own rules."""
    control = reinitialised(analysis.loaded, config.seed)
    forced = config.model_copy(update={"force_shares": True})
    result = analyse(control, inputs, forced, progress=progress, noise=False)
    under_rules = result.shares_defined and (result.refuses or config.force_shares)
    b = result.behaviour
    return rs.RandomControl(
        seed=config.seed, weights_sha256=control.weights_sha256(),
        harmful_refusal=b.harmful_refusal, benign_over_refusal=b.benign_over_refusal, refuses=result.refuses,
        gap=result.gap, gap_all_pairs=result.gap_all,
        refusal_tokens=[control.tokenizer.decode([t]) for t in result.token_sets.refusal],
        compliance_tokens=[control.tokenizer.decode([t]) for t in result.token_sets.compliance],
        shares_defined=under_rules, n_significant=result.n_significant if under_rules else 0,
        n_significant_forced=result.n_significant, n_components=len(result.components), score_validity=result.validity,
        n_permutation_p_below=int((result.permutation.p_familywise < 1 - config.ci_level).sum()),
    )
