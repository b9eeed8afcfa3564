#!/usr/bin/env python
"""Run the console examples of README.md and the docs and regenerate the committed example reports; check both.

The pages are README.md first, then every page of ``mkdocs.yml``'s ``nav``, in nav order (``docs/...``). Every
fenced block of a page whose first line starts with ``$ `` is an example: the examples of all pages are run in that
order (a page's blocks top to bottom), each block's commands in one bash shell, all in ONE scratch folder, so a
block may read what an earlier block or page wrote. That folder's ``reports/`` (the default output folder,
git-ignored) starts as a copy of the committed example reports, ``examples/reports/`` (``datasets/``, ``examples/``,
``refusal_eval/`` and ``scripts/`` are linked there, so the pages' relative paths work), and what the commands print
(stdout and stderr together) must be what the page shows. A problem names the page and line
(``docs/commands/gate.md:12: ...``). In a page's text:

* a line ``…`` (or ``...``) stands for any number of printed lines, and a line ending in ``…`` for any line
  that starts with the text before it;
* ``<!-- example: slow REASON -->`` just before a block runs it only with ``--all`` (SmolLM2 audits take
  minutes); ``<!-- excerpt: PATH -->`` marks a block as an excerpt of a committed file: its lines must appear
  in that file, in order.

After the examples have run, every report folder they rewrote that has a committed copy under ``examples/reports/``
is compared with it:
JSON files by value, Markdown and DOT files as text (run times, dates, absolute paths and memory masked). PNGs
are not compared (their bytes depend on the installed matplotlib and fonts); ``update`` rewrites them.

**Tolerance.** Another CPU rounds float32 differently (effects move by about 1e-5), so numbers are compared
within what that can change, and nothing else is: JSON numbers within 1e-4 absolute or 1e-4 relative (a category's
share CI in the heterogeneity table, a BCa bound over 7 pairs, within 0.01 or 2%; integers, booleans and strings
exactly); in printed lines, Markdown and JSON strings, a number shown with two or more
decimals (or in e-notation) may differ by one unit in its last digit. Integers (counts), numbers with one
decimal, words and verdicts must be identical.

    python scripts/examples.py check           # the fast examples (tiny-refuser): about 2 minutes on 2 cores
    python scripts/examples.py check --all     # also the SmolLM2 ones (about 35 minutes on 2 cores)
    python scripts/examples.py update [--all]  # rewrite the pages' outputs and the committed reports from fresh runs
    python scripts/examples.py update --all --match reports/erosion   # only the examples whose commands say so
    python scripts/examples.py refresh         # re-derive the committed reports' derived sections (seconds)

``refresh`` makes a committed report's derived sections again with the current code from the report's own numbers,
without a model: portable paths, the findings, the heterogeneity table, the Markdown, and comparisons recomputed
from the refreshed reports. It is for a change of wording or of a derived section when rerunning the slow SmolLM2
audits does not fit; the next ``update --all`` reruns them, and the check holds the two within its tolerance.

``check`` exits 1 and prints a diff for every stale output or file. ``update`` rewrites a block whose text has no
``…`` in the page it came from; a block with an elision is printed for a hand edit. ``tests/test_readme.py`` runs
``check`` (and ``mkdocs build --strict``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# The docs site: its nav lists the docs pages, whose examples run after the README's, in nav order.
MKDOCS = REPO / "mkdocs.yml"
# The committed example reports: what the pages' commands write to reports/ (the git-ignored default output).
COMMITTED = REPO / "examples" / "reports"
LINKED = ("datasets", "examples", "refusal_eval", "scripts")
ELLIPSIS = ("…", "...")
# Commands that regenerate committed files the docs show only in excerpts or name (run with --all).
EXTRA_SLOW = [
    "refusal-eval circuit 'reports/SmolLM2-135M-Instruct.Q4_1+smollm2-refuser-lora/report.json' "
    "--nodes last --max-edge-nodes 8 --quiet",
]


@dataclass
class Example:
    """One console block of a page."""

    line: int  # 1-based line of the opening fence
    commands: list[str]
    expected: list[list[str]]  # the lines shown after each command
    slow: str | None = None  # the reason it runs only with --all
    source: str = "README.md"  # the page it is in, relative to the repository root

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def text(self) -> str:
        return "\n".join(line for c, out in zip(self.commands, self.expected, strict=True)
                         for line in ["$ " + c, *out])


@dataclass
class Excerpt:
    line: int
    path: str  # the committed file it quotes
    lines: list[str]
    source: str = "README.md"  # the page it is in

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class Problems:
    items: list[str] = field(default_factory=list)

    def add(self, title: str, detail: str = "") -> None:
        self.items.append(title + ("\n" + detail if detail else ""))

    def __bool__(self) -> bool:
        return bool(self.items)


# -- pages and parsing -------------------------------------------------------------------------------------------


def nav_pages(config: Path | None = None) -> list[Path]:
    """The Markdown pages of ``mkdocs.yml``'s ``nav``, in nav order (nested sections depth first)."""
    import yaml

    config = MKDOCS if config is None else config

    class Loader(yaml.SafeLoader):
        pass

    # Material's config may hold tags such as !!python/name:...; the nav needs none of them
    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    data = yaml.load(config.read_text(), Loader=Loader) or {}
    docs_dir = config.parent / data.get("docs_dir", "docs")
    out: list[Path] = []

    def walk(item) -> None:
        if isinstance(item, str):
            if item.endswith(".md") and "://" not in item:
                out.append(docs_dir / item)
        elif isinstance(item, dict):
            for value in item.values():
                walk(value)
        elif isinstance(item, list):
            for value in item:
                walk(value)

    walk(data.get("nav", []))
    return out


