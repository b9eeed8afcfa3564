#!/usr/bin/env python
"""Recovery of planted refusal (issue 25): the audit on organisms whose refusal lives where we put it.

Builds (or reuses, under ``--root``) the tiny base that does not refuse and the tiny plants of
``scripts/plant_refusal.py`` (``TINY_PLANTS``), or takes SmolLM2 adapters that carry a ``planted.json``
(``--smollm2 DIR ...``). Audits each in the noising direction, every position patched together, components
attn_out, mlp_out and heads (BENCHMARKS.md, "Planted refusal": the criteria fixed before any organism was built),
with each ``--methods``, and prints one table:

* preconditions: the base's behaviour gate fails; each organism's passes and its shares are defined;
* criterion 1: the planted set's joint noising share with its CI (a real joint patch, exact);
* criterion 2: the planted component's rank (single-module plants must be 1) and what ranks first;
* criterion 3: whether the noising circuit (``refusal-eval circuit``, nodes all, target 0.8) has a node inside every
  planted module;
* reported: AUROC, precision and recall of what the audit names, and the unplanted components named.

Also, not among the criteria and labelled so: the same audit at the last position only (``--also-last``).

Usage::

    python benchmarks/planted.py                         # tiny organisms, three methods (about 2 min, 2 cores)
    python benchmarks/planted.py --json /tmp/planted.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ["attn_out", "mlp_out", "head"]


def load_script():
    spec = importlib.util.spec_from_file_location("plant_refusal", REPO / "scripts" / "plant_refusal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_organisms(root: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny base and plants under ``root`` (built where missing)."""
    built = load_script().build_tiny(root)
    return built.pop("base"), built


def audit_config(model: str, adapter: str | None = None, method: str = "exact", positions=("all",), **extra):
    from refusal_eval import AuditConfig

    # the refusal direction is not part of recovery (its layer beside the plants: benchmarks/direction_planted.py)
    return AuditConfig(model=model, adapter=adapter, direction="noise", positions=list(positions), components=KINDS,
                       method=method, seed=0, refusal_direction="off", **extra)


def circuit_has_plant(circuit, planted) -> dict[str, bool]:
    """Criterion 3: per planted module, whether a circuit node lies inside it."""
    from refusal_eval.patching.components import Component

    nodes = [Component(n.kind, n.layer, n.head, n.position) for n in circuit.nodes]
    return {s.module + (f" heads {list(s.heads)}" if s.heads else ""): any(s.holds(n) for n in nodes)
            for s in planted.site_list}


def evaluate(name: str, model: str, adapter: str | None, methods, also_last: bool, options: dict) -> dict:
    from refusal_eval import audit
    from refusal_eval.circuit import run_circuit
    from refusal_eval.planted import joint_shares, load_planted, recovery

    planted = load_planted(Path(adapter or model))
    row: dict = {"organism": name, "sites": planted.sites, "planted": planted.components}
    for method in methods:
        started = time.perf_counter()
        report = audit(audit_config(model, adapter, method, **options), progress=False)
        entry: dict = {"refuses": report.behaviour.refuses, "shares_defined": report.shares_defined,
                       "gap": report.gap.mean, "seconds": None}
        if report.shares_defined:
            entry["recovery"] = recovery(report, planted).model_dump()
            if method == "exact":
                joint = joint_shares(report, name, {"planted": planted.components}, model=model, adapter=adapter)
                entry["joint"] = joint["planted"][0].model_dump()
                circuit = run_circuit(report, name, model=model, adapter=adapter, directions=("noise",),
                                      family="all", max_edge_nodes=0).circuits[0]
                entry["circuit"] = {"found": circuit.found, "nodes": [n.id for n in circuit.nodes],
                                    "joint": circuit.joint.model_dump() if circuit.joint else None,
                                    "has_plant": circuit_has_plant(circuit, planted)}
        else:
            entry["reason"] = report.shares_reason
        entry["seconds"] = round(time.perf_counter() - started, 1)
        row[method] = entry
    if also_last:
        report = audit(audit_config(model, adapter, "exact", positions=("last",), **options), progress=False)
        if report.shares_defined:
            ranked = sorted((c for c in report.components if c.share is not None and c.kind in KINDS
                             and c.trivial is None), key=lambda c: -c.share)
            row["last_position"] = {"top": [(c.id, round(c.share, 3)) for c in ranked[:3]],
                                    "planted_shares": {c.id: c.share for c in ranked
                                                       if c.id.split("@")[0] in planted.components}}
    return row


