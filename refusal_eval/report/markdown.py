"""Render an AuditReport as a Markdown page a reviewer can read top to bottom."""

from __future__ import annotations

from collections.abc import Iterable

from refusal_eval.patching.components import KINDS, WRITER_KINDS
from refusal_eval.report.plots import markdown_section
from refusal_eval.report.schema import AuditReport, ComponentResult, Gap, Rate, rank_components, rank_writers


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _rate_row(label: str, rate: Rate | None) -> str:
    if rate is None:
        return f"| {label} | – | – | – |"
    interval = f"[{_pct(rate.ci_low)}, {_pct(rate.ci_high)}]"
    return f"| {label} | {rate.successes}/{rate.total} | {_pct(rate.rate)} | {interval} |"


def _share(c: ComponentResult) -> str:
    if c.share is None:
        return "undefined"
    if c.approximate:  # a point estimate of unknown error: no interval of its own (older reports carried one)
        return f"≈{c.share:.3f} (estimate; no CI)"
    if c.ci_low is None or c.ci_high is None:
        return f"{c.share:.3f}"
    return f"{c.share:.3f} [{c.ci_low:.3f}, {c.ci_high:.3f}]"



def _tokens(tokens) -> str:
    return ", ".join(f"`{t.text!r}` ({t.count})" for t in tokens) or "none"


def _tree_lines(metric) -> list[str]:
    """The opening tree's branches and what it dropped, with counts (calibration replies)."""
    branched = {b.token.id for b in metric.branches}
    lines = [f"- Branch `{b.token.text!r}` ({b.token.count} replies), scored by the next token: refusal "
             + _tokens(b.refusal_tokens) + "; compliance " + _tokens(b.compliance_tokens)
             + ("; dropped (opened both): " + _tokens(b.ambiguous_tokens) if b.ambiguous_tokens else "")
             for b in metric.branches]
    if metric.branches:
        lines.append("- Patches write prompt positions only. What the model computes at a branch position itself (it "
                     "reads the prompt through attention) belongs to no component here, so the components at the last "
                     "prompt token can carry little of the gap while earlier positions carry it")
    dropped = [t for t in metric.ambiguous_tokens if t.id not in branched]
    if dropped:
        why = ("not branched: no second token after it opens only refusals or only compliances" if metric.depth == 2
               else "depth 1 scores first tokens only")
        lines.append(f"- Dropped (opened both refusals and compliances; {why}): " + _tokens(dropped))
    return lines

def method_sentence(report: AuditReport) -> str | None:
    """How the shares were computed, when not all by exact patching: how many are estimates, which cells were
    patched exactly, and the estimates' error on them in share units (None for an exact audit)."""
    r = report
    n_est = sum(c.approximate for c in r.components)
    if r.method == "exact" and not n_est:
        return None
    a = r.attribution
    text = (f"method {r.method}: {n_est} of {len(r.components)} shares are first-order (gradient) estimates, shown "
            "≈ with no CI and never significant")
    if a is None or a.n_verified == 0:
        return text + ("; no cell was patched exactly, so the estimates' error is unknown (audit with --method "
                       "attribution+verify to measure it, or --method exact)")
    which = (", ".join(f"`{x}`" for x in a.verified_ids) if a.n_verified <= 4
             else f"the {a.n_verified} listed in attribution.verified_ids")
    text += (f"; {a.n_verified} cells were patched exactly and keep their CIs ({a.n_top} largest estimates, "
             f"{a.n_random} at random: {which})")
    rho = "n/a" if a.spearman is None else f"{a.spearman:.3f}"
    if a.max_abs_share_error is not None:
        text += (f"; on them the estimated share is off by at most {a.max_abs_share_error:.3f} (median "
                 f"{a.median_abs_share_error:.3f}) in share units (fractions of the gap)")
    elif r.shares_defined is False:
        text += "; shares are undefined, so the estimates' error in share units is too"
    else:
        text += "; the estimates' error in share units is not in this report (written before schema 1.3)"
    return text + f", rank correlation of estimated and exact shares {rho}"


def _token(text: str) -> str:
    """A token's text, visible in a table cell: newlines escaped, a bare space shown as ␣."""
    return text.replace("\n", "\\n").replace("|", "\\|").strip() or "␣"


