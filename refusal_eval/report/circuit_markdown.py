"""A circuit report as a Markdown page with a Mermaid diagram (renders on GitHub), and as Graphviz DOT.

Nodes are laid out by layer from the input tokens (bottom) to the refusal score (top); each node shows its kind,
layer, head and single share. The diagrams draw the significant edges (family-wise over the circuit's edges) with
their path-patching share; the Markdown table lists every edge measured.
"""

from __future__ import annotations

from refusal_eval.circuit import INPUT, SCORE, CircuitReport, DirectionCircuit


def _label(node) -> str:
    where = "all positions" if node.position is None else f"position {node.position}"
    what = f"L{node.layer} head {node.head}" if node.kind == "head" else f"L{node.layer} MLP"
    return f"{what} ({where})"


def _key(node_id: str) -> str:
    return "n_" + "".join(ch if ch.isalnum() else "_" for ch in node_id)


def _in_edges(c: DirectionCircuit) -> set[str]:
    return {e.receiver for e in c.edges if e.receiver != SCORE and e.significant}


def mermaid(c: DirectionCircuit) -> list[str]:
    """The circuit as a Mermaid flowchart, bottom (input) to top (score), one subgraph per layer."""
    lines = ["```mermaid", "flowchart BT", f'  {INPUT}(["input tokens"])', f'  {SCORE}(["refusal score"])']
    for layer in sorted({n.layer for n in c.nodes}):
        lines.append(f'  subgraph layer{layer}["layer {layer}"]')
        lines += [f'    {_key(n.id)}["{_label(n)}<br/>share {n.single_share:.2f}"]'
                  for n in c.nodes if n.layer == layer]
        lines.append("  end")
    fed = _in_edges(c)
    lines += [f"  {INPUT} --> {_key(n.id)}" for n in c.nodes if n.id not in fed]
    for e in c.edges:
        if e.significant:
            receiver = SCORE if e.receiver == SCORE else _key(e.receiver)
            lines.append(f'  {_key(e.sender)} -->|"{e.share:.2f}"| {receiver}')
    if not c.edges:
        lines += [f"  {_key(n.id)} --> {SCORE}" for n in c.nodes]
    lines.append("```")
    return lines


def dot(report: CircuitReport) -> str:
    """Graphviz DOT of every direction's circuit (one cluster each), ranked by layer, input at the bottom."""
    lines = ["digraph refusal_circuit {", "  rankdir=BT;", '  node [shape=box, fontname="Helvetica"];',
             f'  label="{report.model}: refusal circuit ({report.nodes})"; labelloc=t;']
    for c in report.circuits:
        p = c.direction
        lines.append(f"  subgraph cluster_{p} {{")
        lines.append(f'    label="{p} (joint share {_joint(c)})";')
        lines.append(f'    {p}_{INPUT} [label="input tokens", shape=ellipse];')
        lines.append(f'    {p}_{SCORE} [label="refusal score", shape=ellipse];')
        for layer in sorted({n.layer for n in c.nodes}):
            members = [n for n in c.nodes if n.layer == layer]
            lines.append("    { rank=same; " + " ".join(f"{p}_{_key(n.id)};" for n in members) + " }")
            lines += [f'    {p}_{_key(n.id)} [label="{_label(n)}\\nshare {n.single_share:.2f}"];' for n in members]
        fed = _in_edges(c)
        lines += [f"    {p}_{INPUT} -> {p}_{_key(n.id)};" for n in c.nodes if n.id not in fed]
        for e in c.edges:
            if e.significant:
                receiver = f"{p}_{SCORE}" if e.receiver == SCORE else f"{p}_{_key(e.receiver)}"
                width = 1 + 4 * min(1.0, abs(e.share))
                lines.append(f'    {p}_{_key(e.sender)} -> {receiver} [label="{e.share:.2f}", penwidth={width:.1f}];')
        if not c.edges:
            lines += [f"    {p}_{_key(n.id)} -> {p}_{SCORE};" for n in c.nodes]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _joint(c: DirectionCircuit) -> str:
    if c.joint is None:
        return "n/a"
    return f"{c.joint.share:.3f} [{c.joint.ci_low:.3f}, {c.joint.ci_high:.3f}]"


def _ci(x) -> str:
    return f"{x.share:.3f} [{x.ci_low:.3f}, {x.ci_high:.3f}]"


def _frame(c: DirectionCircuit) -> str:
    return ("benign run, harmful activations patched in: which nodes suffice to produce the refusal"
            if c.direction == "denoise" else
            "harmful run, benign activations patched in: which nodes the refusal needs")


