"""README.md and the docs site cannot drift: their console examples are run (README first, then the pages of
``mkdocs.yml``'s nav in order), their excerpts are read from the committed files, the committed example reports are
what the code produces today (``scripts/examples.py``), and ``mkdocs build --strict`` passes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
QUICKSTART = ('pip install -e . && refusal-eval run', 'pip install -e ".[test]" && pytest -n auto --dist loadfile')


def _load_examples_script():
    spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "scripts" / "examples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ex = _load_examples_script()
PAGES = ex.pages()  # README.md, then the docs nav in order


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _all_text() -> str:
    return "\n".join(page.read_text() for page in PAGES)


@pytest.mark.slow
def test_readme_examples_and_committed_reports_are_current(tmp_path):
    problems = ex.run_all(include_slow=False, workdir=tmp_path)
    assert not problems, ("\n\n".join(problems.items)
                          + "\n\nrun `python scripts/examples.py update` and review the diff (see its docstring)")


def test_every_console_block_is_an_example_and_slow_ones_say_why():
    examples, excerpts = ex.parse_pages()
    fast = [e for e in examples if not e.slow]
    assert len(fast) >= 7 and len(excerpts) >= 3
    assert {e.source for e in fast} >= {"README.md", "docs/commands/gate.md"}  # the README and the docs both run
    for e in examples:
        assert e.commands and all(c.strip() for c in e.commands)
        if e.slow:
            assert len(e.slow) > 10, f"{e.where}: a slow example needs its reason"
    # a block that shows printed output after a `$` line must be an example (not hidden behind an info string)
    for page in PAGES:
        for line_no, info, body, _ in ex._blocks(page.read_text()):
            if any(b.startswith("$ ") for b in body):
                assert not info and body[0].startswith("$ "), \
                    f"{_name(page)}:{line_no}: console block not run as an example"


def test_every_docs_page_is_in_the_nav_so_its_examples_run():
    """A page under docs/ that the nav leaves out would never have its console blocks run."""
    nav = ex.nav_pages()
    assert PAGES[0] == README and PAGES[1:] == nav and len(set(nav)) == len(nav)
    assert sorted(nav) == sorted((ROOT / "docs").rglob("*.md")), "every docs/**/*.md must be in mkdocs.yml's nav"


def test_readme_is_a_short_front_page_with_the_quickstart():
    text = README.read_text()
    assert len(text.splitlines()) <= 160, "README.md is the front page: the manual lives in docs/"
    bash = "\n".join("\n".join(body) for _, info, body, _ in ex._blocks(text) if info == "bash")
    for command in QUICKSTART:  # .ci/run and the test harness run these two
        assert command in bash, f"README.md's Quickstart must show `{command}` in a ```bash block"


def test_docs_site_builds_strictly(tmp_path):
    """mkdocs and mkdocs-material are in the `test` extra; strict mode fails on a broken link or anchor, a link out of
    docs/, or a page left out of the nav (mkdocs.yml's validation settings)."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_excerpts_are_in_the_committed_files():
    _, excerpts = ex.parse_pages()
    problems = ex.Problems()
    ex.check_excerpts(excerpts, None, problems)
    assert not problems, "\n".join(problems.items)


def test_excerpt_check_catches_a_changed_line(tmp_path):
    (tmp_path / "r.md").write_text("a\nshare 0.814 [0.793, 0.835]\nb\n")
    problems = ex.Problems()
    ex.check_excerpts([ex.Excerpt(1, "r.md", ["a", "share 0.815 [0.793, 0.835]"])], tmp_path, problems)
    assert len(problems.items) == 1 and "0.815" in problems.items[0]
    problems = ex.Problems()
    ex.check_excerpts([ex.Excerpt(1, "r.md", ["b", "a"])], tmp_path, problems)  # order matters
    assert problems


def test_output_matcher_elisions():
    printed = ["first line", "second: 1.0", "third", "fourth"]
    assert ex.output_matches(printed, printed)
    assert not ex.output_matches(["first line", "second: 1.1", "third", "fourth"], printed)
    assert not ex.output_matches(printed[:3], printed)  # a missing line is a difference
    assert ex.output_matches(["first line", "…", "fourth"], printed)
    assert ex.output_matches(["...", "fourth"], printed)
    assert ex.output_matches(["first line", "second: …", "…"], printed)
    assert not ex.output_matches(["first line", "second: 2…", "…"], printed)
    assert ex.output_matches([], [])
    assert not ex.output_matches([], ["unexpected"])


def test_parse_page_commands_outputs_and_markers():
    text = "\n".join([
        "```", "$ refusal-eval gate r.json --policy p.toml", "PASS x", "$ echo $?", "0", "```",
        "<!-- example: slow (an hour) -->", "```", "$ a \\", "    --b", "out", "```",
        "<!-- excerpt: reports/x.md -->", "```", "| a |", "```",
        "```bash", "$ not an example", "```",
    ])
    examples, excerpts = ex.parse_page(text, "docs/p.md")
    assert [e.where for e in examples] == ["docs/p.md:1", "docs/p.md:8"] and excerpts[0].where == "docs/p.md:14"
    assert [e.commands for e in examples] == [["refusal-eval gate r.json --policy p.toml", "echo $?"],
                                               ["a \\\n    --b"]]
    assert examples[0].expected == [["PASS x"], ["0"]] and examples[0].slow is None
    assert examples[1].slow == "(an hour)" and examples[1].expected == [["out"]]
    assert excerpts[0].path == "reports/x.md" and excerpts[0].lines == ["| a |"]


def test_run_example_keeps_exit_codes_and_both_streams(tmp_path):
    e = ex.Example(1, ["echo out; echo err >&2; (exit 3)", "echo $?", "X=1", "echo $X"], [[], [], [], []])
    assert ex.run_example(e, tmp_path, ex.example_env()) == [["out", "err"], ["3"], [], ["1"]]


def test_json_differences_reports_numbers_not_run_facts():
    committed = {"created": "2026-01-01T00:00:00+00:00", "runtime_seconds": 12.0, "gap": {"mean": 16.79379},
                 "components": [{"share": 0.5, "significant": True}], "engine": {"peak_memory_bytes": 1}}
    same = json.loads(json.dumps(committed))
    same.update(created="2026-02-02T00:00:00+00:00", runtime_seconds=99.0, engine={"peak_memory_bytes": 2})
    assert ex.json_differences(committed, same) == []
    same["gap"]["mean"] = 16.79379 + 7e-6  # another CPU's float32 rounding: within tolerance
    assert ex.json_differences(committed, same) == []
    assert ex.json_differences({"n": 99}, {"n": 96}) == ["$.n: committed 99, fresh 96"]  # counts exactly
    stale = json.loads(json.dumps(committed))
    stale["gap"]["mean"] = 16.8
    stale["components"][0]["significant"] = False
    stale["components"].append({"share": 0.1})
    diffs = ex.json_differences(committed, stale)
    assert any(d.startswith("$.gap.mean: committed 16.79379, fresh 16.8") for d in diffs)
    assert any(d.startswith("$.components[0].significant") for d in diffs)
    assert any("1 items committed, 2 in the fresh run" in d for d in diffs)


def test_markdown_comparison_masks_times_and_paths_only(tmp_path):
    a, b = tmp_path / "a.md", tmp_path / "b.md"
    a.write_text("- Dataset: `/work/main/datasets/p.jsonl`\n- Runtime: 12.3 s; created 2026-11-27T23:10:40+00:00\n"
                 "share 0.814\n")
    b.write_text("- Dataset: `/tmp/ck/main/datasets/p.jsonl`\n- Runtime: 14.0 s; created 2026-11-28T01:00:00+00:00\n"
                 "share 0.814\n")
    assert ex.compare_file(a, b) == ""
    b.write_text(b.read_text().replace("0.814", "0.815"))  # one unit in the last digit: another CPU's rounding
    assert ex.compare_file(a, b) == ""
    b.write_text(b.read_text().replace("0.815", "0.816"))
    assert "+share 0.816" in ex.compare_file(a, b)


def test_printed_numbers_match_within_one_unit_and_counts_words_exactly():
    """The docs check tolerates what another CPU can change and nothing else (issue 23)."""
    same = "gap 16.795 [0.548, 0.671], p 1.1e-04; 99 of 784 significant; refusal 97.4%; `blocks.0.hook_z[1]@-1`"
    want = "gap 16.794 [0.547, 0.671], p 1.0e-04; 99 of 784 significant; refusal 97.4%; `blocks.0.hook_z[1]@-1`"
    assert ex.text_matches(want, same) and ex.output_matches([want], [same])
    for changed in (same.replace("99 of", "96 of"), same.replace("16.795", "16.796"), same.replace("97.4", "97.5"),
                    same.replace("significant", "negligible"), same.replace("z[1]", "z[2]"),
                    same.replace("16.795", "16.8")):
        assert not ex.text_matches(want, changed) and not ex.output_matches([want], [changed]), changed
    assert ex.output_matches(["gap 16.794 …", "…"], ["gap 16.795 and more", "another line"])


def test_nav_pages_in_nav_order_with_material_tags(tmp_path):
    (tmp_path / "mkdocs.yml").write_text(
        "site_name: t\nmarkdown_extensions:\n  - pymdownx.superfences:\n      custom_fences:\n"
        "        - name: mermaid\n          format: !!python/name:pymdownx.superfences.fence_code_format\n"
        "nav:\n  - Home: index.md\n  - Commands:\n      - b: commands/b.md\n      - a: commands/a.md\n"
        "  - Out: https://example.org\n  - z.md\n")
    docs = tmp_path / "docs"
    assert ex.nav_pages(tmp_path / "mkdocs.yml") == [docs / "index.md", docs / "commands/b.md",
                                                     docs / "commands/a.md", docs / "z.md"]


def _out_folders() -> list[str]:
    examples, _ = ex.parse_pages()
    outs = []
    for e in examples:
        for command in e.commands:
            words = shlex.split(command.replace("\\\n", " "))
            outs += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--out"]
    return outs


def test_outputs_of_documented_commands_are_ignored_by_git():
    outs = [o for o in _out_folders() if not o.startswith("/")]
    candidates = outs + ["reports/some-new-model/report.json", "reports/comparison-a-vs-b/comparison.json"]
    for path in candidates:
        probe = f"{path.rstrip('/')}/tiny-refuser/report.json" if path in outs else path
        done = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
        assert done.returncode == 0, f"{probe}: written by a documented command but not ignored by git"


def _page_block(info: str, after: str) -> list[str]:
    for page in PAGES:
        for _, block_info, body, _ in ex._blocks(page.read_text()):
            if block_info == info and any(after in line for line in body):
                return body
    raise AssertionError(f"no ```{info} block containing {after!r} in README.md or the docs")


def test_github_actions_example_installs_as_the_readme_says_and_runs_valid_commands():
    yaml = pytest.importorskip("yaml")
    from refusal_eval.cli import _parser

    body = _page_block("yaml", "refusal-gate")
    workflow = yaml.safe_load("\n".join(body))
    steps = workflow["jobs"]["refusal-gate"]["steps"]
    runs = [" ".join(str(s["run"]).split()) for s in steps if "run" in s]
    cpu_line = re.search(r"\*\*CPU only\*\*[^`]*`(pip install torch[^`]*)`", README.read_text()).group(1)
    docs = _all_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu_line
    assert runs[0] == cpu_line, "the Actions example must install torch the README's CPU way (runners have no GPU)"
    assert "pip install -e ." in runs[1]
    commands = [c.strip() for r in runs[2:] for c in r.split("&&") if c.strip().startswith("refusal-eval")]
    assert [c.split()[1] for c in commands] == ["run", "gate"]
    parser = _parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])  # argparse exits 2 on an unknown option
        if args.command == "gate":
            assert args.policy and args.report
            if args.baseline:  # the docs must tell the user the policy then needs a [baseline] section
                assert "needs `[baseline]`" in docs or "[baseline]` section" in docs