def _short(value: float | None) -> str:
    if value is None:
        return "–"
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _gap_words(g: Gap, level: str) -> str:
    verdict = g.verdict or ("separated" if g.separated else "includes_zero")
    words = {"separated": "separated: harmful prompts score higher", "includes_zero": "**includes 0**: not separated",
             "negligible": "**negligible**: above 0 but not shown to reach the smallest gap that matters",
             "inconclusive": "**inconclusive**: the CI lies above 0 but the permutation test cannot exclude 0 "
             "(too few pairs)",
             "reversed": "**REVERSED**: harmful prompts score LOWER than benign ones"}[verdict]
    p = "" if g.p_permutation is None else f", permutation p {_p(g.p_permutation)}"
    n = "" if g.n_pairs is None else f" over {g.n_pairs} pairs"
    return f"**{g.mean:.3f}** ({level} CI [{g.ci_low:.3f}, {g.ci_high:.3f}]{p}){n} — {words}"


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def cannot_move(c: ComponentResult) -> bool:
    """Whether an exactly patched component moved no pair's score at all (every effect exactly 0): its activation
    is the same in both runs (it precedes the pair's first differing token), so no model could give it a share."""
    measured = [e for e in c.effects if e is not None]
    return not c.approximate and bool(measured) and all(e == 0 for e in measured)


def verdict(report: AuditReport) -> str:
    """The audit's answer in one sentence. Its denominator counts only the components that can move the score:
    trivial patches and those that provably cannot move it are named apart."""
    r = report
    if r.shares_defined is None:  # schema 1.0
        return "shares defined" if r.gap.separated else "shares undefined: the gap is not separated from 0"
    if not r.shares_defined:
        return f"NO CIRCUIT REPORTED — {r.shares_reason}"
    forced = " (shares FORCED)" if r.config.get("force_shares") else ""
    # trivial patches in the table, or left out of an adaptive search
    n_trivial = sum(c.trivial is not None for c in r.components) + (r.search.n_trivial if r.search else 0)
    frozen, open_ = [], []
    for c in r.components:
        if c.trivial is None:
            (frozen if cannot_move(c) else open_).append(c)
    n_sig = sum(c.measured_significant for c in open_)
    estimated = [c for c in open_ if c.approximate]
    apart = ", ".join(part for part in (
        f"{len(frozen)} provably cannot move it" if frozen else "",
        f"{n_trivial} trivial patch{'es' if n_trivial != 1 else ''} left out" if n_trivial else "") if part)
    apart = f" ({apart})" if apart else ""
    if len(estimated) == len(open_) and estimated:
        return (f"shares estimated{forced}, nothing tested: all {len(estimated)} components that can move the score "
                f"are attribution estimates (no CI, never significant){apart}")
    of = (f"of the {len(open_) - len(estimated)} {'exactly patched ' if estimated else ''}components that can move "
          "the score")
    head = (f"refusal localised{forced}: {n_sig} significant {of}" if n_sig else
            f"no component significant{forced} {of}")
    tail = (f", the other {len(estimated)} are attribution estimates (no CI, never significant)" if estimated
            else "")
    return head + tail + apart


def summary_lines(report: AuditReport) -> list[str]:
    """The few lines `refusal-eval run` prints: behaviour, gap, verdict and controls."""
    r, level = report, f"{report.stats.level:.0%}"
    b = r.behaviour
    lines = [
        f"refusal on harmful {_pct(b.harmful_refusal.rate)} {_ci(b.harmful_refusal)}, over-refusal on benign "
        f"{_pct(b.benign_over_refusal.rate)} {_ci(b.benign_over_refusal)}"
        + ("" if b.refuses is None else ("; refuses measurably" if b.refuses else "; NO measurable refusal")),
        f"gap {_gap_words(r.gap, level)}".replace("**", ""),
    ]
    if r.score_validity is not None:
        lines.append(f"score vs. replies: {_validity_short(r.score_validity)}")
    if r.gap_all_pairs is not None and r.gap_all_pairs.n_pairs != r.gap.n_pairs:
        lines.append(f"gap over all scored pairs {_gap_words(r.gap_all_pairs, level)}".replace("**", ""))
    lines.append(verdict(r))
    method = method_sentence(r)
    if method:
        lines.append(method.replace("`", ""))
    if r.controls and r.controls.random:
        c = r.controls.random
        lines.append(f"random-weights control: gap {c.gap.mean:.3f} [{c.gap.ci_low:.3f}, {c.gap.ci_high:.3f}] "
                     f"({(c.gap.verdict or '').replace('_', ' ')}), {c.n_significant} significant component(s) "
                     f"({c.n_significant_forced} with shares forced)")
    d = r.refusal_direction
    if d is not None and d.computed:
        after = d.refusal_after_ablation
        lines.append(f"refusal direction (layer {d.layer}, position {d.position}): refusal left after ablating it "
                     f"{_pct(after.rate)} {_ci(after)}, necessity {_estimate(d.necessity)} of the gap")
    return lines