def summary_lines(c: DirectionCircuit, level: str) -> list[str]:
    """A few sentences on one direction's circuit, for the terminal and the page (the first names it)."""
    out = [f"{c.direction} ({_frame(c)}):"]
    if not c.found:
        out.append(f"no circuit reaches {c.target:.2f} of the gap: all {c.family_size} nodes patched together "
                   f"recover {_ci(c.all_nodes)}")
        return out
    verb = "recover" if c.direction == "denoise" else "remove"
    if c.rule == "ci_low":
        chosen = f"the smallest set found whose {level} CI lower bound clears {c.target:.2f}"
    elif c.point_estimate is None and c.steps and all(s.rule == "estimate" for s in c.steps):
        chosen = ("the smallest set found whose point estimate reaches the target; "
                  + ("its whole CI lies above the target" if c.clears_target else
                     f"its {level} CI does not lie wholly above it"))  # schema 1.0
    else:
        chosen = (f"no set's {level} CI lower bound clears {c.target:.2f}, so this is the smallest set found whose "
                  "point estimate reaches it, and its CI does not lie wholly above the target")
    out.append(f"{c.size} node(s) of {c.family_size} ({100 * c.fraction:.1f}%) patched together {verb} "
               f"{_joint(c)} of the gap ({level} CI): {chosen}")
    caveat = ("the circuit's nodes still compute in that run and the nodes after them relay its signal, so this is "
              "not a test of other routes")
    if c.complement.share > c.joint.share:
        out.append(f"the complement {verb}s more than the circuit: every other node patched together {verb}s "
                   f"{_ci(c.complement)} of the gap, the circuit {c.joint.share:.3f} ({caveat})")
    p = c.point_estimate
    if p is not None and p.size != c.size:
        out.append(f"by the point estimate alone {p.size} node(s) would do: {_ci(p.joint)}, a CI that does not clear "
                   f"{c.target:.2f}")
    if c.knockout is not None:
        survives = 1 - c.knockout.share
        out.append(f"without it (harmful run, the circuit's nodes given their benign values) {survives:.2f} of the gap "
                   f"survives (knock-out removes {_ci(c.knockout)})")
    if c.complement.share <= c.joint.share:
        out.append(f"complement (every other node patched together) {verb}s {_ci(c.complement)}; {caveat}")
    return out


def step_lines(c: DirectionCircuit) -> list[str]:
    """The search's joint patches as what they are: the ranking's top-k prefixes, then each rule's removals."""
    prefixes: dict[int, tuple[float, float | None]] = {}
    for s in c.steps:
        if s.action in ("prefix", "add"):
            low = s.ci_low if s.ci_low is not None else prefixes.get(s.size, (0.0, None))[1]
            prefixes[s.size] = (s.joint_share, low)

    def value(share: float, low: float | None) -> str:
        return f"{share:.3f}" + ("" if low is None else f" (CI from {low:.3f})")

    out = ["- The ranking's top k nodes patched together, in the order tried: "
           + ", ".join(f"top {k} {value(*v)}" for k, v in prefixes.items())]
    for rule, words in (("estimate", "point estimate"), ("ci_low", "CI lower bound")):
        removals = [s for s in c.steps if s.rule == rule and s.action == "remove"]
        if removals:
            out.append(f"- Pruning by the {words}, the least-ranked members first: "
                       + ", ".join(f"without `{s.id}` ({s.size} left) {value(s.joint_share, s.ci_low)}"
                                   for s in removals))
    return out


def render_circuit_markdown(report: CircuitReport) -> str:
    level = f"{report.level:.0%}"
    lines = [f"# Refusal circuit: {report.model}", "",
             f"- Audit report: `{report.report}`; {report.n_pairs} pairs; nodes: {report.nodes}",
             "- Every number below is a **joint** patch of the set, never a sum of single shares; CIs are "
             f"{level} pair-bootstrap (BCa, {report.n_resamples} resamples, seed {report.seed})",
             f"- Search time {report.seconds:.1f} s, against {report.audit_seconds:.1f} s for the audit itself "
             f"({report.seconds / max(report.audit_seconds, 1e-9):.1f}×)", ""]
    if report.differences:
        lines += [report.differences, ""]
    for c in report.circuits:
        lines += [f"## {c.direction}", ""] + [f"- {s}" for s in summary_lines(c, level)[1:]]
        lines += [f"- Frame: {_frame(c)}",
                  f"- All {c.family_size} nodes together: {_ci(c.all_nodes)}; ranking: {c.ranking}; "
                  f"{c.patched_sets} joint patches; {c.seconds:.1f} s", ""]
        if c.nodes:
            lines += ["| node | kind | layer | head | position | single share |", "|---|---|---|---|---|---|"]
            lines += [f"| `{n.id}` | {n.kind} | {n.layer} | {'' if n.head is None else n.head} | "
                      f"{'all' if n.position is None else n.position} | {n.single_share:.3f} |" for n in c.nodes]
            lines += ["", "Diagram (edge labels: path-patching share of the gap; only edges significant family-wise "
                      "over this circuit's edges are drawn, the table below lists them all):", ""]
            lines += mermaid(c) + [""]
            if c.edges_note:
                lines += [f"Note: {c.edges_note}.", ""]
            if c.edges:
                lines += ["| sender | receiver | share | CI | family-wise CI | significant |",
                          "|---|---|---|---|---|---|"]
                lines += [f"| `{e.sender}` | `{e.receiver}` | {e.share:.3f} | [{e.ci_low:.3f}, {e.ci_high:.3f}] | "
                          f"[{e.fw_low:.3f}, {e.fw_high:.3f}] | {'yes' if e.significant else 'no'} |" for e in c.edges]
                lines.append("")
        lines += ["Search (each a joint patch; the share of the gap it recovers):", "", *step_lines(c), ""]
    lines += ["## Reproduce", "", f"- Command: `{report.command or '(Python API)'}`",
              f"- Weights sha256 `{report.weights_sha256}`; dataset sha256 `{report.dataset_sha256}`",
              f"- Created {report.created}", ""]
    return "\n".join(lines)


def write_circuit(report: CircuitReport, folder) -> list:
    """circuit.json, circuit.md and circuit.dot in ``folder``, all or none; returns their paths."""
    from pathlib import Path

    from refusal_eval.report.writers import write_files

    folder = Path(folder)
    paths = [folder / "circuit.json", folder / "circuit.md", folder / "circuit.dot"]
    write_files(dict(zip(paths, [report.model_dump_json(indent=1) + "\n", render_circuit_markdown(report),
                                 dot(report)], strict=True)))
    return paths