def base_row(model: str, options: dict) -> dict:
    from refusal_eval import audit

    config = audit_config(model, **options).model_copy(update={"components": ["mlp_out"], "positions": ["last"]})
    report = audit(config, progress=False)  # behaviour and gap only: the components do not matter here
    h = report.behaviour
    return {"organism": "base", "refuses": h.refuses, "shares_defined": report.shares_defined,
            "reason": report.shares_reason, "gap": report.gap.mean}


def _fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def table(base: dict, rows: list[dict], methods) -> str:
    lines = [f"base: behaviour gate {'passes' if base['refuses'] else 'fails'} (shares "
             f"{'defined' if base['shares_defined'] else 'undefined'}: {base['reason']})", "",
             "| organism | method | refuses | joint share [CI] (crit. 1) | planted rank (crit. 2) | first | "
             "circuit has plant (crit. 3) | AUROC | precision | recall | named, unplanted |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for method in methods:
            e = row[method]
            if not e["shares_defined"]:
                lines.append(f"| {row['organism']} | {method} | {e['refuses']} | shares undefined: {e['reason']} "
                             "| | | | | | | |")
                continue
            r = e["recovery"]
            joint = e.get("joint")
            joint_s = f"{joint['share']:.3f} [{joint['ci_low']:.3f}, {joint['ci_high']:.3f}]" if joint else ""
            circ = e.get("circuit")
            circ_s = (", ".join(f"{'yes' if v else 'NO'}" for v in circ["has_plant"].values())
                      + f" ({len(circ['nodes'])} nodes)") if circ else ""
            ranks = ", ".join(str(v) for v in r["planted_ranks"].values())
            lines.append(
                f"| {row['organism']} | {method} | {e['refuses']} | {joint_s} | {ranks} of {r['ranked']} | "
                f"{r['top']} | {circ_s} | {_fmt(r['auroc'])} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | "
                f"{len(r['named_unplanted'])} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/refusal-eval-planted"), help="tiny organisms (built here)")
    p.add_argument("--smollm2", type=Path, nargs="*", default=[], help="SmolLM2 adapter folders with planted.json")
    p.add_argument("--no-tiny", action="store_true")
    p.add_argument("--methods", nargs="+", default=["exact", "attribution", "attribution+verify"])
    p.add_argument("--also-last", action="store_true", help="also the exact audit at the last position (reported)")
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    started = time.perf_counter()
    options = {"max_pairs": args.max_pairs}
    out: dict = {"tiny": None, "smollm2": None}
    if not args.no_tiny:
        base, plants = tiny_organisms(args.root)
        b = base_row(str(base), options)
        rows = [evaluate(name, str(path), None, args.methods, args.also_last, options) for name, path in plants.items()]
        out["tiny"] = {"base": b, "rows": rows}
        print("## tiny organisms\n\n" + table(b, rows, args.methods) + "\n")
    if args.smollm2:
        from refusal_eval.models.loading import smollm2_gguf

        gguf = str(smollm2_gguf())
        b = base_row(gguf, options)
        rows = [evaluate(path.name, gguf, str(path), args.methods, args.also_last, options) for path in args.smollm2]
        out["smollm2"] = {"base": b, "rows": rows}
        print("## SmolLM2 organisms\n\n" + table(b, rows, args.methods) + "\n")
    out["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{out['seconds']} s in all")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