def _validity_short(v) -> str:
    """One line: the score's AUROC against the greedy replies' refusals, and what it means."""
    n = v.n_refused + v.n_answered
    if v.auroc is None:
        return f"AUROC undefined (all {n} prompts {'refused' if v.n_refused else 'answered'})"
    meaning = ("tracks the refusals" if v.ci_low >= v.threshold else
               "DOES NOT TRACK the refusals" if v.tracks is False else "may not track the refusals")
    return f"AUROC {v.auroc:.3f} [{v.ci_low:.3f}, {v.ci_high:.3f}] over {n} prompts ({v.n_refused} refused); {meaning}"


def _alignment_words(r: AuditReport) -> str:
    """How the used pairs were lined up, and how many pairs each family of components used."""
    d = r.dataset
    if d.alignment == "full":
        return "equal token length, every position aligned"
    if d.alignment == "right":
        return f"right-aligned, {d.n_aligned_positions} shared suffix positions"
    n_full = sum(1 for c in r.components if c.n_pairs is not None and c.n_pairs < d.n_used)
    return (f"mixed: {len(r.components) - n_full} component(s) at the last {d.n_aligned_positions} right-aligned "
            f"position(s) use all {d.n_used} pairs; {n_full} all-position component(s) use the {d.n_full_pairs} "
            "pairs of equal token length")


def _ci(rate: Rate) -> str:
    return f"[{_pct(rate.ci_low)}, {_pct(rate.ci_high)}]"