def test_update_rewrites_stale_outputs_and_report_folders_but_not_elided_blocks(tmp_path, monkeypatch, capsys):
    """``examples.py update``: a stale block's output is replaced by what was printed, in the page it came from; a
    block with an elision is left for a hand edit (and said so), and a rewritten report folder's files are copied
    back (reports only)."""
    repo = tmp_path / "repo"
    readme, page = repo / "README.md", repo / "docs" / "commands" / "gate.md"
    page.parent.mkdir(parents=True)
    plain = ex.Example(3, ["refusal-eval schema --kind audit"], [["old line"]])
    elided = ex.Example(9, ["refusal-eval run --quiet"], [["gap 1.0", "…"]])
    readme.write_text(f"# t\n```\n{plain.text}\n```\n```\n{elided.text}\n```\n")
    in_docs = ex.Example(2, ["refusal-eval schema --kind audit"], [["old line"]], source="docs/commands/gate.md")
    page.write_text(f"# g\n```\n{in_docs.text}\n```\n")
    scratch = tmp_path / "scratch"
    (scratch / "reports" / "m").mkdir(parents=True)
    for name in ("report.json", "report.md", "positions.png", "partial.jsonl"):
        (scratch / "reports" / "m" / name).write_text(name)
    monkeypatch.setattr(ex, "README", readme)
    monkeypatch.setattr(ex, "REPO", repo)
    monkeypatch.setattr(ex, "COMMITTED", repo / "examples" / "reports")
    replacements = [(plain, ex.Example(3, plain.commands, [["new line"]]).text),
                    (elided, ex.Example(9, elided.commands, [["gap 2.0", "more"]]).text),
                    (in_docs, ex.Example(2, in_docs.commands, [["docs line"]], source=in_docs.source).text)]
    ex._update(replacements, [Path("reports/m")], scratch)
    text = readme.read_text()
    assert "new line" in text and "old line" not in text and "docs line" not in text
    assert "gap 1.0" in text and "gap 2.0" not in text  # the elided block is untouched ...
    out = capsys.readouterr().out
    assert "README.md:9: has an elision; edit by hand" in out  # ... and reported
    assert "docs line" in page.read_text() and "old line" not in page.read_text()  # rewritten where it came from
    assert "docs/commands/gate.md:2: output rewritten" in out
    committed = repo / "examples" / "reports" / "m"
    assert sorted(p.name for p in committed.iterdir()) == ["positions.png", "report.json", "report.md"]


def test_float_noise_and_permutation_p_tolerances(tmp_path):
    """Noise floors (e-notation below 1e-4) and sign-flip p-values (within 0.02) may differ by CPU; shares and
    verdicts may not."""
    assert not ex.json_differences({"p_permutation": 0.2408}, {"p_permutation": 0.2280})
    assert ex.json_differences({"p_permutation": 0.24}, {"p_permutation": 0.27})
    assert ex.json_differences({"share": 0.2408}, {"share": 0.2280})
    assert ex.json_differences({"significant": True}, {"significant": False})
    assert ex.text_matches("largest 3.3e-06, median 0.0e+00", "largest 2.9e-06, median 0.0e+00")
    assert not ex.text_matches("largest 3.3e-03", "largest 2.9e-03")
    (tmp_path / "r.md").write_text("floor largest 2.9e-06 and share 0.814\n")
    problems = ex.Problems()
    ex.check_excerpts([ex.Excerpt(1, "r.md", ["floor largest 3.3e-06 and share 0.814"])], tmp_path, problems)
    assert not problems
    ex.check_excerpts([ex.Excerpt(1, "r.md", ["floor largest 3.3e-06 and share 0.815"])], tmp_path, problems)
    assert problems
