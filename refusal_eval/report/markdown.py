"""Render an AuditReport as a Markdown page a reviewer can read top to bottom."""

from __future__ import annotations

from refusal_eval.patching.components import KINDS
from refusal_eval.report.schema import AuditReport, ComponentResult, Rate


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
    approx = "≈ " if c.approximate else ""
    return f"{approx}{c.share:.3f} [{c.ci_low:.3f}, {c.ci_high:.3f}]"


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


def render_markdown(report: AuditReport, top_k: int = 15) -> str:
    """The Markdown report: summary, behaviour, metric, top components, per-layer and per-position tables."""
    r = report
    level = f"{r.stats.level:.0%}"
    lines = [f"# Refusal audit: {r.model.name}", ""]
    all_pos = [c for c in r.components if c.position is None]
    # resid_pre patched at every position replaces the whole input of the layer: share 1 by construction,
    # so it is a sanity check (kept in the per-layer table), not a finding to rank.
    ranked = sorted(
        (c for c in r.components if c.share is not None and not (c.kind == "resid_pre" and c.position is None)),
        key=lambda c: -abs(c.share or 0),
    )
    # Summary ------------------------------------------------------------------------------------------------
    lines += [
        "## Summary",
        "",
        f"- Model: `{r.model.name}` ({r.model.architecture}, {r.model.n_layers} layers, {r.model.n_heads} heads, "
        f"{r.model.n_kv_heads} KV heads, {r.model.n_params:,} parameters, {r.model.dtype} on {r.model.device})",
        f"- Dataset: `{r.dataset.path}` split `{r.dataset.split}`: {r.dataset.n_pairs} pairs, "
        f"{r.dataset.n_used} used for patching ("
        + ("equal token length, every position aligned" if r.dataset.alignment == "full"
           else f"right-aligned, {r.dataset.n_aligned_positions} shared suffix positions")
        + ")",
        f"- Direction: **{r.direction}** ("
        + ("benign run, harmful activation patched in: sufficiency" if r.direction == "denoise"
           else "harmful run, benign activation patched in: necessity")
        + ")",
        f"- Refusal on harmful prompts: **{_pct(r.behaviour.harmful_refusal.rate)}**; compliance on benign: "
        f"**{_pct(r.behaviour.benign_compliance.rate)}**"
        + (f"; over-refusal on tricky benign: **{_pct(r.behaviour.tricky_benign_over_refusal.rate)}**"
           if r.behaviour.tricky_benign_over_refusal else ""),
        f"- Gap m(harmful) − m(benign): **{r.gap.mean:.3f}** ({level} CI [{r.gap.ci_low:.3f}, {r.gap.ci_high:.3f}])"
        + ("" if r.gap.separated else " — **does not separate harmful from benign: shares undefined**"),
    ]
    if r.gap.separated:
        movers = [c for c in ranked if c.position is None][:3]
        if movers:
            lines.append(
                "- Largest all-position components: "
                + ", ".join(f"`{c.id}` {_share(c)}" for c in movers)
            )
    if r.method != "exact":
        line = (f"- Method: **{r.method}** — shares marked ≈ are first-order (gradient) estimates, not exact "
                "patching")
        if r.attribution:
            a = r.attribution
            rho = "n/a" if a.spearman is None else f"{a.spearman:.3f}"
            line += (f"; {a.n_verified} cells were patched exactly ({a.n_top} top, {a.n_random} random): rank "
                     f"correlation of estimate and exact {rho}, largest error {a.max_abs_error:.3f}")
        lines.append(line)
    lines.append("")
    if r.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in r.warnings] + [""]
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
    ]
    # Metric -------------------------------------------------------------------------------------------------
    lines += [
        "## Refusal score",
        "",
        f"`{r.metric.definition}` at the {r.metric.position}.",
        "",
        "- Refusal tokens: " + ", ".join(f"`{t.text!r}` ({t.count})" for t in r.metric.refusal_tokens),
        "- Compliance tokens: " + ", ".join(f"`{t.text!r}` ({t.count})" for t in r.metric.compliance_tokens),
        f"- Derivation: {r.metric.derivation}",
        "",
    ]
    # Components ---------------------------------------------------------------------------------------------
    lines += [f"## Top components (share of the gap, {level} {r.stats.method} bootstrap CI over pairs)", ""]
    if not r.gap.separated:
        lines += ["Shares are undefined because the gap is not separated from 0.", ""]
    else:
        rows = [[f"`{c.id}`", c.kind, str(c.layer), "all" if c.position is None else str(c.position), _share(c),
                 f"[{c.fw_low:.3f}, {c.fw_high:.3f}]", "yes" if c.significant else "no"]
                for c in ranked[:top_k]]
        n_sig = sum(bool(c.significant) for c in r.components)
        lines += [
            f"Family-wise intervals hold simultaneously for all {r.stats.n_components} components "
            f"({r.stats.familywise}); a component is significant when its family-wise interval excludes 0: "
            f"{n_sig} are.",
            "",
        ]
        lines += _table(["component", "kind", "layer", "position", "share [CI]", "family-wise CI", "significant"],
                        rows) + [""]
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
                    _short(cells[(layer, p)].share) if (layer, p) in cells else "–" for p in offsets
                ])
            lines += _table(header, rows) + [""]
    # Exclusions and reproduction -----------------------------------------------------------------------------
    if r.dataset.exclusions:
        lines += ["## Excluded pairs", ""]
        lines += _table(["pair", "reason", "detail"],
                        [[e.pair_id, e.reason, e.detail] for e in r.dataset.exclusions]) + [""]
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


def _engine_line(e) -> str:
    shortcuts = [name for name, on in (("layer skip", e.layer_skip), ("prefix reuse", e.prefix_reuse)) if on]
    peak = f"{e.peak_memory_bytes / 2**20:.0f} MiB ({e.peak_memory_kind})" if e.peak_memory_bytes else "not measured"
    return (f"- Engine: {e.patched_forwards} batched forwards of up to {e.batch_rows} rows, "
            f"{e.forward_equivalents:.1f} forward-equivalents of work; shortcuts: {', '.join(shortcuts) or 'none'}; "
            f"weights {e.weights_bytes / 2**20:.0f} MiB, peak memory {peak}")