def render_markdown(report: AuditReport, top_k: int = 15, pictures: Iterable[str] = ()) -> str:
    """The Markdown report: summary, pictures (the names of the PNGs written beside it), behaviour, metric,
    controls, top components, per-layer and per-position tables."""
    r = report
    level = f"{r.stats.level:.0%}"
    lines = [f"# Refusal audit: {r.model.name}", ""]
    all_pos = [c for c in r.components if c.position is None]
    # Trivial patches are sanity checks, kept in the per-layer tables, never ranked as findings. The writers
    # (attention and MLP outputs, heads) are ranked apart from the residual stream, which at late layers carries
    # everything by construction.
    ranked = rank_components(r.components, legacy=r.schema_version == "1.0")
    writers = rank_writers(r.components) if r.schema_version != "1.0" else ranked
    # Summary ------------------------------------------------------------------------------------------------
    lines += [
        "## Summary",
        "",
        f"**Verdict: {verdict(r)}.**",
        "",
        f"- Model: `{r.model.name}` ({r.model.architecture}, {r.model.n_layers} layers, {r.model.n_heads} heads, "
        f"{r.model.n_kv_heads} KV heads, {r.model.n_params:,} parameters, {r.model.dtype} on {r.model.device})",
        f"- Dataset: `{r.dataset.path}` split `{r.dataset.split}`: {r.dataset.n_pairs} pairs, "
        f"{r.dataset.n_used} used for patching ("
        + _alignment_words(r)
        + "); no pair is ever dropped for its score",
        f"- Direction: **{r.direction}** ("
        + ("benign run, harmful activation patched in: sufficiency" if r.direction == "denoise"
           else "harmful run, benign activation patched in: necessity")
        + ")",
        f"- Refusal on harmful prompts: **{_pct(r.behaviour.harmful_refusal.rate)}** {_ci(r.behaviour.harmful_refusal)}"
        f"; over-refusal on benign: **{_pct(r.behaviour.benign_over_refusal.rate)}** "
        f"{_ci(r.behaviour.benign_over_refusal)}"
        + (f"; over-refusal on tricky benign: **{_pct(r.behaviour.tricky_benign_over_refusal.rate)}**"
           if r.behaviour.tricky_benign_over_refusal else "")
        + ("" if r.behaviour.refuses is None else
           (" — the model refuses measurably more often on harmful prompts" if r.behaviour.refuses
            else " — **the intervals overlap: no measurable refusal behaviour**")),
        f"- Gap m(harmful) − m(benign) over the patched pairs: {_gap_words(r.gap, level)}",
    ]
    if r.search is not None and r.search.mode == "adaptive":
        x = r.search
        steps = ", ".join(f"{st.step} {st.patched}" for st in x.steps)
        lines.append(f"- Search: **adaptive**, {x.n_patched} of {x.n_grid} cells patched exactly ({steps}); "
                     f"{x.summary}. A cell shown – in the tables below was not patched.")
    if r.gap_all_pairs is not None and r.gap_all_pairs.n_pairs != r.gap.n_pairs:
        lines.append(f"- Gap over all {r.gap_all_pairs.n_pairs} scored pairs: {_gap_words(r.gap_all_pairs, level)}")
    if r.gap_equal_length is not None:
        lines.append(f"- Gap over the {r.gap_equal_length.n_pairs} equal-length pairs (all-position components): "
                     f"{_gap_words(r.gap_equal_length, level)}")
    for v in (r.score_validity, r.score_validity_tricky):
        if v is not None:
            lines.append(f"- Score validity: {v.words}.")
    if r.shares_reason:
        lines.append(f"- Shares: {'defined' if r.shares_defined else '**undefined**'} — {r.shares_reason}")
    if writers:
        lines.append(f"- Largest {_writer_words(r, 'trivial patches left out')}: "
                     + ", ".join(f"`{c.id}` {_share(c)}" for c in writers[:3]))
    lines += [f"- {finding}" for finding in r.findings]
    lines += _direction_headline(r)
    method = method_sentence(r)
    if method:
        a = r.attribution
        score = ("" if a is None or a.max_abs_score_error is None else
                 f"; the largest single-pair error of an estimated patched score was {a.max_abs_score_error:.2f} "
                 "(refusal-score units, nats)")
        lines.append(f"- Method: **{r.method}** — " + method.removeprefix(f"method {r.method}: ") + score
                     + ". A bootstrap over an estimate's pairs would measure the estimate's spread, not the "
                     "share's: exact patching (`--method exact`) gives intervals and significance for every cell.")
    lines.append("")
    if r.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in r.warnings] + [""]
    lines += markdown_section(pictures)
    # Behaviour ----------------------------------------------------------------------------------------------
    lines += ["## Behaviour (greedy replies)", ""]
    lines += _table(["measure", "count", "rate", f"{level} CI (Wilson)"], [])[:2]
    b = r.behaviour
    lines += [
        _rate_row("refusal on harmful", b.harmful_refusal),
        _rate_row("compliance on benign", b.benign_compliance),
        _rate_row("over-refusal on benign", b.benign_over_refusal),
        _rate_row("over-refusal on tricky benign", b.tricky_benign_over_refusal),
        _rate_row("refusal on tricky harmful", b.tricky_harmful_refusal),
        "",
        f"Greedy replies of at most {r.config.get('max_new_tokens', 24)} tokens, judged by the refusal-phrase matcher "
        "on their first 80 characters"
        + ("." if r.config.get("full_replies", True) else "; each reply stopped once that verdict could not change, "
           "so the report's refusals are short (`--full-replies` keeps whole replies)."),
        "",
    ]
    # Metric -------------------------------------------------------------------------------------------------
    lines += [
        "## Refusal score",
        "",
        f"`{r.metric.definition}` at the {r.metric.position}.",
        "",
        f"- Opening tree: depth {r.metric.depth}",
        "- Refusal tokens: " + _tokens(r.metric.refusal_tokens),
        "- Compliance tokens: " + _tokens(r.metric.compliance_tokens),
        *_tree_lines(r.metric),
        f"- Derivation: {r.metric.derivation}",
        *([f"- Token set source: {r.metric.token_set_source}"] if r.metric.token_set_source else []),
        "",
    ]
    lines += _controls(r, level)
    lines += _direction(r, level)
    # Components ---------------------------------------------------------------------------------------------
    lines += [f"## Top {_writer_words(r, f'share of the gap, {level} {r.stats.method} bootstrap CI over pairs')}", ""]
    shares_defined = r.gap.separated if r.shares_defined is None else r.shares_defined
    if not shares_defined:
        lines += [f"Shares are undefined: {r.shares_reason or 'the gap is not separated from 0'}.", ""]
    else:
        rows = [[f"`{c.id}`", c.kind, str(c.layer), "all" if c.position is None else str(c.position), _share(c),
                 "–" if c.approximate or c.fw_low is None else f"[{c.fw_low:.3f}, {c.fw_high:.3f}]",
                 "–" if c.approximate else _p(c.p_permutation_fw),
                 "estimate" if c.approximate else "yes" if c.significant else "no"]
                for c in writers[:top_k]]
        n_sig = sum(c.measured_significant for c in r.components if c.trivial is None)
        n_est = sum(c.approximate for c in r.components)
        rule = _significance_rule(r)
        lines += [
            f"Family-wise intervals hold simultaneously for all {r.stats.n_components} components "
            + (f"(given for the {r.stats.n_components - n_est} patched exactly) " if n_est else "")
            + f"({r.stats.familywise}); a component is significant when {rule}: {n_sig} non-trivial ones are. "
            + (f"The {n_est} shares marked ≈ are attribution estimates: no interval, never significant. " if n_est
               else "")
            + "Trivial patches (the run's whole input or output by construction) are not ranked; they are listed "
            "under Controls.",
            "",
        ]
        lines += _table(["component", "kind", "layer", "position", "share [CI]", "family-wise CI",
                         "permutation p (fw)", "significant"], rows) + [""]
        lines += _stream_lines(r)
        lines += _heterogeneity(r, level)
        # Per layer, all positions patched together.
        kinds = [k for k in KINDS if k != "head" and any(c.kind == k for c in all_pos)]
        if kinds:
            lines += ["## Per layer (all positions patched together)", ""]
            rows = []
            for layer in range(r.model.n_layers):
                row = [str(layer)]
                for k in kinds:
                    found = [c for c in all_pos if c.kind == k and c.layer == layer and c.head is None]
                    row.append(_share(found[0]) if found else "–")
                rows.append(row)
            lines += _table(["layer"] + kinds, rows) + [""]
        # Layer x head, all positions patched together.
        heads = {(c.layer, c.head): c for c in all_pos if c.kind == "head"}
        if heads:
            lines += ["## Attention heads (hook_z, all positions patched together): layer × head", ""]
            n_heads = max(h for _, h in heads) + 1
            rows = [[str(layer)] + [_share(heads[(layer, h)]) if (layer, h) in heads else "–" for h in range(n_heads)]
                    for layer in sorted({layer for layer, _ in heads})]
            lines += _table(["layer"] + [f"head {h}" for h in range(n_heads)], rows) + [""]
        # Layer x position heatmap tables, one per kind.
        pos_labels = {p.position: p for p in r.positions}
        for kind in KINDS:
            cells = {(c.layer, c.position): c for c in r.components if c.kind == kind and c.position is not None
                     and c.head is None}
            if not cells:
                continue
            first = min((p.first_diff_offset for p in r.pairs if p.used and p.first_diff_offset is not None),
                        default=-1)
            offsets = sorted(p for p in {p for _, p in cells} if p >= first)
            lines += [
                f"## {kind}: layer × position",
                "",
                "Share per position, counted from the end of the prompt (-1 = last prompt token); the token shown "
                f"is the most common harmful-side token there. Positions before {first} precede every pair's first "
                "differing token, where both runs are identical, so their shares are exactly 0 and are not shown.",
                "",
            ]
            header = ["layer"] + [
                f"{p} `{_token(pos_labels[p].harmful_text)}`" if p in pos_labels else str(p) for p in offsets
            ]
            rows = []
            for layer in sorted({layer for layer, _ in cells}):
                rows.append([str(layer)] + [
                    ("≈" if cells[(layer, p)].approximate else "") + _short(cells[(layer, p)].share)
                    if (layer, p) in cells else "–" for p in offsets
                ])
            lines += _table(header, rows) + [""]
    # Exclusions and reproduction -----------------------------------------------------------------------------
    if r.dataset.exclusions:
        lines += ["## Excluded pairs", ""]
        lines += _table(["pair", "reason", "detail"],
                        [[e.pair_id, e.reason, e.detail] for e in r.dataset.exclusions]) + [""]
    lines += _glossary(r, level)
    env = r.environment
    lines += [
        "## Reproduce",
        "",
        f"- Command: `{r.command}`",
        f"- Dataset sha256: `{r.dataset.sha256}`",
        f"- Weights sha256: `{r.model.weights_sha256}`",
        f"- Statistics: {r.stats.method}, level {r.stats.level}, {r.stats.n_resamples} resamples, seed {r.stats.seed}",
        f"- Environment: Python {env.python}, torch {env.torch}, transformers {env.transformers}, "
        f"refusal_eval {env.refusal_eval}, {env.threads} threads, {env.platform}",
        f"- Runtime: {r.runtime_seconds:.1f} s; created {r.created}",
        *([_engine_line(r.engine)] if r.engine else []),
        "",
    ]
    return "\n".join(lines)