def pages() -> list[Path]:
    """The pages whose examples run, in the order they run: README.md, then the docs nav in order."""
    return [README, *(nav_pages() if MKDOCS.is_file() else [])]


def page_name(path: Path) -> str:
    """A page as problems name it: its path from the repository root."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _blocks(text: str):
    """(fence line number, info string, lines, marker comment before the fence) for every fenced block."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        start, info = i, m.group(1).strip()
        j = i + 1
        while j < len(lines) and lines[j] != "```":
            j += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = lines[k].strip() if k >= 0 and lines[k].strip().startswith("<!--") else ""
        yield start + 1, info, lines[start + 1 : j], marker
        i = j + 1


def parse_page(text: str, source: str = "README.md") -> tuple[list[Example], list[Excerpt]]:
    """The console examples and excerpts of one page (``source``: its name in problems), top to bottom."""
    examples, excerpts = [], []
    for line_no, info, body, marker in _blocks(text):
        m = re.match(r"<!--\s*excerpt:\s*(\S+)\s*-->", marker)
        if m:
            excerpts.append(Excerpt(line_no, m.group(1), body, source))
            continue
        if info or not body or not body[0].startswith("$ "):
            continue
        commands: list[str] = []
        expected: list[list[str]] = []
        continued = False
        for line in body:
            if continued:
                commands[-1] += "\n" + line
            elif line.startswith("$ "):
                commands.append(line[2:])
                expected.append([])
            else:
                expected[-1].append(line)
            continued = line.endswith("\\")
        m = re.match(r"<!--\s*example:\s*slow\s*(.*?)\s*-->", marker)
        examples.append(Example(line_no, commands, expected, slow=(m.group(1) or "slow") if m else None,
                                source=source))
    return examples, excerpts


def parse_pages(paths: list[Path] | None = None) -> tuple[list[Example], list[Excerpt]]:
    """The examples and excerpts of every page (default: ``pages()``), in run order."""
    examples, excerpts = [], []
    for path in pages() if paths is None else paths:
        e, x = parse_page(path.read_text(), page_name(path))
        examples += e
        excerpts += x
    return examples, excerpts


# -- matching ----------------------------------------------------------------------------------------------------


# A number as printed: not part of a word or a dotted name (blocks.0.hook_mlp_out), optionally in e-notation.
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w])")
JSON_REL, JSON_ABS = 1e-4, 1e-4
# A sign-flip p-value counts the permutation statistics at or above the observed one. Where some of a component's
# effects sit at float-noise level, another CPU's rounding reorders near-ties among those statistics: committed
# p-values are compared within 0.02 (up to 0.013 seen between two CPUs). Verdicts (`significant`) are compared exactly.
P_KEYS, P_ABS = {"p_permutation", "p_permutation_fw"}, 0.02


