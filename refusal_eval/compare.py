"""Compare two audit reports of the same kind (e.g. a checkpoint before and after fine-tuning).

For every component present in both reports: its share of the refusal gap in A and in B and the change
B − A with a bootstrap CI over pairs plus a family-wise (max-t) band over all components. When both audits
used the same pair file, the shares are recomputed on the pairs both used and the bootstrap is **paired**
(the same resampled pairs for A and B, so pair difficulty cancels); otherwise A's and B's pairs are
resampled independently. Behaviour rates, per-category refusal rates and the gap are compared too.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from refusal_eval.paths import command_line
from refusal_eval.report.comparison_markdown import render_comparison_markdown, summary_lines  # noqa: F401
from refusal_eval.report.comparison_schema import (  # noqa: F401  (re-exported: the schema lived here)
    BEHAVIOUR_METHOD,
    COMPARISON_SCHEMA_VERSION,
    CategoryChange,
    ComparisonReport,
    ComparisonStats,
    ComponentChange,
    DirectionChange,
    GapChange,
    RateChange,
    Side,
    comparison_json_schema,
    load_comparison,
)
from refusal_eval.report.plots import comparison_picture, render_pictures
from refusal_eval.report.schema import AuditReport, Rate, direction_cosine, rank_key
from refusal_eval.report.writers import write_with_pictures
from refusal_eval.stats import (  # noqa: F401  (newcombe_difference, mcnemar_exact: re-exported)
    Resolution,
    fisher_exact_2x2,
    holm,
    mcnemar_exact,
    mean_interval,
    newcombe_difference,
    resolution,
    share_difference_intervals,
    two_sample_mean_difference,
)

# -- statistics: share_difference_intervals, newcombe_difference, mcnemar_exact live in stats.py --


def _rate_change(measure: str, a: Rate, b: Rate, level: float, outcomes: tuple[list[bool], list[bool]] | None
                 ) -> RateChange:
    d, lo, hi = newcombe_difference(a.successes, a.total, b.successes, b.total, level)
    ok = np.isfinite(d)
    change = RateChange(measure=measure, a=a, b=b, diff=float(d) if ok else None, ci_low=float(lo) if ok else None,
                        ci_high=float(hi) if ok else None, significant=bool(lo > 0 or hi < 0) if ok else None,
                        paired=outcomes is not None)
    if outcomes is not None:
        xa, xb = outcomes
        change.a_only = sum(x and not y for x, y in zip(xa, xb, strict=True))
        change.b_only = sum(y and not x for x, y in zip(xa, xb, strict=True))
        change.mcnemar_p = mcnemar_exact(change.a_only, change.b_only)
    return change


def _direction_change(a: AuditReport, b: AuditReport, level: float) -> DirectionChange | None:
    """The refusal directions of A and B: their cosine and the change of the refusal left after ablation (None where
    neither report has the section)."""
    da, db = a.refusal_direction, b.refusal_direction
    if da is None and db is None:
        return None
    cosine, reason = direction_cosine(a, b)
    both = da is not None and db is not None and da.computed and db.computed
    after = (_rate_change("refusal on harmful with the direction ablated", da.refusal_after_ablation,
                          db.refusal_after_ablation, level, None) if both else None)
    words = (f"cosine between A's and B's refusal directions {cosine:.3f} (A: layer {da.layer}, position "
             f"{da.position}; B: layer {db.layer}, position {db.position})" if cosine is not None else
             f"no cosine between the refusal directions: {reason}")
    if after is not None:
        words += (f"; refusal left after ablating each model's own direction {after.a.successes}/{after.a.total} → "
                  f"{after.b.successes}/{after.b.total}")
        if after.diff is not None:
            words += (f" ({100 * after.diff:+.1f} pp, {level:.0%} CI [{100 * after.ci_low:+.1f}, "
                      f"{100 * after.ci_high:+.1f}])")
    return DirectionChange(layer_a=da.layer if da else None, position_a=da.position if da else None,
                           layer_b=db.layer if db else None, position_b=db.position if db else None, cosine=cosine,
                           reason=reason, refusal_after_ablation=after, words=words)


def _side(r: AuditReport) -> Side:
    return Side(
        name=r.model.name, source=r.model.source, weights_sha256=r.model.weights_sha256, report_created=r.created,
        command=r.command, dataset_path=r.dataset.path, dataset_sha256=r.dataset.sha256, split=r.dataset.split,
        tricky_sha256=r.dataset.tricky_sha256, n_pairs=r.dataset.n_pairs, n_used=r.dataset.n_used,
        direction=r.direction, metric=r.metric.form, refusal_tokens=[t.text for t in r.metric.refusal_tokens],
        compliance_tokens=[t.text for t in r.metric.compliance_tokens], score_depth=r.metric.depth,
        branches=[b.token.text for b in r.metric.branches], gap=r.gap,
        shares_defined=r.gap.separated and all(c.share is not None for c in r.components),
    )


def _effects_matrix(components) -> np.ndarray:
    """Per-pair effects [C, N]; NaN where a component was not patched on a pair (mixed alignment)."""
    return np.array([[np.nan if v is None else v for v in c.effects] for c in components], dtype=np.float64)


def _resolution(r: AuditReport, gaps: np.ndarray) -> Resolution:
    """What float rounding could move in this report (from its noise floor, where measured), on these pairs."""
    floor = r.controls.noise_floor
    return resolution(gaps, None if floor is None else floor.rule_bound)


def _gaps(r: AuditReport, ids: list[str]) -> np.ndarray:
    by_id = {p.id: p for p in r.pairs}
    return np.array([by_id[i].m_harmful - by_id[i].m_benign for i in ids], dtype=np.float64)


# -- the comparison -----------------------------------------------------------------------------------------


def compare_reports(a: AuditReport, b: AuditReport, n_boot: int = 2000, level: float = 0.95, method: str = "BCa",
                    seed: int = 0, min_diff: float = 1e-4, command: str = "") -> ComparisonReport:
    """Compare audit B with audit A (B − A): component shares, behaviour, per-category refusal and the gap."""
    warnings: list[str] = []
    same_dataset = a.dataset.sha256 == b.dataset.sha256
    used_b = set(b.used_pair_ids)
    common = [i for i in a.used_pair_ids if i in used_b] if same_dataset else []
    paired = same_dataset and len(common) >= 2
    if not same_dataset:
        warnings.append(
            f"UNPAIRED: the reports audited different pair files (A {a.dataset.sha256[:12]}…, B "
            f"{b.dataset.sha256[:12]}…); share changes use independent resampling of A's and B's pairs, so "
            "differences in which prompts were asked add to the uncertainty and may drive the change"
        )
    elif not paired:
        warnings.append(
            f"UNPAIRED: the reports share only {len(common)} used pair(s); share changes use independent "
            "resampling of A's and B's pairs"
        )
    used_a = set(a.used_pair_ids)
    only_a = [i for i in a.used_pair_ids if i not in used_b] if same_dataset else []
    only_b = [i for i in b.used_pair_ids if i not in used_a] if same_dataset else []
    if paired and (only_a or only_b):
        reason_b = {e.pair_id: e.reason for e in b.dataset.exclusions}
        reason_a = {e.pair_id: e.reason for e in a.dataset.exclusions}
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} pair(s) used in A are not used in B ("
                         + ", ".join(f"{i}: {reason_b.get(i, 'not in B')}" for i in only_a[:12])
                         + (", …" if len(only_a) > 12 else "") + ")")
        if only_b:
            parts.append(f"{len(only_b)} pair(s) used in B are not used in A ("
                         + ", ".join(f"{i}: {reason_a.get(i, 'not in A')}" for i in only_b[:12])
                         + (", …" if len(only_b) > 12 else "") + ")")
        warnings.append("; ".join(parts) + f". Shares of both models are recomputed on the {len(common)} pairs "
                        "both used, so they can differ from the reports' own shares")
    if a.direction != b.direction:
        warnings.append(f"the audits patched in different directions (A {a.direction}, B {b.direction}): their "
                        "shares measure different things")
    if a.metric.form != b.metric.form:
        warnings.append(f"the audits used different refusal scores (A {a.metric.form}, B {b.metric.form})")
    comparable = a.metric.tree_key() == b.metric.tree_key()
    not_comparable = None
    if not comparable:
        def texts(r: AuditReport) -> str:
            branches = "".join(f"; {b.token.text!r} branched: refusal {[t.text for t in b.refusal_tokens]}, compliance "
                               f"{[t.text for t in b.compliance_tokens]}" for b in r.metric.branches)
            return (f"{r.metric.form}, depth {r.metric.depth}: refusal {[t.text for t in r.metric.refusal_tokens]}, "
                    f"compliance {[t.text for t in r.metric.compliance_tokens]}{branches}")

        not_comparable = (f"A and B measure refusal with different scores (A: {texts(a)}; B: {texts(b)}), so their "
                          "gaps and shares cannot be subtracted. Audit both in one run (`refusal-eval run --model A "
                          "--model B`, with their --adapter), which scores every model with one opening tree built "
                          "from all their calibration replies")
        warnings.append(f"NOT COMPARABLE: {not_comparable}")
    if a.model.weights_sha256 == b.model.weights_sha256:
        warnings.append("A and B have identical weights")

    # -- components ------------------------------------------------------------------------------------------
    side_a, side_b = _side(a), _side(b)
    shares_defined = side_a.shares_defined and side_b.shares_defined
    for tag, side in (("A", side_a), ("B", side_b)):
        if not side.shares_defined:
            warnings.append(
                f"UNDEFINED SHARES in {tag} ({side.name}): its gap {side.gap.mean:.3f} [{side.gap.ci_low:.3f}, "
                f"{side.gap.ci_high:.3f}] is not separated from 0, so share changes are undefined; only behaviour "
                "and the gap are compared"
            )
    ids_b = {c.id for c in b.components}
    ids_a = {c.id for c in a.components}
    shared = [c for c in a.components if c.id in ids_b]
    comp_b = {c.id: c for c in b.components}
    if paired:
        pos_a = {i: k for k, i in enumerate(a.used_pair_ids)}
        pos_b = {i: k for k, i in enumerate(b.used_pair_ids)}
        ia, ib = [pos_a[i] for i in common], [pos_b[i] for i in common]
        ga, gb = _gaps(a, common), _gaps(b, common)
    else:
        ia, ib = list(range(len(a.used_pair_ids))), list(range(len(b.used_pair_ids)))
        ga, gb = _gaps(a, a.used_pair_ids), _gaps(b, b.used_pair_ids)
    changes: list[ComponentChange] = []
    if shares_defined and shared and comparable:
        res_a, res_b = _resolution(a, ga), _resolution(b, gb)
        ea = _effects_matrix(shared)[:, ia]
        eb = _effects_matrix([comp_b[c.id] for c in shared])[:, ib]
        res = share_difference_intervals(ea, ga, eb, gb, paired, level, n_boot, method, seed,
                                         resolution_a=res_a, resolution_b=res_b)
        margin = max(res_a.share, res_b.share)
        # An attribution estimate (either side) is a point estimate of unknown error: never a significant change.
        estimated = {c.id for c in shared if c.approximate or comp_b[c.id].approximate}
        if estimated:
            warnings.append(
                f"{len(estimated)} of {len(shared)} compared component(s) are attribution estimates in A or B (not "
                "patched exactly): their share changes are listed but never called significant; audit both with "
                "--method exact to test them"
            )
        for k, c in enumerate(shared):
            d = float(res["diff"][k])
            changes.append(ComponentChange(
                id=c.id, kind=c.kind, layer=c.layer, head=c.head, position=c.position,
                share_a=float(res["share_a"][k]), share_a_low=float(res["share_a_low"][k]),
                share_a_high=float(res["share_a_high"][k]), share_b=float(res["share_b"][k]),
                share_b_low=float(res["share_b_low"][k]), share_b_high=float(res["share_b_high"][k]),
                diff=d, ci_low=float(res["diff_low"][k]), ci_high=float(res["diff_high"][k]),
                fw_low=float(res["fw_low"][k]), fw_high=float(res["fw_high"][k]),
                significant=bool((res["fw_low"][k] > margin or res["fw_high"][k] < -margin) and abs(d) >= min_diff
                                 and res["measured"][k] and c.id not in estimated), rank=None,
            ))
        ranked = sorted((c for c in changes if c.significant), key=lambda c: rank_key(c.diff))
        for r, c in enumerate(ranked, 1):
            c.rank = r
        ranking = [c.id for c in ranked]
    else:
        ranking = []

    # -- gap -------------------------------------------------------------------------------------------------
    if not comparable:
        gap = GapChange(n_pairs_a=len(ga), n_pairs_b=len(gb), mean_a=float(ga.mean()), mean_b=float(gb.mean()),
                        diff=None, ci_low=None, ci_high=None, method="not comparable: A and B use different scores")
    elif paired:
        ci = mean_interval(gb - ga, level, n_boot, method, seed)
        gap = GapChange(n_pairs_a=len(ga), n_pairs_b=len(gb), mean_a=float(ga.mean()), mean_b=float(gb.mean()),
                        diff=float(ci.estimate), ci_low=float(ci.low), ci_high=float(ci.high),
                        method=f"paired {method} bootstrap of the mean per-pair gap change over the common pairs")
    else:
        d = float(gb.mean() - ga.mean())
        lo, hi = two_sample_mean_difference(ga, gb, level, n_boot, method, seed)
        gap = GapChange(n_pairs_a=len(ga), n_pairs_b=len(gb), mean_a=float(ga.mean()), mean_b=float(gb.mean()),
                        diff=d, ci_low=lo, ci_high=hi,
                        method=f"two-sample {method} bootstrap of the difference of mean gaps (used pairs of each)")

    # -- behaviour -------------------------------------------------------------------------------------------
    pa, pb = {p.id: p for p in a.pairs}, {p.id: p for p in b.pairs}
    same_prompts = same_dataset and a.dataset.split == b.dataset.split and [p.id for p in a.pairs] == [
        p.id for p in b.pairs]
    behaviour: list[RateChange] = []
    if same_prompts:
        ids = [p.id for p in a.pairs]
        for measure, get in (("refusal on harmful", lambda p: p.harmful_refused),
                             ("compliance on benign", lambda p: not p.benign_refused)):
            xa, xb = [get(pa[i]) for i in ids], [get(pb[i]) for i in ids]
            behaviour.append(_rate_change(measure, Rate.wilson(sum(xa), len(xa), level),
                                          Rate.wilson(sum(xb), len(xb), level), level, (xa, xb)))
    else:
        behaviour.append(_rate_change("refusal on harmful", a.behaviour.harmful_refusal,
                                      b.behaviour.harmful_refusal, level, None))
        behaviour.append(_rate_change("compliance on benign", a.behaviour.benign_compliance,
                                      b.behaviour.benign_compliance, level, None))
    for measure, key in (("over-refusal on tricky benign", "tricky_benign_over_refusal"),
                         ("refusal on tricky harmful", "tricky_harmful_refusal")):
        ra, rb = getattr(a.behaviour, key), getattr(b.behaviour, key)
        if ra is not None and rb is not None:
            behaviour.append(_rate_change(measure, ra, rb, level, None))
    if (a.behaviour.tricky_benign_over_refusal is not None and b.behaviour.tricky_benign_over_refusal is not None
            and a.dataset.tricky_sha256 != b.dataset.tricky_sha256):
        warnings.append("the tricky-benign rates come from different tricky files")

    # -- per category ----------------------------------------------------------------------------------------
    cats: dict[str, dict[str, list]] = defaultdict(lambda: {"a": [], "b": []})
    for p in a.pairs:
        cats[p.category]["a"].append(p)
    for p in b.pairs:
        cats[p.category]["b"].append(p)
    categories: list[CategoryChange] = []
    for cat in sorted(cats):
        la, lb = cats[cat]["a"], cats[cat]["b"]
        if not (la and lb):
            continue
        ra, rb = sum(p.harmful_refused for p in la), sum(p.harmful_refused for p in lb)
        d, lo, hi = newcombe_difference(ra, len(la), rb, len(lb), level)
        change = CategoryChange(
            category=cat, n_a=len(la), n_b=len(lb), refused_a=ra, refused_b=rb, rate_a=ra / len(la),
            rate_b=rb / len(lb), diff=d, ci_low=lo, ci_high=hi, significant=bool(lo > 0 or hi < 0),
            gap_a=_mean_gap(la), gap_b=_mean_gap(lb), used_a=sum(p.used for p in la), used_b=sum(p.used for p in lb),
        )
        if same_prompts:
            xa = [p.harmful_refused for p in la]
            xb = [pb[p.id].harmful_refused for p in la]
            change.a_only = sum(x and not y for x, y in zip(xa, xb, strict=True))
            change.b_only = sum(y and not x for x, y in zip(xa, xb, strict=True))
            change.mcnemar_p = mcnemar_exact(change.a_only, change.b_only)
        change.test = "mcnemar" if same_prompts else "fisher"
        change.p_value = change.mcnemar_p if same_prompts else fisher_exact_2x2(ra, len(la), rb, len(lb))
        categories.append(change)
    # One family: a category is called changed only when its Holm-adjusted p clears the level.
    for change, adjusted in zip(categories, holm([k.p_value for k in categories]), strict=True):
        change.p_holm = float(adjusted)
        change.changed = bool(adjusted < 1 - level)

    return ComparisonReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command, a=side_a, b=side_b,
        same_dataset=same_dataset, paired=paired, n_pairs=len(ga), n_pairs_b=len(gb),
        compared_pair_ids=common if paired else [], used_only_in_a=only_a, used_only_in_b=only_b,
        shares_defined=shares_defined, comparable=comparable, not_comparable=not_comparable,
        stats=ComparisonStats(
            method=method, level=level, n_resamples=n_boot, seed=seed, n_components=len(changes), min_diff=min_diff,
            resampling="paired: one draw of the common pairs per resample for both A and B" if paired
            else "unpaired: A's and B's used pairs drawn independently (two-sample bootstrap)",
        ),
        gap=gap, behaviour=behaviour, categories=categories, components=changes, ranking=ranking,
        components_only_in_a=[c.id for c in a.components if c.id not in ids_b],
        components_only_in_b=[c.id for c in b.components if c.id not in ids_a],
        warnings=warnings, refusal_direction=_direction_change(a, b, level),
    )


def _mean_gap(pairs: list) -> float | None:
    values = [p.m_harmful - p.m_benign for p in pairs if p.m_harmful is not None and p.m_benign is not None]
    return float(np.mean(values)) if values else None


# -- writing (rendering: report/comparison_markdown.py) ----------------------------------------------------


def write_comparison(c: ComparisonReport, out_dir: str | Path, pictures: bool = True) -> tuple[Path, Path]:
    """Write comparison.json, comparison.md and (``pictures``) the B − A PNGs under out_dir together, and return
    the paths of the JSON and the Markdown."""
    folder = Path(out_dir)
    json_path, md_path = folder / "comparison.json", folder / "comparison.md"
    drawn = render_pictures(comparison_picture(c)) if pictures else {}
    write_with_pictures({json_path: c.model_dump_json(indent=1) + "\n",
                         md_path: render_comparison_markdown(c, pictures=drawn)}, drawn)
    return json_path, md_path


def default_comparison_dir(c: ComparisonReport, root: str | Path = "reports") -> Path:
    return Path(root) / f"comparison-{c.a.name}-vs-{c.b.name}"


def compare_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Handler of ``refusal-eval compare A.json B.json``."""
    import sys

    from refusal_eval.errors import ConfigError
    from refusal_eval.report.kinds import load_report
    from refusal_eval.report.writers import check_writable

    if args.n_boot < 100:
        raise ConfigError(f"--n-boot {args.n_boot}: use at least 100 bootstrap resamples (2000 is the default)")
    if not 0.5 < args.ci_level < 1:
        raise ConfigError(f"--ci-level {args.ci_level}: give a level between 0.5 and 1, e.g. 0.95")
    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed}: seeds are integers >= 0")
    a, b = load_report(args.report_a), load_report(args.report_b)
    check_writable(args.out or "reports", "--out")
    c = compare_reports(a, b, n_boot=args.n_boot, level=args.ci_level, method=args.ci_method, seed=args.seed,
                        command=command_line(argv))
    json_path, md_path = write_comparison(c, args.out or default_comparison_dir(c), pictures=not args.no_pictures)
    print("\n".join(summary_lines(c)))
    for w in c.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {json_path}\nwrote {md_path}")
    return 0