def _controls(r: AuditReport, level: str) -> list[str]:
    """Controls: permutation null, random-weights copy, noise floor and the trivial patches."""
    if r.controls is None:
        return []
    c = r.controls
    lines = ["## Controls", ""]
    perm = c.permutation
    kind = "all sign vectors enumerated" if perm.exact else f"{perm.n_permutations:,} random sign vectors"
    n_exact = sum(not x.approximate for x in r.components)
    tested = (f"{len(r.components)} components" if n_exact == len(r.components)
              else f"the {n_exact} exactly patched components (estimates get no p-value)")
    lines.append(f"- **Label permutation** (harmful/benign swapped within pairs: {kind}): gap p = {_p(perm.gap_p)}; "
                 f"{perm.n_components_p_below} of {tested} have a family-wise permutation "
                 f"p below {1 - r.stats.level:.2g}.")
    if c.random is not None:
        x = c.random
        lines.append(
            f"- **Random weights** (same config and tokenizer, seed {x.seed}): refuses {x.harmful_refusal.successes}/"
            f"{x.harmful_refusal.total} harmful and {x.benign_over_refusal.successes}/{x.benign_over_refusal.total} "
            f"benign; gap {x.gap.mean:.3f} [{x.gap.ci_low:.3f}, {x.gap.ci_high:.3f}] "
            f"({(x.gap.verdict or '').replace('_', ' ')}); {x.n_significant} significant component(s) under the "
            f"audit's rules, {x.n_significant_forced} with its shares forced (of {x.n_components}); "
            + ("" if x.score_validity is None else f"score vs. its replies: {_validity_short(x.score_validity)}. ")
            + ("A real circuit should stand out against this." if x.n_significant_forced == 0 else
               "**The statistics find 'components' in a random network: read this model's circuit with caution.**")
        )
        if x.direction is not None:
            lines.append(f"- **Random weights, refusal direction**: {x.direction.words}.")
    else:
        lines.append("- **Random weights**: not run (`--control random` audits a re-initialised copy beside).")
    if c.noise_floor is not None:
        f = c.noise_floor
        sampled = ("" if not f.cells_per_stratum else
                   f" on {f.n_measured} components, {f.cells_per_stratum} per stratum of {f.n_strata} (kind, layer, "
                   f"position class)")
        bound = ("" if f.bound is None or f.bound == f.max_abs else
                 f"; the rules use {f.bound:.1e}, {f.bound / f.max_abs:g} times the largest")
        lines.append(f"- **Noise floor** ({f.dtype}, identity patches through the engine's shortcuts{sampled}): "
                     f"largest {f.max_abs:.1e}, median {f.median_abs:.1e}{bound}; "
                     + (f"{f.n_within} component(s) move no pair's score by more than the resolution "
                        f"{r.stats.resolution_effect:.2g} (negligible, never significant); "
                        if r.stats.resolution_effect is not None else
                        f"{f.n_within} component(s) move the score by no more than their floor (never significant); ")
                     + f"{f.n_exact_zero} provably cannot move it.")
    trivial = [x for x in r.components if x.trivial and x.share]
    if trivial:
        shown = ", ".join(f"`{x.id}` {x.share:.3f}" for x in trivial[:6])
        more = f" and {len(trivial) - 6} more" if len(trivial) > 6 else ""
        lines.append(f"- **Trivial patches** (the run's whole input or output by construction; sanity checks, not "
                     f"findings): {shown}{more}.")
    return lines + [""]