def _unit(text: str) -> float | None:
    """One unit in the last digit of a printed number, when it may differ by that much (None: compare exactly)."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    if exponent:
        return 10.0 ** (int(exponent) - decimals)
    return 10.0 ** -decimals if decimals >= 2 else None


def float_noise(want: str, got: str) -> bool:
    """Both printed in e-notation and below ``JSON_ABS``: a noise floor or an interval margin, float noise itself,
    which differs by CPU."""
    return "e" in want.lower() and "e" in got.lower() and max(abs(float(want)), abs(float(got))) < JSON_ABS


def numbers_close(want: str, got: str) -> bool:
    """Two printed numbers say the same thing: identical, (see ``_unit``) within one unit in the last digit, or both
    float noise (``float_noise``)."""
    if want == got or float_noise(want, got):
        return True
    unit = _unit(want)
    return unit is not None and _unit(got) == unit and abs(float(want) - float(got)) <= unit * (1 + 1e-9)


def text_matches(want: str, got: str, close=numbers_close) -> bool:
    """Same words in the same places, numbers within the printed tolerance (``numbers_close``, or ``close``)."""
    a, b = NUMBER.split(want), NUMBER.split(got)
    na, nb = NUMBER.findall(want), NUMBER.findall(got)
    return a == b and len(na) == len(nb) and all(close(x, y) for x, y in zip(na, nb, strict=True))


def _line_pattern(line: str, numbers: list[str]) -> str:
    """A line as a regex: words literal, every number a group (checked afterwards by ``numbers_close``)."""
    out, at = [], 0
    for m in NUMBER.finditer(line):
        out += [re.escape(line[at:m.start()]), r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"]
        numbers.append(m.group())
        at = m.end()
    return "".join(out) + re.escape(line[at:])


def _pattern(expected: list[str]) -> tuple[re.Pattern, list[str]]:
    parts, numbers = [], []
    for line in expected:
        if line.strip() in ELLIPSIS:
            parts.append(r"(?:[^\n]*\n)*?")
        elif line.endswith("…"):
            parts.append(_line_pattern(line[:-1], numbers) + r"[^\n]*\n")
        else:
            parts.append(_line_pattern(line, numbers) + r"\n")
    return re.compile("".join(parts)), numbers


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Whether the printed lines are what the page shows (with its elisions; numbers within the tolerance)."""
    pattern, numbers = _pattern(expected)
    m = pattern.fullmatch("".join(a + "\n" for a in actual))
    return m is not None and all(numbers_close(w, g) for w, g in zip(numbers, m.groups(), strict=True))


_PROGRESS = re.compile(r"\r|\d+%\|")


def _clean(output: str) -> list[str]:
    """Printed lines without progress-bar redraws and trailing blanks (tables pad their lines)."""
    lines = [line.rstrip() for line in output.rstrip("\n").split("\n") if not _PROGRESS.search(line)]
    return lines if output.strip() else []


# -- running -----------------------------------------------------------------------------------------------------

SEP = "\x1e@@example-command@@"


def prepare_workdir(workdir: Path) -> None:
    """A scratch folder that looks like the repository root to the pages' commands."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = workdir / name
        if not link.exists():
            link.symlink_to(REPO / name, target_is_directory=True)
    shutil.copytree(COMMITTED, workdir / "reports", dirs_exist_ok=True)


def committed_copy(rel: Path) -> Path:
    """The committed example of a path the pages' commands write under reports/."""
    return COMMITTED / rel.relative_to("reports")


def fresh_copy(excerpt_path: str, workdir: Path) -> Path:
    """Where a fresh run wrote the committed file an excerpt quotes (examples/reports/X -> reports/X)."""
    rel = Path(excerpt_path)
    if rel.parts[:2] == ("examples", "reports"):
        return workdir / "reports" / Path(*rel.parts[2:])
    return workdir / rel


def run_example(example: Example, workdir: Path, env: dict[str, str]) -> list[list[str]]:
    """Run one block's commands in one bash shell; the printed lines of each command."""
    script = ["__rc=0"]
    for command in example.commands:
        script += [f"printf '%s\\n' '{SEP}'", f"(exit $__rc); {{ {command}\n}} 2>&1; __rc=$?"]
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=workdir, env=env, capture_output=True)
    stdout = done.stdout.decode("utf-8", "replace")  # not text=True: progress bars' \r must survive to be dropped
    chunks = stdout.split(SEP + "\n")[1:]
    if len(chunks) != len(example.commands):
        raise RuntimeError(f"{example.where}: the example's shell did not run every command:\n"
                           f"{stdout}{done.stderr.decode('utf-8', 'replace')}")
    return [_clean(chunk) for chunk in chunks]


def example_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", COLUMNS="120", TQDM_DISABLE="1", PATH=f"{Path(sys.executable).parent}:"
               + env.get("PATH", ""))
    return env


# -- comparing committed files -----------------------------------------------------------------------------------

