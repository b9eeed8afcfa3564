"""Compare two audit reports of the same kind (e.g. a checkpoint before and after fine-tuning).

For every component present in both reports: its share of the refusal gap in A and in B and the change
B − A with a bootstrap CI over pairs plus a family-wise (max-t) band over all components. When both audits
used the same pair file, the shares are recomputed on the pairs both used and the bootstrap is **paired**
(the same resampled pairs for A and B, so pair difficulty cancels); otherwise A's and B's pairs are
resampled independently. Behaviour rates, per-category refusal rates and the gap are compared too.
"""

from __future__ import annotations

import argparse
import shlex
import warnings as _warnings
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import stats as sps

from refusal_eval.report.comparison_schema import (  # noqa: F401  (re-exported: the schema lived here)
    BEHAVIOUR_METHOD,
    COMPARISON_SCHEMA_VERSION,
    CategoryChange,
    ComparisonReport,
    ComparisonStats,
    ComponentChange,
    GapChange,
    RateChange,
    Side,
    comparison_json_schema,
    load_comparison,
)
from refusal_eval.report.plots import comparison_picture, markdown_section, render_pictures
from refusal_eval.report.schema import AuditReport, Rate
from refusal_eval.report.writers import write_with_pictures
from refusal_eval.stats import _counts, _max_t_band, mean_interval, wilson_interval

# -- statistics ---------------------------------------------------------------------------------------------