def _estimate(e) -> str:
    return "–" if e is None else f"{e.estimate:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]"


def direction_headline(r: AuditReport) -> str | None:
    """The refusal direction in one sentence: the refusal left after removing it (None: no section)."""
    d = r.refusal_direction
    if d is None:
        return None
    if not d.computed:
        return f"Refusal direction: {d.reason}"
    after, before = d.refusal_after_ablation, d.refusal_before
    return (f"Refusal left after removing one direction: {_pct(after.rate)} {_ci(after)} of harmful prompts (before: "
            f"{_pct(before.rate)} {_ci(before)})")


def _direction_headline(r: AuditReport) -> list[str]:
    line = direction_headline(r)
    return [] if line is None else [f"- {line} (see Refusal direction)."]


def _direction(r: AuditReport, level: str) -> list[str]:
    """The refusal direction: headline, selection, necessity and sufficiency, over-refusal, agreement, cosines and
    every layer's candidate."""
    d = r.refusal_direction
    if d is None:
        return []
    lines = ["## Refusal direction", ""]
    if not d.computed:
        lines += [f"{d.reason[0].upper()}{d.reason[1:]}.", ""]
    if d.filters is not None:
        f = d.filters
        lines += [f"Candidates: the difference in means at every layer's input and the last {len(f.positions)} prompt "
                  f"positions, fitted on {len(d.fit_pair_ids)} calibration pairs and selected on "
                  f"{len(d.selection_pair_ids)} others (seed {d.seed}): a candidate is discarded when its ablation "
                  f"costs the benign prompts a mean KL above {f.max_kl}, its addition does not raise the benign "
                  f"refusal score above {f.min_addition_change}, or it lies in the last {f.late_layer_fraction:.0%} of "
                  f"layers (from {f.late_layer_start}); " + (
                      f"{d.n_surviving} of {d.n_candidates} survive" if d.n_checked is None else
                      f"every candidate outside the late layers is ranked by its ablation on the harmful prompts of "
                      f"{len(d.rank_pair_ids)} selection pairs, and the best ranked are measured on all of them and "
                      f"filtered until one survives: {d.n_surviving} of the {d.n_checked} measured survive") +
                  f". {d.selection}.", ""]
    if not d.computed:
        return lines
    lines += [f"**{direction_headline(r)}**: greedy replies to the same prompts with the direction ablated at every "
              f"step ({level} Wilson CIs).", "",
              f"- Necessity (ablation, harmful side): **{_estimate(d.necessity)}** of the gap; sufficiency (addition, "
              f"benign side): **{_estimate(d.sufficiency)}**; over the {d.n_pairs} patched pairs, {level} CIs "
              "(bootstrap over pairs)" + ("" if d.p_necessity is None else
                                          f"; label-permutation p {d.p_necessity:.1e} and {d.p_sufficiency:.1e}") + ".",
              f"- KL on benign prompts under ablation: {_estimate(d.kl_benign)} nats; gap removed: "
              f"{_estimate(d.gap_removed)} (score units).",
              f"- Over-refusal on benign prompts: {_pct(d.over_refusal_before.rate)} {_ci(d.over_refusal_before)} → "
              f"{_pct(d.over_refusal_after_addition.rate)} {_ci(d.over_refusal_after_addition)} with the direction "
              "added" + ("" if d.tricky_over_refusal_after_addition is None else
                         f"; on tricky benign prompts {_pct(d.tricky_over_refusal_before.rate)} "
                         f"{_ci(d.tricky_over_refusal_before)} → {_pct(d.tricky_over_refusal_after_addition.rate)} "
                         f"{_ci(d.tricky_over_refusal_after_addition)}") + ".",
              f"- Where it is read: layer {d.layer}'s input, position {d.position} (length {d.norm:.3g}). "
              + (d.agreement or ""),
              "- Replies with it ablated: " + "; ".join(f"`{_token(x)}`" for x in d.replies_after_ablation)
              + ". With it added: " + "; ".join(f"`{_token(x)}`" for x in d.replies_after_addition)
              + " (a reply that degenerates is no refusal to the matcher).",
              "- Measured through forward hooks only: no command writes weights with the direction removed.", ""]
    if d.cosines:
        lines += [f"Cosine of the direction with the top writers' mean harmful − benign output at the last prompt "
                  f"token ({level} CI, bootstrap over pairs):", ""]
        lines += _table(["compared at -1", "top writer", "its share", "cosine [CI]"], [
            [f"`{c.component}`", f"`{c.ranked}`", _short(c.share),
             "–" if c.cosine is None else f"{c.cosine:.3f} [{c.ci_low:.3f}, {c.ci_high:.3f}]"] for c in d.cosines])
        lines.append("")
    if d.layers:
        on = (f"on the {len(d.rank_pair_ids)} ranking pairs, shares of their own gap" if d.rank_pair_ids else
              "on the patched pairs, shares of the gap")
        lines += [f"Every layer's candidate at position {d.position} ({on}): ablation and addition ({level} CI) and "
                  "the benign KL under ablation (the picture draws them).", ""]
        lines += _table(["layer", "length", "ablation (necessity)", "addition (sufficiency)", "KL (nats)",
                         "filters"], [
            [("**" + str(x.layer) + "**") if x.layer == d.layer else str(x.layer), f"{x.norm:.3g}",
             _estimate(x.ablation), _estimate(x.addition), f"{x.kl_benign.estimate:.3g}",
             "; ".join(x.discarded) or "survives"] for x in d.layers])
        lines.append("")
    return lines