# JSON keys whose values differ from run to run or machine to machine (never numbers of the audit).
VOLATILE_KEYS = {
    "created", "report_created", "command", "source", "path", "tricky_path", "dataset_path", "calibration_path",
    "environment", "runtime_seconds", "seconds", "audit_seconds", "peak_memory_bytes", "peak_memory_kind",
    "batch_rows", "patched_forwards", "report_path",
}
_MASKS = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:\+00:00|Z)?"), "<time>"),
    (re.compile(r"(?:(?:/[^\s`'\"|)]+)?/|\b)(datasets|refusal_eval|examples|reports)/"), r"<repo>/\1/"),
    (re.compile(r"/[^\s`'\"|)]*?/site-packages/"), "<site-packages>/"),
    (re.compile(r"\b\d+(?:\.\d+)? s\b"), "<t> s"),
    (re.compile(r"\(\d+(?:\.\d+)?×\)"), "(<ratio>)"),
    (re.compile(r"^- Environment: .*$", re.M), "- Environment: <environment>"),
    (re.compile(r"\d+ batched forwards of up to \d+ rows"), "<n> batched forwards of up to <rows> rows"),
    (re.compile(r"peak memory [\d.]+ [KMG]iB"), "peak memory <memory>"),
    (re.compile(r"^- Command: .*$", re.M), "- Command: <command>"),
]


def mask_text(text: str) -> str:
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    return text


CATEGORY_CI_REL, CATEGORY_CI_ABS = 0.02, 0.01  # share units