def _bootstrap_rows(data: tuple, statistic, n_rows: int, level: float, n_resamples: int, method: str,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scipy.stats.bootstrap of a vector statistic [n_rows]; BCa falls back to percentile where undefined."""
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")  # degenerate rows surface as NaN, handled below
        result = sps.bootstrap(
            data, statistic, n_resamples=n_resamples, batch=max(1, min(n_resamples, 2_000_000 // max(1, n_rows))),
            vectorized=True, paired=False, confidence_level=level, method=method, rng=np.random.default_rng(seed),
        )
    low = np.atleast_1d(np.asarray(result.confidence_interval.low, dtype=np.float64)).copy()
    high = np.atleast_1d(np.asarray(result.confidence_interval.high, dtype=np.float64)).copy()
    dist = np.atleast_2d(result.bootstrap_distribution)
    bad = ~(np.isfinite(low) & np.isfinite(high))
    if bad.any():
        tail = (1 - level) / 2
        low[bad] = np.quantile(dist[bad], tail, axis=-1)
        high[bad] = np.quantile(dist[bad], 1 - tail, axis=-1)
    return low, high, dist


def share_difference_intervals(
    effects_a: np.ndarray, gaps_a: np.ndarray, effects_b: np.ndarray, gaps_b: np.ndarray, paired: bool,
    level: float = 0.95, n_resamples: int = 2000, method: str = "BCa", seed: int = 0,
) -> dict[str, np.ndarray]:
    """Shares in A and B and their difference B − A, with bootstrap CIs, for C components at once.

    effects_a [C, nA], gaps_a [nA], effects_b [C, nB], gaps_b [nB]. ``paired`` (nA == nB, same pairs in the
    same order): one draw of pair indices per resample serves A and B, as ``scipy.stats.bootstrap(...,
    paired=True)`` would; otherwise A's and B's pairs are drawn independently (two-sample bootstrap).
    Resampled indices become count weights (``stats._counts``), so each resample costs two matrix products.
    Returns arrays keyed share_a, share_a_low, share_a_high, share_b*, diff, ci_low, ci_high, fw_low, fw_high.
    """
    ea, eb = np.atleast_2d(np.asarray(effects_a, np.float64)), np.atleast_2d(np.asarray(effects_b, np.float64))
    ga, gb = np.asarray(gaps_a, np.float64), np.asarray(gaps_b, np.float64)
    na, nb = ga.shape[0], gb.shape[0]
    if ea.shape != (ea.shape[0], na) or eb.shape != (ea.shape[0], nb):
        raise ValueError(f"effects {ea.shape}/{eb.shape} do not match gaps ({na}, {nb})")
    if paired and na != nb:
        raise ValueError("a paired comparison needs the same pairs on both sides")
    # NaN effects: pairs a component was not patched on (mixed alignment); they count in neither its effect nor
    # its gap sums, so every component has its own gap columns.
    ma, mb = np.isfinite(ea), np.isfinite(eb)
    ea, eb = np.where(ma, ea, 0.0), np.where(mb, eb, 0.0)
    masked = not (ma.all() and mb.all())
    Ga, Gb = (ma * ga).T, (mb * gb).T  # [n, C]
    sa, sb = (ea.sum(1) / Ga.sum(0), eb.sum(1) / Gb.sum(0)) if masked else (ea.sum(1) / ga.sum(), eb.sum(1) / gb.sum())
    out = {"share_a": sa, "share_b": sb, "diff": sb - sa}
    for key in ("share_a", "share_b", "diff"):
        out[key + "_low"], out[key + "_high"] = out[key].copy(), out[key].copy()
    out["fw_low"], out["fw_high"] = out["diff"].copy(), out["diff"].copy()
    # Rows that cannot vary: a share whose effects are all 0 is 0 in every resample; with paired identical
    # inputs the difference is exactly 0 in every resample.
    va = np.flatnonzero(~np.all(ea == 0.0, axis=1))
    vb = np.flatnonzero(~np.all(eb == 0.0, axis=1))
    same = paired and np.array_equal(ga, gb) and np.array_equal(ma, mb)
    vd = np.flatnonzero(~(np.all(ea == eb, axis=1) if same else np.zeros(ea.shape[0], bool)) &
                        ~(np.all(ea == 0.0, axis=1) & np.all(eb == 0.0, axis=1)))
    if (min(na, nb) < 2) or not (va.size or vb.size or vd.size):
        return out
    A, B, Ad, Bd = ea[va].T, eb[vb].T, ea[vd].T, eb[vd].T

    def rows(wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
        if masked:
            da, db = (wa @ Ga[:, va], wb @ Gb[:, vb]), (wa @ Ga[:, vd], wb @ Gb[:, vd])
        else:
            one_a, one_b = (wa @ ga)[..., None], (wb @ gb)[..., None]
            da, db = (one_a, one_b), (one_a, one_b)
        stacked = np.concatenate([(wa @ A) / da[0], (wb @ B) / da[1], (wb @ Bd) / db[1] - (wa @ Ad) / db[0]],
                                 axis=-1)
        return np.moveaxis(stacked, -1, 0)

    if paired:
        def statistic(idx, axis=-1):
            w = _counts(np.asarray(idx), na)
            return rows(w, w)
        data: tuple = (np.arange(na),)
    else:
        def statistic(ia, ib, axis=-1):
            return rows(_counts(np.asarray(ia), na), _counts(np.asarray(ib), nb))
        data = (np.arange(na), np.arange(nb))
    n_rows = va.size + vb.size + vd.size
    low, high, dist = _bootstrap_rows(data, statistic, n_rows, level, n_resamples, method, seed)
    parts = np.cumsum([0, va.size, vb.size, vd.size])
    for key, index, k in (("share_a", va, 0), ("share_b", vb, 1), ("diff", vd, 2)):
        sl = slice(parts[k], parts[k + 1])
        out[key + "_low"][index], out[key + "_high"][index] = low[sl], high[sl]
    d_dist = dist[parts[2]:]
    if vd.size:
        out["fw_low"][vd], out["fw_high"][vd] = _max_t_band(out["diff"][vd], d_dist, level)
    return out


def newcombe_difference(s_a: int, n_a: int, s_b: int, n_b: int, level: float = 0.95) -> tuple[float, float, float]:
    """Rate difference B − A with Newcombe's hybrid-score (method 10) interval from two Wilson intervals."""
    if n_a == 0 or n_b == 0:
        return float("nan"), float("nan"), float("nan")
    pa, pb = s_a / n_a, s_b / n_b
    la, ua = wilson_interval(s_a, n_a, level)
    lb, ub = wilson_interval(s_b, n_b, level)
    d = pb - pa
    return d, d - float(np.hypot(pb - lb, ua - pa)), d + float(np.hypot(ub - pb, pa - la))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact McNemar test: two-sided binomial test of the discordant counts against 1/2."""
    if a_only + b_only == 0:
        return 1.0
    return float(sps.binomtest(b_only, a_only + b_only, 0.5).pvalue)


def _rate(successes: int, total: int, level: float) -> Rate:
    low, high = wilson_interval(successes, total, level)
    return Rate(successes=successes, total=total, rate=successes / total if total else None,
                ci_low=None if np.isnan(low) else low, ci_high=None if np.isnan(high) else high)


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


def _side(r: AuditReport) -> Side:
    return Side(
        name=r.model.name, source=r.model.source, weights_sha256=r.model.weights_sha256, report_created=r.created,
        command=r.command, dataset_path=r.dataset.path, dataset_sha256=r.dataset.sha256, split=r.dataset.split,
        tricky_sha256=r.dataset.tricky_sha256, n_pairs=r.dataset.n_pairs, n_used=r.dataset.n_used,
        direction=r.direction, metric=r.metric.form, refusal_tokens=[t.text for t in r.metric.refusal_tokens],
        compliance_tokens=[t.text for t in r.metric.compliance_tokens], gap=r.gap,
        shares_defined=r.gap.separated and all(c.share is not None for c in r.components),
    )


def _effects_matrix(components) -> np.ndarray:
    """Per-pair effects [C, N]; NaN where a component was not patched on a pair (mixed alignment)."""
    return np.array([[np.nan if v is None else v for v in c.effects] for c in components], dtype=np.float64)


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
    toks_a = ([t.id for t in a.metric.refusal_tokens], [t.id for t in a.metric.compliance_tokens])
    toks_b = ([t.id for t in b.metric.refusal_tokens], [t.id for t in b.metric.compliance_tokens])
    if toks_a != toks_b:
        def texts(r: AuditReport) -> str:
            return (f"refusal {[t.text for t in r.metric.refusal_tokens]}, compliance "
                    f"{[t.text for t in r.metric.compliance_tokens]}")

        warnings.append(f"the refusal score's token sets differ (A: {texts(a)}; B: {texts(b)}): each audit derives "
                        "them from its model's own greedy replies, so the score is defined slightly differently")
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
    if shares_defined and shared:
        ea = _effects_matrix(shared)[:, ia]
        eb = _effects_matrix([comp_b[c.id] for c in shared])[:, ib]
        res = share_difference_intervals(ea, ga, eb, gb, paired, level, n_boot, method, seed)
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
                significant=bool((res["fw_low"][k] > 0 or res["fw_high"][k] < 0) and abs(d) >= min_diff
                                 and c.id not in estimated), rank=None,
            ))
        ranked = sorted((c for c in changes if c.significant), key=lambda c: -abs(c.diff))
        for r, c in enumerate(ranked, 1):
            c.rank = r
        ranking = [c.id for c in ranked]
    else:
        ranking = []

    # -- gap -------------------------------------------------------------------------------------------------
    if paired:
        ci = mean_interval(gb - ga, level, n_boot, method, seed)
        gap = GapChange(n_pairs_a=len(ga), n_pairs_b=len(gb), mean_a=float(ga.mean()), mean_b=float(gb.mean()),
                        diff=float(ci.estimate), ci_low=float(ci.low), ci_high=float(ci.high),
                        method=f"paired {method} bootstrap of the mean per-pair gap change over the common pairs")
    else:
        d = float(gb.mean() - ga.mean())
        lo = hi = d
        if len(ga) >= 2 and len(gb) >= 2:
            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                r2 = sps.bootstrap((ga, gb), lambda x, y, axis=-1: y.mean(axis) - x.mean(axis), n_resamples=n_boot,
                                   confidence_level=level, method=method, rng=np.random.default_rng(seed))
            lo, hi = float(r2.confidence_interval.low), float(r2.confidence_interval.high)
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
            behaviour.append(_rate_change(measure, _rate(sum(xa), len(xa), level), _rate(sum(xb), len(xb), level),
                                          level, (xa, xb)))
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
        categories.append(change)

    return ComparisonReport(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command, a=side_a, b=side_b,
        same_dataset=same_dataset, paired=paired, n_pairs=len(ga), n_pairs_b=len(gb),
        compared_pair_ids=common if paired else [], used_only_in_a=only_a, used_only_in_b=only_b,
        shares_defined=shares_defined,
        stats=ComparisonStats(
            method=method, level=level, n_resamples=n_boot, seed=seed, n_components=len(changes), min_diff=min_diff,
            resampling="paired: one draw of the common pairs per resample for both A and B" if paired
            else "unpaired: A's and B's used pairs drawn independently (two-sample bootstrap)",
        ),
        gap=gap, behaviour=behaviour, categories=categories, components=changes, ranking=ranking,
        components_only_in_a=[c.id for c in a.components if c.id not in ids_b],
        components_only_in_b=[c.id for c in b.components if c.id not in ids_a],
        warnings=warnings,
    )


def _mean_gap(pairs: list) -> float | None:
    values = [p.m_harmful - p.m_benign for p in pairs if p.m_harmful is not None and p.m_benign is not None]
    return float(np.mean(values)) if values else None


# -- rendering and writing ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _pp(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} pp"


def _ci_pp(lo: float | None, hi: float | None) -> str:
    return "–" if lo is None or hi is None else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _f(value: float, digits: int = 3) -> str:
    text = f"{value:+.{digits}f}"
    return text.replace("-0." + "0" * digits, "+0." + "0" * digits)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def render_comparison_markdown(c: ComparisonReport, top_k: int = 15, pictures: Iterable[str] = ()) -> str:
    """The comparison as a Markdown page: summary, behaviour, categories, gap, share changes, identity."""
    level = f"{c.stats.level:.0%}"
    lines = [f"# Checkpoint comparison: {c.a.name} → {c.b.name}", ""]
    harm = next((r for r in c.behaviour if r.measure == "refusal on harmful"), None)
    moved = sorted((k for k in c.categories if k.significant), key=lambda k: -abs(k.diff))
    lines += [
        "## Summary",
        "",
        f"- A: `{c.a.name}` (weights `{c.a.weights_sha256[:12]}…`); B: `{c.b.name}` (weights "
        f"`{c.b.weights_sha256[:12]}…`)",
        f"- Pairs: {'same' if c.same_dataset else 'DIFFERENT'} pair file (`{c.a.dataset_sha256[:12]}…`"
        + ("" if c.same_dataset else f" vs `{c.b.dataset_sha256[:12]}…`") + f"), split `{c.a.split}`"
        + (f"; **paired** comparison on the {c.n_pairs} pairs both audits used" if c.paired
           else f"; **unpaired** comparison ({c.n_pairs} pairs in A, {c.n_pairs_b} in B)"),
    ]
    if harm is not None:
        lines.append(
            f"- Refusal on harmful prompts: {_pct(harm.a.rate)} → {_pct(harm.b.rate)} ({_pp(harm.diff)}, {level} CI "
            f"{_ci_pp(harm.ci_low, harm.ci_high)})"
        )
    if moved:
        lines.append("- Categories whose refusal changed (interval excludes 0): " + ", ".join(
            f"**{k.category}** {k.refused_a}/{k.n_a} → {k.refused_b}/{k.n_b}" for k in moved))
    else:
        lines.append("- No category's refusal rate changed beyond its interval")
    lines.append(f"- Gap m(harmful) − m(benign) on the compared pairs: {c.gap.mean_a:.3f} → {c.gap.mean_b:.3f} "
                 f"({_f(c.gap.diff)}, {level} CI [{c.gap.ci_low:.3f}, {c.gap.ci_high:.3f}])")
    if not c.shares_defined:
        lines.append("- **Shares are undefined** for at least one model (gap not separated): only behaviour and the "
                     "gap are compared")
    else:
        top = [c.component(i) for i in c.ranking[:3]]
        lines.append(f"- Share changes significant (family-wise, {level}): {len(c.ranking)} of {len(c.components)}"
                     + (("; largest: " + ", ".join(f"`{t.id}` {t.share_a:.3f} → {t.share_b:.3f} ({_f(t.diff)} "
                                                     f"[{t.ci_low:.3f}, {t.ci_high:.3f}])" for t in top))
                        if top else ""))
    lines.append("")
    if c.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in c.warnings] + [""]
    lines += markdown_section(pictures)
    # Behaviour ------------------------------------------------------------------------------------------------
    lines += ["## Behaviour (greedy replies)", "", c.stats.behaviour, ""]
    rows = []
    for r in c.behaviour:
        rows.append([r.measure, f"{r.a.successes}/{r.a.total} ({_pct(r.a.rate)})",
                     f"{r.b.successes}/{r.b.total} ({_pct(r.b.rate)})", _pp(r.diff), _ci_pp(r.ci_low, r.ci_high),
                     "–" if not r.paired else f"{r.a_only} / {r.b_only}", _p(r.mcnemar_p),
                     "yes" if r.significant else "no"])
    lines += _table(["measure", "A", "B", "B − A", f"{level} CI (Newcombe)", "A only / B only", "McNemar p",
                     "changed"], rows) + [""]
    # Categories -----------------------------------------------------------------------------------------------
    lines += ["## Refusal on harmful prompts, per category", "",
              "Unadjusted per-category intervals (Newcombe); mean gap m(harmful) − m(benign) over the category's "
              "pairs; 'used' counts the pairs each audit kept for patching.", ""]
    rows = [[k.category, f"{k.refused_a}/{k.n_a}", f"{k.refused_b}/{k.n_b}", _pp(k.diff), _ci_pp(k.ci_low, k.ci_high),
             _p(k.mcnemar_p), "–" if k.gap_a is None else f"{k.gap_a:.2f}",
             "–" if k.gap_b is None else f"{k.gap_b:.2f}", f"{k.used_a} / {k.used_b}",
             "**yes**" if k.significant else "no"] for k in c.categories]
    lines += _table(["category", "A refused", "B refused", "B − A", f"{level} CI", "McNemar p", "gap A", "gap B",
                     "used A / B", "changed"], rows) + [""]
    # Components -----------------------------------------------------------------------------------------------
    lines += [f"## Share changes (B − A, {level} {c.stats.method} bootstrap CI over pairs, "
              f"{'paired' if c.paired else 'unpaired'})", ""]
    if not c.shares_defined:
        lines += ["Shares are undefined because at least one model's gap is not separated from 0.", ""]
    else:
        lines += [
            f"Shares of both models on the {'common' if c.paired else 'respective'} pairs; family-wise intervals hold "
            f"simultaneously for all {c.stats.n_components} components ({c.stats.familywise}); a change is "
            f"significant when its family-wise interval excludes 0 (and |B − A| ≥ {c.stats.min_diff:g}): "
            f"{len(c.ranking)} are. Ranked by |B − A|.",
            "",
        ]
        rows = []
        for cid in c.ranking[:top_k]:
            x = c.component(cid)
            rows.append([str(x.rank), f"`{x.id}`", f"{x.share_a:.3f} [{x.share_a_low:.3f}, {x.share_a_high:.3f}]",
                         f"{x.share_b:.3f} [{x.share_b_low:.3f}, {x.share_b_high:.3f}]",
                         f"**{_f(x.diff)}** [{x.ci_low:.3f}, {x.ci_high:.3f}]", f"[{x.fw_low:.3f}, {x.fw_high:.3f}]"])
        if rows:
            lines += _table(["rank", "component", "share A [CI]", "share B [CI]", "B − A [CI]", "family-wise CI"],
                            rows) + [""]
        if len(c.ranking) > top_k:
            lines += [f"… and {len(c.ranking) - top_k} more significant changes in `comparison.json`.", ""]
        allpos = [x for x in c.components if x.position is None]
        if allpos:
            lines += ["### All positions patched together", ""]
            rows = [[f"`{x.id}`", f"{x.share_a:.3f}", f"{x.share_b:.3f}",
                     f"{_f(x.diff)} [{x.ci_low:.3f}, {x.ci_high:.3f}]", f"[{x.fw_low:.3f}, {x.fw_high:.3f}]",
                     "yes" if x.significant else "no"] for x in allpos]
            lines += _table(["component", "share A", "share B", "B − A [CI]", "family-wise CI", "significant"],
                            rows) + [""]
    if c.components_only_in_a or c.components_only_in_b:
        lines += [f"Components in only one report (not compared): {len(c.components_only_in_a)} only in A, "
                  f"{len(c.components_only_in_b)} only in B.", ""]
    # Identity -------------------------------------------------------------------------------------------------
    lines += ["## Identity and reproduction", ""]
    rows = [[label, f"`{getattr(c.a, f)}`", f"`{getattr(c.b, f)}`"] for label, f in (
        ("model", "name"), ("source", "source"), ("weights sha256", "weights_sha256"),
        ("pair file sha256", "dataset_sha256"), ("split", "split"), ("direction", "direction"), ("metric", "metric"),
        ("report created", "report_created"))]
    rows += [["pairs in split / used", f"{c.a.n_pairs} / {c.a.n_used}", f"{c.b.n_pairs} / {c.b.n_used}"],
             ["report gap", f"{c.a.gap.mean:.3f} [{c.a.gap.ci_low:.3f}, {c.a.gap.ci_high:.3f}]",
              f"{c.b.gap.mean:.3f} [{c.b.gap.ci_low:.3f}, {c.b.gap.ci_high:.3f}]"]]
    lines += _table(["", "A", "B"], rows) + [""]
    lines += [
        f"- Paired: {'yes' if c.paired else 'no'} ({c.stats.resampling}); pairs compared: {c.n_pairs}"
        + ("" if c.paired else f" (A), {c.n_pairs_b} (B)"),
        f"- Statistics: {c.stats.method}, level {c.stats.level}, {c.stats.n_resamples} resamples, seed {c.stats.seed}",
        f"- Command: `{c.command}`" if c.command else "- Command: (Python API)",
        f"- Created {c.created}",
        "",
    ]
    return "\n".join(lines)


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


def summary_lines(c: ComparisonReport, top: int = 5) -> list[str]:
    """A few lines for the terminal: behaviour changes, categories that moved, top component changes."""
    lines = [f"{c.a.name} -> {c.b.name}: {'paired' if c.paired else 'UNPAIRED'}, {c.n_pairs} pairs compared"]
    for r in c.behaviour:
        lines.append(f"  {r.measure}: {_pct(r.a.rate)} -> {_pct(r.b.rate)} ({_pp(r.diff)}, CI "
                     f"{_ci_pp(r.ci_low, r.ci_high)}){' *' if r.significant else ''}")
    for k in c.categories:
        if k.significant:
            lines.append(f"  category {k.category}: refused {k.refused_a}/{k.n_a} -> {k.refused_b}/{k.n_b} *")
    lines.append(f"  gap: {c.gap.mean_a:.3f} -> {c.gap.mean_b:.3f} ({_f(c.gap.diff)} [{c.gap.ci_low:.3f}, "
                 f"{c.gap.ci_high:.3f}])")
    if not c.shares_defined:
        lines.append("  shares undefined for at least one model: components not compared")
    else:
        lines.append(f"  significant share changes: {len(c.ranking)} of {len(c.components)}")
        for cid in c.ranking[:top]:
            x = c.component(cid)
            lines.append(f"    {x.id}: {x.share_a:.3f} -> {x.share_b:.3f} ({_f(x.diff)} [{x.ci_low:.3f}, "
                         f"{x.ci_high:.3f}], family-wise [{x.fw_low:.3f}, {x.fw_high:.3f}])")
    return lines


def compare_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Handler of ``refusal-eval compare A.json B.json``."""
    import sys

    from refusal_eval.errors import ConfigError
    from refusal_eval.report.schema import load_report
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
                        command=shlex.join(["refusal-eval", *argv]))
    json_path, md_path = write_comparison(c, args.out or default_comparison_dir(c), pictures=not args.no_pictures)
    print("\n".join(summary_lines(c)))
    for w in c.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {json_path}\nwrote {md_path}")
    return 0