def _significance_rule(r: AuditReport) -> str:
    if r.stats.resolution_effect is not None:
        return (f"its family-wise interval clears 0 by more than {r.stats.resolution_share:.1e}, its family-wise "
                f"permutation p is below {1 - r.stats.level:.2g} and it moves some pair's score by more than "
                f"{r.stats.resolution_effect:.2g} (the resolution: 10 noise floors, at least 0.1% of the mean gap)")
    return (f"its family-wise interval excludes 0, its family-wise permutation p is below {1 - r.stats.level:.2g} "
            "and it moves the score by more than its noise floor" if r.controls else
            "its family-wise interval excludes 0")


def _glossary(r: AuditReport, level: str) -> list[str]:
    """The words of this report, once, with their units."""
    method = {"BCa": "BCa (bias-corrected and accelerated: the percentile interval shifted for the bootstrap's bias "
                     "and skew)", "percentile": "percentile", "basic": "basic (reflected percentile)"}
    return [
        "## Reading this report",
        "",
        "- **Refusal score** m: the log-probability of the refusal openings minus that of the compliance openings, "
        "in nats (natural-log units). **Gap**: m(harmful) − m(benign) for a pair's two prompts.",
        "- **Share** of a component: how much of the gap its patch moves, summed over pairs and divided by the summed "
        "gap (1 = the whole gap). Shares are not a partition and can add past 1: a layer's output is also part of "
        "every later residual stream, and components' effects overlap.",
        f"- **CI**: {level} {method.get(r.stats.method, r.stats.method)} bootstrap interval, resampling pairs. "
        "**Family-wise** band: one that holds for all components at once (max-t), never narrower.",
        f"- **Significant**: a component is, when {_significance_rule(r)}.",
        "- **Trivial** patch: the run's whole input or output by construction (a check of the engine, not a finding). "
        "**Provably cannot move the score**: every pair's effect is exactly 0 (the component precedes the first "
        "token where the pair's prompts differ).",
        *([] if r.refusal_direction is None else [
            "- **Refusal direction**: the difference in means, harmful minus benign, of the residual stream entering "
            "one layer at one prompt position, chosen on calibration pairs (never the scored ones). **Ablation** "
            "projects it out of every layer's input and every attention and MLP output; **addition** adds it at its "
            "layer's input at every position. **Necessity**: the share of the gap ablation removes on the harmful "
            "side; **sufficiency**: the share addition induces on the benign side. **KL**: the mean KL divergence "
            "(nats) between the benign prompts' clean and ablated next-token distributions: what ablation costs "
            "where there is nothing to refuse."]),
        "",
    ]