def json_differences(committed, fresh, where: str = "$", rel: float = JSON_REL, limit: int = 20) -> list[str]:
    """Where two JSON values differ: floats beyond ``rel`` relative and ``JSON_ABS`` absolute, integers at all,
    strings beyond ``text_matches``, any other value, keys, lengths."""
    out: list[str] = []

    def walk(a, b, path):
        if len(out) >= limit:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key in VOLATILE_KEYS:
                    continue
                if key not in a or key not in b:
                    out.append(f"{path}.{key}: only in {'the fresh run' if key in b else 'the committed file'}")
                else:
                    walk(a[key], b[key], f"{path}.{key}")
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                out.append(f"{path}: {len(a)} items committed, {len(b)} in the fresh run")
            for i, (x, y) in enumerate(zip(a, b, strict=False)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and not isinstance(b, bool):
            if a != b:
                out.append(f"{path}: committed {a!r}, fresh {b!r}")
        elif (isinstance(a, (int, float)) and isinstance(b, (int, float))
              and not isinstance(a, bool) and not isinstance(b, bool)):
            # a category's share CI is a BCa interval of a ratio of sums over its few pairs (7 here): where resamples
            # tie with the estimate (7 pairs: about 12 of 2000), rounding moves BCa's bias correction and the bound by
            # a few thousandths of a share (0.0017 for a heterogeneity row on one thread against two)
            category = ".by_category." in path and path.endswith(("ci_low", "ci_high"))
            tol = CATEGORY_CI_REL if category else rel
            floor = CATEGORY_CI_ABS if category else P_ABS if path.rsplit(".", 1)[-1] in P_KEYS else JSON_ABS
            if not math.isclose(a, b, rel_tol=tol, abs_tol=floor):
                out.append(f"{path}: committed {a!r}, fresh {b!r}")
        elif isinstance(a, str) and isinstance(b, str):
            if not text_matches(mask_text(a), mask_text(b)):
                out.append(f"{path}: committed {a[:120]!r}, fresh {b[:120]!r}")
        elif a != b:
            out.append(f"{path}: committed {str(a)[:120]!r}, fresh {str(b)[:120]!r}")

    walk(committed, fresh, where)
    return out


def compare_file(committed: Path, fresh: Path) -> str:
    """'' when the fresh file says what the committed one says; else a description of the differences."""
    if committed.suffix == ".json":
        diffs = json_differences(json.loads(committed.read_text()), json.loads(fresh.read_text()))
        return "\n".join("  " + d for d in diffs)
    a, b = mask_text(committed.read_text()), mask_text(fresh.read_text())
    if a == b or text_matches(a, b):
        return ""
    diff = difflib.unified_diff(a.splitlines(), b.splitlines(), "committed", "fresh", lineterm="", n=1)
    return "\n".join(list(diff)[:40])


def rewritten_folders(workdir: Path, since: float) -> list[Path]:
    """Report folders under the scratch reports/ that the examples wrote into."""
    folders = set()
    for path in (workdir / "reports").rglob("*"):
        if path.is_file() and path.stat().st_mtime >= since:
            folders.add(path.parent)
    return sorted(folders)


def check_committed(workdir: Path, since: float, problems: Problems) -> list[Path]:
    """Compare every committed example file the examples rewrote; the committed folders that are stale."""
    stale_folders = []
    for folder in rewritten_folders(workdir, since):
        rel = folder.relative_to(workdir)
        if not committed_copy(rel).is_dir():  # an output a page shows but the project does not commit
            continue
        before = len(problems.items)
        for fresh in sorted(folder.iterdir()):
            if fresh.suffix not in (".json", ".md", ".dot"):
                continue
            committed = committed_copy(rel) / fresh.name
            if not committed.is_file():
                problems.add(f"{rel / fresh.name}: written by an example but not committed")
                continue
            detail = compare_file(committed, fresh)
            if detail:
                problems.add(f"{rel / fresh.name}: the committed file is stale", detail)
        if len(problems.items) > before:
            stale_folders.append(rel)
    return stale_folders


def check_excerpts(excerpts: list[Excerpt], workdir: Path | None, problems: Problems) -> None:
    """Every excerpt's lines are in its file, in order, every number as printed but float noise (``float_noise``):
    the committed file, or (``workdir``) the fresh run's."""
    for ex in excerpts:
        path = REPO / ex.path if workdir is None else fresh_copy(ex.path, workdir)
        if not path.is_file():
            problems.add(f"{ex.where}: excerpt of {ex.path}, which does not exist")
            continue
        lines = path.read_text().split("\n")
        at = 0
        for want in ex.lines:
            if not want.strip() or want.strip() in ELLIPSIS:
                continue
            found = next((i for i in range(at, len(lines)) if lines[i] == want
                          or text_matches(want, lines[i], lambda x, y: x == y or float_noise(x, y))), None)
            if found is None:
                problems.add(f"{ex.where}: excerpt line not in {ex.path} (in this order)", "  " + want)
                break
            at = found + 1


# -- main --------------------------------------------------------------------------------------------------------


def run_all(include_slow: bool, workdir: Path, update: bool = False, match: str | None = None) -> Problems:
    import time

    examples, excerpts = parse_pages()
    problems = Problems()
    prepare_workdir(workdir)
    env = example_env()
    since = time.time() - 1
    replacements: list[tuple[Example, str]] = []
    for example in examples:
        if (example.slow and not include_slow) or (match and not any(match in c for c in example.commands)):
            continue
        actual = run_example(example, workdir, env)
        stale = False
        for command, want, got in zip(example.commands, example.expected, actual, strict=True):
            if not output_matches(want, got):
                stale = True
                diff = difflib.unified_diff(want, got, example.source, "printed", lineterm="", n=2)
                problems.add(f"{example.where}: `$ {command.splitlines()[0]}` prints something else",
                             "\n".join(diff))
        if stale:
            replacements.append((example, Example(example.line, example.commands, actual, example.slow,
                                                  example.source).text))
    if include_slow:
        for command in EXTRA_SLOW if not match else [c for c in EXTRA_SLOW if match in c]:
            subprocess.run(["bash", "-c", command], cwd=workdir, env=env, check=True)
    folders = check_committed(workdir, since, problems)
    check_excerpts(excerpts, workdir if update else None, problems)
    if update:
        _update(replacements, folders, workdir)
    return problems


def _update(replacements: list[tuple[Example, str]], folders: list[Path], workdir: Path) -> None:
    """Rewrite each stale block in the page it came from, and copy the rewritten report folders back."""
    texts: dict[str, str] = {}
    for example, new in replacements:
        if any(line.strip() in ELLIPSIS or line.endswith("…") for out in example.expected for line in out):
            print(f"{example.where}: has an elision; edit by hand. Printed:\n{new}\n")
            continue
        if example.source not in texts:
            texts[example.source] = (REPO / example.source).read_text()
        texts[example.source] = texts[example.source].replace(example.text, new, 1)
        print(f"{example.where}: output rewritten")
    for source, text in texts.items():
        (REPO / source).write_text(text)
    for rel in folders:
        committed_copy(rel).mkdir(parents=True, exist_ok=True)
        for fresh in sorted((workdir / rel).iterdir()):
            if fresh.is_file() and fresh.suffix in (".json", ".md", ".dot", ".png"):
                shutil.copy2(fresh, committed_copy(rel) / fresh.name)
        print(f"{committed_copy(rel).relative_to(REPO)}: rewritten from the fresh run")


def _portable_command(command: str) -> str:
    from refusal_eval.paths import command_line

    words = shlex.split(command)
    return command_line(words[1:]) if words and words[0] == "refusal-eval" else command


def refresh_report(report):
    """A committed audit report with its derived sections made again by the current code from its own numbers (no
    model run): portable paths (command, config, source, dataset paths), the findings and the heterogeneity. The
    shares, intervals and verdicts are the run's and are not touched."""
    import numpy as np

    from refusal_eval.paths import portable
    from refusal_eval.pipeline.controls import heterogeneity, last_position_finding

    r = report.model_copy(deep=True)
    r.command = _portable_command(r.command)
    r.config = {k: portable(v) if isinstance(v, str) else v for k, v in r.config.items()}
    base, _, adapter = r.model.source.partition(" + adapter ")
    r.model.source = portable(base) + (f" + adapter {portable(adapter)}" if adapter else "")
    d = r.dataset
    d.path = portable(d.path)
    d.tricky_path = d.tricky_path and portable(d.tricky_path)
    d.calibration_path = d.calibration_path and portable(d.calibration_path)
    by_id = {p.id: p for p in r.pairs}
    gaps = np.array([by_id[i].m_harmful - by_id[i].m_benign for i in r.used_pair_ids])
    s = r.stats
    r.findings = last_position_finding(r.components, gaps, s.level, s.n_resamples, s.method, s.seed)
    shares_defined = r.gap.separated if r.shares_defined is None else r.shares_defined
    r.heterogeneity = heterogeneity(r.components, gaps, [by_id[i].category for i in r.used_pair_ids],
                                    r.used_pair_ids, s.level, s.n_resamples, s.seed) if shares_defined else []
    return type(r).model_validate(r.model_dump())


def refresh(match: str | None = None) -> None:
    """``refresh``: every committed audit report (and comparison) under ``examples/reports/`` rewritten by
    :func:`refresh_report` (comparisons recomputed from the refreshed reports with their own statistics settings),
    with its Markdown rendered again. For the slow examples, whose audits take minutes: a later ``update --all``
    reruns them, and the check compares the two within its tolerance."""
    from refusal_eval.compare import compare_reports
    from refusal_eval.report.comparison_markdown import render_comparison_markdown
    from refusal_eval.report.markdown import render_markdown
    from refusal_eval.report.schema import AuditReport

    reports = {}
    for path in sorted(COMMITTED.rglob("report.json")):
        if match and match not in str(path):
            continue
        report = refresh_report(AuditReport.model_validate_json(path.read_text()))
        pictures = sorted(p.name for p in path.parent.glob("*.png"))
        path.write_text(report.model_dump_json(indent=1) + "\n")
        (path.parent / "report.md").write_text(render_markdown(report, pictures=pictures))
        reports[path.parent] = report
        print(f"{path.relative_to(REPO)}: refreshed")
    from refusal_eval.report.comparison_schema import ComparisonReport

    for path in sorted(COMMITTED.rglob("comparison.json")):
        old = ComparisonReport.model_validate_json(path.read_text())
        names = {r.model.name: (folder, r) for folder, r in reports.items() if folder.parent == path.parent.parent}
        if old.a.name not in names or old.b.name not in names:
            continue
        st = old.stats
        c = compare_reports(names[old.a.name][1], names[old.b.name][1], n_boot=st.n_resamples, level=st.level,
                            method=st.method, seed=st.seed, min_diff=st.min_diff,
                            command=_portable_command(old.command))
        pictures = sorted(p.name for p in path.parent.glob("*.png"))
        path.write_text(c.model_dump_json(indent=1) + "\n")
        (path.parent / "comparison.md").write_text(render_comparison_markdown(c, pictures=pictures))
        print(f"{path.relative_to(REPO)}: recomputed from the refreshed reports")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["check", "update", "refresh"])
    parser.add_argument("--all", action="store_true", help="also the slow (SmolLM2) examples")
    parser.add_argument("--match", metavar="TEXT",
                        help="run only the examples with a command containing TEXT (and check only what they wrote)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.action == "refresh":
        refresh(args.match)
        return 0
    with tempfile.TemporaryDirectory(prefix="readme-examples-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        problems = run_all(args.all, workdir, update=args.action == "update", match=args.match)
    for item in problems.items:
        print(item + "\n")
    if args.action == "check":
        print("README and docs examples and committed reports are up to date" if not problems
              else f"{len(problems.items)} stale example(s) or file(s): run `python scripts/examples.py update`")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
