"""Controls that tell a refusal circuit from an artefact: a re-initialised copy of the model audited the same
way, the numerical noise floor of patching, and findings in words (components trivial by construction:
:func:`refusal_eval.patching.components.trivial_reason`).

The label-permutation null (sign flips within pairs) lives in :func:`refusal_eval.stats.sign_flip_test`; the
audit applies it to the gap and to every component. The pieces here are pure: the re-initialised copy
(:func:`reinitialised`) is audited by :func:`refusal_eval.pipeline.audit.audit` itself, and :func:`random_control`
summarises that analysis for the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from refusal_eval.config import AuditConfig
from refusal_eval.models.adapters import get_adapter
from refusal_eval.models.loading import LoadedModel
from refusal_eval.pipeline.analysis import Analysis
from refusal_eval.pipeline.statistics import position_class
from refusal_eval.report import schema as rs
from refusal_eval.stats import share_heterogeneity, share_intervals


def last_position_finding(results: Sequence[rs.ComponentResult], gaps: np.ndarray, level: float,
                          n_resamples: int, method: str, seed: int) -> list[str]:
    """In words, from the ``resid_pre@-1`` components (the residual stream at the scored position, layer by layer):
    where its share rises most between two consecutive layers, with that step's bootstrap CI over pairs (the same
    resampling as the shares': ``gaps`` are the patched pairs' gaps, in the order of every component's ``effects``),
    and the first layer whose share's CI lies wholly above 0.5. Words follow the size of the numbers: a step whose
    CI includes 0 is not called a step."""
    chain = rs.last_position_chain(list(results))
    if not chain:
        return []
    pct = f"{level:.0%}"
    lines = []
    if len(chain) > 1:
        steps = [(b.share - a.share, a, b) for a, b in zip(chain, chain[1:], strict=False)]
        size, a, b = max(steps, key=lambda t: t[0])
        rows = np.array([[np.nan if e is None else e for e in c.effects] for c in (a, b)], dtype=np.float64)
        iv = share_intervals(rows[1] - rows[0], gaps, level, n_resamples, method, seed)
        low, high = float(iv.low[0]), float(iv.high[0])
        rise = chain[-1].share - chain[0].share
        where = (f"layers {a.layer} and {b.layer}: {size:+.3f} ({pct} CI [{low:.3f}, {high:.3f}]), from {a.share:.3f} "
                 f"to {b.share:.3f}")
        if low > 0:
            start = f"{chain[0].share:.3f}".replace("-0.000", "0.000")
            part = (f"; that step is {size / rise:.0%} of its rise from layer {chain[0].layer} ({start}) to layer "
                    f"{chain[-1].layer} ({chain[-1].share:.3f})" if rise > 0 and size <= rise else "")
            lines.append(f"The share of the residual stream at the last prompt token rises most between "
                         f"{where}{part}.")
        else:
            lines.append(f"No step between two layers is shown to raise the share of the residual stream at the last "
                         f"prompt token: the largest, between {where}, has a CI that includes 0.")
    first = next((c for c in chain if c.ci_low > 0.5), None)
    if first is None:
        best = max(chain, key=lambda c: c.share)
        lines.append(f"At no layer is its share shown to exceed 0.5: the largest is {best.share:.3f} ({pct} CI "
                     f"[{best.ci_low:.3f}, {best.ci_high:.3f}]) at layer {best.layer}.")
    else:
        lines.append(f"Its share's CI first lies wholly above 0.5 at layer {first.layer}: `{first.id}` "
                     f"{first.share:.3f} ({pct} CI [{first.ci_low:.3f}, {first.ci_high:.3f}]).")
    return [" ".join(lines)]


def heterogeneity(results: Sequence[rs.ComponentResult], gaps: np.ndarray, categories: Sequence[str],
                  pair_ids: Sequence[str], level: float, n_resamples: int, seed: int,
                  top_k: int = 10) -> list[rs.ComponentHeterogeneity]:
    """How the ``top_k`` largest writers' shares spread over pairs and categories (:func:`share_heterogeneity`), from
    the recorded per-pair effects (``gaps``, ``categories`` and ``pair_ids`` in their column order): a report's own
    numbers give it back. The residual stream carries everything at late layers by construction; attribution
    estimates have no intervals of their own, so their spread is not shown."""
    top = [c for c in rs.rank_writers(list(results)) if not c.approximate][:top_k]
    if not top:
        return []
    gaps = np.asarray(gaps, dtype=np.float64)
    categories, pair_ids = np.asarray(categories, dtype=object), np.asarray(pair_ids, dtype=object)
    effects = np.array([[np.nan if e is None else e for e in c.effects] for c in top], dtype=np.float64)
    patched = np.isfinite(effects)
    found: dict[int, tuple] = {}
    for group in {tuple(np.flatnonzero(row)) for row in patched}:  # components patched on the same pairs
        cols = list(group)
        rows = [k for k in range(len(top)) if tuple(np.flatnonzero(patched[k])) == group]
        diagnostics = share_heterogeneity(effects[np.ix_(rows, cols)], gaps[cols], categories[cols].tolist(), level,
                                          n_resamples, seed)
        found.update({k: (h, pair_ids[cols]) for k, h in zip(rows, diagnostics, strict=True)})
    out = []
    for k, c in enumerate(top):
        h, ids = found[k]
        out.append(rs.ComponentHeterogeneity(
            id=c.id,
            by_category={name: rs.CategoryShare(n_pairs=s.n_pairs, share=s.share, ci_low=s.ci_low, ci_high=s.ci_high)
                         for name, s in h.by_category.items()},
            loo_min=h.loo_min, loo_max=h.loo_max, largest_pair_fraction=h.largest_pair_fraction,
            largest_pair_id=None if h.largest_pair_index is None else str(ids[h.largest_pair_index]),
            ratio_quantiles=list(h.ratio_quantiles) if h.ratio_quantiles is not None else None,
            concentrated=h.concentrated,
        ))
    return out


def noise_floor_info(analysis: Analysis, config: AuditConfig) -> rs.NoiseFloor | None:
    """Summary of the identity-patch noise floor: the largest score change from patching a component with its own
    activation, in the audit's dtype and with the engine's shortcuts, over the components sampled
    (:func:`refusal_eval.pipeline.statistics.floor_sample`), and the bound the rules use."""
    if analysis.floor is None:
        return None
    measured = analysis.floor[~np.isnan(analysis.floor)]
    largest = analysis.largest_effect
    cells = config.noise_floor_cells
    strata = {(c.kind, c.layer, position_class(c.position)) for c, x in zip(analysis.components, largest, strict=True)
              if x > 0}
    return rs.NoiseFloor(
        dtype=config.dtype, max_abs=float(measured.max(initial=0.0)),
        median_abs=float(np.median(measured)) if measured.size else 0.0, n_measured=int(measured.size),
        cells_per_stratum=cells, n_strata=len(strata), bound=analysis.floor_bound,
        n_within=int(((largest > 0) & (largest <= analysis.resolution.effect)).sum()),
        n_exact_zero=int((largest == 0).sum()),
    )


def reinitialised(loaded: LoadedModel, seed: int) -> LoadedModel:
    """A copy of the model with the same config and tokenizer and freshly initialised (seeded) weights."""
    torch.manual_seed(seed)
    param = next(loaded.model.parameters())
    model = AutoModelForCausalLM.from_config(loaded.model.config).to(dtype=param.dtype, device=param.device).eval()
    return LoadedModel(model, loaded.tokenizer, get_adapter(model), f"{loaded.name} (re-initialised)",
                       loaded.source, loaded.dtype, loaded.device)


def random_control(control: Analysis, config: AuditConfig) -> rs.RandomControl:
    """The random-weights control's section of the report, from the same audit (pairs, calibration, options) on a
    seeded re-initialised copy of the model (``control``: :func:`refusal_eval.pipeline.audit.random_analysis`).

    Shares are computed with the behaviour gate overridden, so the control also shows what the statistics
    alone would have claimed; ``n_significant`` applies the audit's own rules (``config``: the audit's)."""
    under_rules = control.shares_defined and (control.refuses or config.force_shares)
    b, model = control.behaviour, control.loaded
    return rs.RandomControl(
        seed=config.seed, weights_sha256=model.weights_sha256(),
        harmful_refusal=b.harmful_refusal, benign_over_refusal=b.benign_over_refusal, refuses=control.refuses,
        gap=control.gap, gap_all_pairs=control.gap_all,
        refusal_tokens=[model.tokenizer.decode([t]) for t in control.token_sets.refusal],
        compliance_tokens=[model.tokenizer.decode([t]) for t in control.token_sets.compliance],
        shares_defined=under_rules, n_significant=control.n_significant if under_rules else 0,
        n_significant_forced=control.n_significant, n_components=len(control.components),
        score_validity=control.validity,
        n_permutation_p_below=int((control.permutation.p_familywise < 1 - config.ci_level).sum()),
    )