def _writer_words(r: AuditReport, note: str) -> str:
    """What the ranked table holds: the writers, or every component when the audit patched no writer."""
    if any(c.kind in WRITER_KINDS for c in r.components):
        return f"writers (attention outputs, MLP outputs, heads; {note})"
    return f"components ({note})"


def _stream_lines(r: AuditReport) -> list[str]:
    """The residual stream, ranked apart from the writers: its share layer by layer at the last prompt token (the
    picture draws it at every position)."""
    lines = []
    for kind in ("resid_pre", "resid_post"):
        chain = sorted((c for c in r.components if c.kind == kind and c.position == -1 and c.share is not None
                        and c.trivial is None), key=lambda c: c.layer)
        if chain:
            lines.append(f"Residual stream at the last prompt token (`{kind}@-1`), share by layer: "
                         + ", ".join(f"{c.layer}: {_short(c.share)}" + ("*" if c.measured_significant else "")
                                     for c in chain) + " (* significant).")
    return lines + [""] if lines else []


def _heterogeneity(r: AuditReport, level: str) -> list[str]:
    if not r.heterogeneity:
        return []
    categories = sorted({name for h in r.heterogeneity for name in h.by_category})
    writers_only = all(r.component(h.id).kind in WRITER_KINDS for h in r.heterogeneity)
    lines = [
        f"## Heterogeneity of the top {'writers' if writers_only else 'components'}",
        "",
        "Leave-one-out range of the share, the fraction of the net effect carried by the largest single pair, the "
        "10/50/90% quantiles of per-pair effect/gap, and the share within each category (ratio of sums). "
        "*Concentrated*: one pair carries over half the effect, or leaving one pair out flips its sign.",
        "",
    ]
    rows = []
    for h in r.heterogeneity:
        q = "–" if not h.ratio_quantiles else " / ".join(f"{v:.2f}" for v in h.ratio_quantiles)
        frac = "–" if h.largest_pair_fraction is None else f"{h.largest_pair_fraction:.2f} ({h.largest_pair_id})"
        loo = "–" if h.loo_min is None else f"[{h.loo_min:.3f}, {h.loo_max:.3f}]"
        rows.append([f"`{h.id}`", loo, frac, q, "**yes**" if h.concentrated else "no"]
                    + [_short(h.by_category[name].share) if name in h.by_category else "–" for name in categories])
    lines += _table(["component", "leave-one-out", "largest pair", "effect/gap q10/50/90", "concentrated"]
                    + categories, rows)
    return lines + [""]


def _engine_line(e) -> str:
    shortcuts = [name for name, on in (("layer skip", e.layer_skip), ("prefix reuse", e.prefix_reuse)) if on]
    peak = f"{e.peak_memory_bytes / 2**20:.0f} MiB ({e.peak_memory_kind})" if e.peak_memory_bytes else "not measured"
    return (f"- Engine: {e.patched_forwards} batched forwards of up to {e.batch_rows} rows, "
            f"{e.forward_equivalents:.1f} forward-equivalents of work; shortcuts: {', '.join(shortcuts) or 'none'}; "
            f"weights {e.weights_bytes / 2**20:.0f} MiB, peak memory {peak}")
