"""Markdown of a comparison report (``comparison.md``) and the lines ``compare`` prints."""

from __future__ import annotations

from collections.abc import Iterable

from refusal_eval.report.comparison_schema import ComparisonReport
from refusal_eval.report.plots import markdown_section

# -- rendering ----------------------------------------------------------------------------------


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


def _changed(k) -> bool:
    """A category changed: its Holm-adjusted test says so (schema 1.2), else (older reports) its unadjusted interval."""
    return bool(k.changed) if k.changed is not None else k.significant


def _category_rule(c: ComparisonReport) -> str:
    if any(k.p_holm is not None for k in c.categories):
        return f"Holm-adjusted over {len(c.categories)} categories, p below {1 - c.stats.level:.2g}"
    return "unadjusted interval excludes 0"


def render_comparison_markdown(c: ComparisonReport, top_k: int = 15, pictures: Iterable[str] = ()) -> str:
    """The comparison as a Markdown page: summary, behaviour, categories, gap, share changes, identity."""
    level = f"{c.stats.level:.0%}"
    lines = [f"# Checkpoint comparison: {c.a.name} → {c.b.name}", ""]
    harm = next((r for r in c.behaviour if r.measure == "refusal on harmful"), None)
    moved = sorted((k for k in c.categories if _changed(k)), key=lambda k: -abs(k.diff))
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
        lines.append(f"- Categories whose refusal changed ({_category_rule(c)}): " + ", ".join(
            f"**{k.category}** {k.refused_a}/{k.n_a} → {k.refused_b}/{k.n_b}" for k in moved))
    else:
        lines.append(f"- No category's refusal rate is shown to have changed ({_category_rule(c)})")
    if not c.comparable:
        lines.append(f"- **Gap and share changes: not comparable.** {c.not_comparable}")
    else:
        lines.append(f"- Gap m(harmful) − m(benign) on the compared pairs: {c.gap.mean_a:.3f} → {c.gap.mean_b:.3f} "
                     f"({_f(c.gap.diff)}, {level} CI [{c.gap.ci_low:.3f}, {c.gap.ci_high:.3f}])")
    if not c.comparable:
        lines.append("- Share changes: not compared (different scores)")
    elif not c.shares_defined:
        lines.append("- **Shares are undefined** for at least one model (gap not separated): only behaviour and the "
                     "gap are compared")
    else:
        top = [c.component(i) for i in c.ranking[:3]]
        lines.append(f"- Share changes significant (family-wise, {level}): {len(c.ranking)} of {len(c.components)}"
                     + (("; largest: " + ", ".join(f"`{t.id}` {t.share_a:.3f} → {t.share_b:.3f} ({_f(t.diff)} "
                                                     f"[{t.ci_low:.3f}, {t.ci_high:.3f}])" for t in top))
                        if top else ""))
    if c.refusal_direction is not None:
        lines.append(f"- Refusal direction: {c.refusal_direction.words}")
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
    holm_family = any(k.p_holm is not None for k in c.categories)
    lines += ["## Refusal on harmful prompts, per category", "",
              "Unadjusted per-category intervals (Newcombe) and p-values"
              + (" (exact McNemar on the same prompts, else Fisher's exact test); **changed** only where the p-value "
                 f"Holm-adjusted over the {len(c.categories)} categories is below {1 - c.stats.level:.2g}"
                 if holm_family else "; **changed** where the unadjusted interval excludes 0 (a report of schema "
                 f"{c.schema_version}: no adjustment over the categories)")
              + "; mean gap m(harmful) − m(benign) over the category's pairs; 'used' counts the pairs each audit kept "
              "for patching.", ""]
    rows = [[k.category, f"{k.refused_a}/{k.n_a}", f"{k.refused_b}/{k.n_b}", _pp(k.diff), _ci_pp(k.ci_low, k.ci_high),
             _p(k.p_value if k.p_value is not None else k.mcnemar_p)
             + ("" if k.test is None else f" ({'McNemar' if k.test == 'mcnemar' else 'Fisher'})"),
             _p(k.p_holm), "–" if k.gap_a is None else f"{k.gap_a:.2f}",
             "–" if k.gap_b is None else f"{k.gap_b:.2f}", f"{k.used_a} / {k.used_b}",
             "**yes**" if _changed(k) else "no"] for k in c.categories]
    lines += _table(["category", "A refused", "B refused", "B − A", f"{level} CI", "p", "Holm p", "gap A", "gap B",
                     "used A / B", "changed"], rows) + [""]
    # Components -----------------------------------------------------------------------------------------------
    lines += [f"## Share changes (B − A, {level} {c.stats.method} bootstrap CI over pairs, "
              f"{'paired' if c.paired else 'unpaired'})", ""]
    if not c.comparable:
        lines += ["Not comparable: A and B use different refusal scores (see the summary).", ""]
    elif not c.shares_defined:
        lines += ["Shares are undefined because at least one model's gap is not separated from 0.", ""]
    else:
        lines += [
            f"Shares of both models on the {'common' if c.paired else 'respective'} pairs; family-wise intervals hold "
            f"simultaneously for all {c.stats.n_components} components ({c.stats.familywise}); a change is "
            "significant when its family-wise interval clears 0 by more than 10 noise floors, it moves some pair's "
            f"score beyond the resolution in A or B, and |B − A| ≥ {c.stats.min_diff:g}: "
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


def summary_lines(c: ComparisonReport, top: int = 5) -> list[str]:
    """A few lines for the terminal: behaviour changes, categories that moved, top component changes."""
    lines = [f"{c.a.name} -> {c.b.name}: {'paired' if c.paired else 'UNPAIRED'}, {c.n_pairs} pairs compared"]
    for r in c.behaviour:
        lines.append(f"  {r.measure}: {_pct(r.a.rate)} -> {_pct(r.b.rate)} ({_pp(r.diff)}, CI "
                     f"{_ci_pp(r.ci_low, r.ci_high)}){' *' if r.significant else ''}")
    for k in c.categories:
        if _changed(k):
            lines.append(f"  category {k.category}: refused {k.refused_a}/{k.n_a} -> {k.refused_b}/{k.n_b} *"
                         + ("" if k.p_holm is None else f" (Holm p {_p(k.p_holm)})"))
    if not c.comparable:
        lines.append("  gap and shares: NOT COMPARABLE (A and B use different scores; audit both in one run: "
                     "refusal-eval run --model A --model B)")
    else:
        lines.append(f"  gap: {c.gap.mean_a:.3f} -> {c.gap.mean_b:.3f} ({_f(c.gap.diff)} [{c.gap.ci_low:.3f}, "
                     f"{c.gap.ci_high:.3f}])")
    if c.refusal_direction is not None:
        lines.append(f"  refusal direction: {c.refusal_direction.words}")
    if c.comparable and not c.shares_defined:
        lines.append("  shares undefined for at least one model: components not compared")
    elif c.comparable:
        lines.append(f"  significant share changes: {len(c.ranking)} of {len(c.components)}")
        for cid in c.ranking[:top]:
            x = c.component(cid)
            lines.append(f"    {x.id}: {x.share_a:.3f} -> {x.share_b:.3f} ({_f(x.diff)} [{x.ci_low:.3f}, "
                         f"{x.ci_high:.3f}], family-wise [{x.fw_low:.3f}, {x.fw_high:.3f}])")
    return lines
