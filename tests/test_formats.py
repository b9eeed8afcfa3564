"""Pair sources beyond JSONL: table formats, column mapping, the jbb/xstest/advbench presets, hub ids, errors.

Fixtures in tests/fixtures/ follow the public layouts with placeholder text; Parquet and save_to_disk folders are
generated into tmp_path. Nothing here reaches the network: hub reads are monkeypatched.
"""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

import datasets
from refusal_eval.data import (
    ColumnMap,
    PairSource,
    PromptPair,
    file_sha256,
    load_pair_source,
    load_pairs,
    shipped_dataset,
)
from refusal_eval.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"
JSONL = FIXTURES / "pairs.jsonl"


@pytest.fixture(scope="module")
def expected() -> list[PromptPair]:
    return load_pairs(JSONL)


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the hub (local-file reads go through the packaged json/csv/parquet builders)."""
    real = datasets.load_dataset

    def guarded(path, *args, **kwargs):
        if path not in ("json", "csv", "parquet"):
            pytest.fail(f"load_dataset({path!r}) was called: a local source must never try the hub")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", guarded)


def jsonl_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_list([p.model_dump() for p in load_pairs(JSONL)])


def write_csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ plain tables


def test_jsonl_in_project_schema_keeps_line_precise_loader(expected):
    result = load_pair_source(str(JSONL))
    assert isinstance(result, PairSource)
    assert result.pairs == expected
    assert result.fingerprint == file_sha256(JSONL)
    assert "JSONL" in result.description


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.json"])
def test_csv_and_json_match_jsonl(name, expected, no_hub):
    result = load_pair_source(str(FIXTURES / name))
    assert result.pairs == expected
    assert result.pairs[0].id == "007"  # CSV cells are read as text: no leading zeros lost
    assert result.fingerprint == file_sha256(FIXTURES / name)


def test_parquet_matches_jsonl(tmp_path, expected, no_hub):
    path = tmp_path / "pairs.parquet"
    jsonl_dataset().to_parquet(str(path))
    result = load_pair_source(str(path))
    assert result.pairs == expected
    assert result.fingerprint == file_sha256(path)
    assert "Parquet" in result.description


def test_save_to_disk_dataset_matches_jsonl(tmp_path, expected, no_hub):
    folder = tmp_path / "saved"
    jsonl_dataset().save_to_disk(str(folder))
    result = load_pair_source(str(folder))
    assert result.pairs == expected
    assert len(result.fingerprint) == 64
    assert load_pair_source(str(folder)).fingerprint == result.fingerprint


def test_save_to_disk_dataset_dict_reads_every_split(tmp_path, expected):
    folder = tmp_path / "saved-dict"
    whole = jsonl_dataset()
    datasets.DatasetDict({"first": whole.select([0, 1]), "second": whole.select([2])}).save_to_disk(str(folder))
    result = load_pair_source(str(folder))
    assert result.pairs == expected
    assert any("split names are not used" in note for note in result.notes)


def test_jsonl_with_a_column_mapping_reads_through_datasets(tmp_path):
    path = tmp_path / "mapped.jsonl"
    path.write_text('{"a": "PLACEHOLDER harmful x", "b": "PLACEHOLDER benign x"}\n'
                    '{"a": "PLACEHOLDER harmful y", "b": "PLACEHOLDER benign y"}\n', encoding="utf-8")
    result = load_pair_source(str(path), columns=ColumnMap(harmful="a", benign="b"))
    assert [(p.id, p.category, p.source, p.split) for p in result.pairs] == [
        ("row-1", "uncategorised", "mapped.jsonl", None), ("row-2", "uncategorised", "mapped.jsonl", None)]
    assert [p.harmful for p in result.pairs] == ["PLACEHOLDER harmful x", "PLACEHOLDER harmful y"]


def test_column_mapping(no_hub):
    mapping = ColumnMap(harmful="prompt_a", benign="prompt_b", id="key", category="topic")
    result = load_pair_source(str(FIXTURES / "pairs_mapped.csv"), columns=mapping)
    assert [(p.id, p.category, p.harmful, p.benign, p.source) for p in result.pairs] == [
        ("m-1", "placeholder-a", "PLACEHOLDER harmful request one", "PLACEHOLDER benign request one",
         "pairs_mapped.csv"),
        ("m-2", "placeholder-b", "PLACEHOLDER harmful request two", "PLACEHOLDER benign request two",
         "pairs_mapped.csv"),
    ]


def test_wrong_column_lists_available_columns():
    with pytest.raises(DataError, match=r"pairs_mapped.csv: no column 'prompt_c'.*key, topic, prompt_a, prompt_b"):
        load_pair_source(str(FIXTURES / "pairs_mapped.csv"), columns=ColumnMap(harmful="prompt_c", benign="prompt_b"))
    with pytest.raises(DataError, match=r"no 'harmful' column.*key, topic, prompt_a, prompt_b.*--harmful-column"):
        load_pair_source(str(FIXTURES / "pairs_mapped.csv"))


def test_defaults_when_id_and_category_columns_are_absent(tmp_path):
    path = write_csv(tmp_path / "bare.csv", "harmful,benign", "PLACEHOLDER h1,PLACEHOLDER b1",
                     "PLACEHOLDER h2,PLACEHOLDER b2")
    result = load_pair_source(str(path))
    assert [(p.id, p.category, p.split, p.source) for p in result.pairs] == [
        ("row-1", "uncategorised", None, "bare.csv"), ("row-2", "uncategorised", None, "bare.csv")]
    assert any("row number" in note for note in result.notes)
    assert any("uncategorised" in note for note in result.notes)


def test_row_errors_name_file_row_and_column(tmp_path):
    path = write_csv(
        tmp_path / "bad.csv", "id,harmful,benign,split",
        "a,PLACEHOLDER h1,PLACEHOLDER b1,eval",
        "b,,PLACEHOLDER b2,eval",
        "c,PLACEHOLDER same,PLACEHOLDER same,eval",
        "a,PLACEHOLDER h4,PLACEHOLDER b4,train",
        "e,PLACEHOLDER h5,PLACEHOLDER b5,test",
        "f,PLACEHOLDER h6,   ,eval",
    )
    with pytest.raises(DataError) as info:
        load_pair_source(str(path))
    message = str(info.value)
    assert "5 problem(s)" in message
    assert f"{path}: row 2, column 'harmful': empty or missing prompt text" in message
    assert f"{path}: row 3, column 'harmful' and 'benign': harmful and benign sides are identical" in message
    assert f"{path}: row 4, column 'id': duplicate id 'a' (first used on row 1)" in message
    assert f"{path}: row 5, column 'split':" in message
    assert f"{path}: row 6, column 'benign': empty or missing prompt text" in message


def test_only_first_twenty_problems_are_listed(tmp_path):
    path = write_csv(tmp_path / "many.csv", "harmful,benign", *[f"PLACEHOLDER {i},PLACEHOLDER {i}" for i in range(25)])
    with pytest.raises(DataError, match=r"(?s)25 problem\(s\).*\.\.\. and 5 more"):
        load_pair_source(str(path))


def test_unusable_local_sources(tmp_path):
    (tmp_path / "plain-folder").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with datasets' save_to_disk"):
        load_pair_source(str(tmp_path / "plain-folder"))
    with pytest.raises(DataError, match="looks like JailbreakBench.*--preset jbb"):
        load_pair_source(str(FIXTURES / "jbb"))
    (tmp_path / "pairs.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_pair_source(str(tmp_path / "pairs.txt"))
    broken = write_csv(tmp_path / "broken.csv", "harmful,benign", '"PLACEHOLDER never closed,PLACEHOLDER b')
    with pytest.raises(DataError, match="broken.csv: could not be read as CSV"):
        load_pair_source(str(broken))
    with pytest.raises(DataError, match="empty.csv: the CSV file is empty"):
        (tmp_path / "empty.csv").write_text("", encoding="utf-8")
        load_pair_source(str(tmp_path / "empty.csv"))
    with pytest.raises(DataError, match="holds no pairs"):
        load_pair_source(str(write_csv(tmp_path / "header-only.csv", "harmful,benign")))


def test_bad_options():
    with pytest.raises(ConfigError, match="unknown dataset preset 'nope'"):
        load_pair_source(str(JSONL), preset="nope")
    with pytest.raises(ConfigError, match="plain tables only"):
        load_pair_source(str(FIXTURES / "jbb"), preset="jbb", columns=ColumnMap(harmful="Goal"))


# -------------------------------------------------------------------------------------------- missing / hub


@pytest.mark.parametrize("source", ["missing/pairs.csv", "nope.jsonl", "./owner/name", "../nope", "a/b/c", "x.parquet"])
@pytest.mark.parametrize("preset", [None, "jbb", "xstest", "advbench"])
def test_missing_local_path_never_tries_the_hub(monkeypatch, tmp_path, source, preset):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset was called"))
    monkeypatch.setattr(datasets, "load_from_disk", lambda *a, **k: pytest.fail("load_from_disk was called"))
    with pytest.raises(DataError, match="no such file or folder"):
        load_pair_source(source, preset=preset)


def test_unreachable_hub_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="owner/name: could not load .*hub.*pass a local path"):
        load_pair_source("owner/name")
    with pytest.raises(DataError, match=r"JailbreakBench/JBB-Behaviors \(config 'behaviors'\): could not load"):
        load_pair_source("JailbreakBench/JBB-Behaviors", preset="jbb")
    assert calls == [("owner/name",), ("JailbreakBench/JBB-Behaviors", "behaviors")]


def fixture_table(path: Path) -> datasets.Dataset:
    """A fixture CSV as an in-memory Dataset, as the hub would serve it."""
    with open(path, encoding="utf-8", newline="") as handle:
        return datasets.Dataset.from_list(list(csv.DictReader(handle)))


def test_hub_presets_read_the_published_splits(monkeypatch, tmp_path):
    jbb = datasets.DatasetDict({side: fixture_table(FIXTURES / "jbb" / f"{side}-behaviors.csv")
                                for side in ("harmful", "benign")})
    xstest = datasets.DatasetDict({"train": fixture_table(FIXTURES / "xstest" / "xstest_prompts.csv")})
    plain = datasets.DatasetDict({"train": jsonl_dataset()})
    advbench = datasets.DatasetDict({"train": fixture_table(FIXTURES / "advbench" / "harmful_behaviors.csv")
                                     .rename_column("goal", "prompt")})  # the hub mirror's column name
    served = {("JailbreakBench/JBB-Behaviors", "behaviors"): jbb, ("paul-rottger/xstest",): xstest,
              ("owner/pairs",): plain, ("walledai/AdvBench",): advbench}
    monkeypatch.chdir(tmp_path)
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *args, **kwargs: real(*args, **kwargs) if args[0] == "csv" else served[args])

    hub_jbb = load_pair_source("JailbreakBench/JBB-Behaviors", preset="jbb")
    local_jbb = load_pair_source(str(FIXTURES / "jbb"), preset="jbb")
    assert hub_jbb.pairs == local_jbb.pairs
    assert hub_jbb.fingerprint.startswith("JailbreakBench/JBB-Behaviors:behaviors@")
    assert load_pair_source("paul-rottger/xstest", preset="xstest").pairs == load_pair_source(
        str(FIXTURES / "xstest"), preset="xstest").pairs
    hub_advbench = load_pair_source("walledai/AdvBench", preset="advbench", seed=2)
    assert hub_advbench.pairs == load_pair_source(str(FIXTURES / "advbench"), preset="advbench", seed=2).pairs
    assert hub_advbench.fingerprint.startswith("walledai/AdvBench@")
    hub_plain = load_pair_source("owner/pairs")
    assert hub_plain.pairs == load_pairs(JSONL)
    assert hub_plain.fingerprint.startswith("owner/pairs@")


# ------------------------------------------------------------------------------------------------------- jbb


def test_jbb_pairs_on_behavior(no_hub):
    result = load_pair_source(str(FIXTURES / "jbb"), preset="jbb")
    assert [(p.id, p.category, p.harmful, p.benign, p.source, p.split) for p in result.pairs] == [
        ("jbb-1", "Category one", "PLACEHOLDER harmful goal about topic alpha",
         "PLACEHOLDER benign goal about topic alpha", "jbb", None),
        ("jbb-2", "Category two", "PLACEHOLDER harmful goal about topic beta, with a comma",
         "PLACEHOLDER benign goal about topic beta", "jbb", None),
    ]
    notes = " ".join(result.notes)
    assert "2 behavior(s) present on one side only were left out" in notes
    assert "'Gamma behavior'" in notes and "'Delta behavior'" in notes
    assert "no train/eval split" in notes
    assert result.description.startswith("JBB-Behaviors: 2 CSV files in")


def test_presets_and_columns_match_headers_whatever_their_case(tmp_path):
    """A widely shared JBB-Behaviors copy has lower-case headers (index,goal,...): read as the canonical file, and
    the notes (which reach the report) say which columns were read as which. Likewise XSTest, AdvBench and a plain
    table; two columns that differ only in case are never guessed between."""
    lower = load_pair_source(str(FIXTURES / "jbb-lowercase"), preset="jbb")
    assert lower.pairs == load_pair_source(str(FIXTURES / "jbb"), preset="jbb").pairs
    notes = " ".join(lower.notes)
    assert "column 'goal' read as 'Goal'" in notes and "column 'behavior' read as 'Behavior'" in notes
    for preset, name in (("xstest", "xstest_prompts.csv"), ("advbench", "harmful_behaviors.csv")):
        shouted = tmp_path / preset / name
        shouted.parent.mkdir()
        lines = (FIXTURES / preset / name).read_text(encoding="utf-8").split("\n")
        shouted.write_text("\n".join([lines[0].upper(), *lines[1:]]), encoding="utf-8")
        assert load_pair_source(str(shouted), preset=preset).pairs == load_pair_source(
            str(FIXTURES / preset / name), preset=preset).pairs
    plain = write_csv(tmp_path / "plain.csv", "ID,Harmful,BENIGN", "a,How do I pick a lock?,How do I pick a lily?")
    pair = load_pair_source(str(plain)).pairs[0]
    assert (pair.id, pair.harmful, pair.benign) == ("a", "How do I pick a lock?", "How do I pick a lily?")
    twice = write_csv(tmp_path / "twice.csv", "harmful,Benign,BENIGN", "How do I pick a lock?,a,b")
    with pytest.raises(DataError, match="no 'benign' column"):
        load_pair_source(str(twice))


def test_jbb_data_subfolder_and_fingerprint(tmp_path):
    shutil.copytree(FIXTURES / "jbb", tmp_path / "data")
    first = load_pair_source(str(tmp_path), preset="jbb")
    assert first.pairs == load_pair_source(str(FIXTURES / "jbb"), preset="jbb").pairs
    assert first.fingerprint == load_pair_source(str(FIXTURES / "jbb"), preset="jbb").fingerprint
    benign = tmp_path / "data" / "benign-behaviors.csv"
    benign.write_text(benign.read_text().replace("topic alpha", "topic alpha again"), encoding="utf-8")
    assert load_pair_source(str(tmp_path), preset="jbb").fingerprint != first.fingerprint


def test_jbb_wrong_columns_and_row_errors(tmp_path):
    folder = tmp_path / "jbb"
    shutil.copytree(FIXTURES / "jbb", folder)
    write_csv(folder / "benign-behaviors.csv", "Index,Prompt,Behavior", "1,PLACEHOLDER,Alpha behavior")
    with pytest.raises(DataError, match=r"benign-behaviors.csv: missing column\(s\) Goal, Category .*"
                                        r"Index,Goal,Target,Behavior,Category,Source"):
        load_pair_source(str(folder), preset="jbb")
    write_csv(folder / "benign-behaviors.csv", "Index,Goal,Target,Behavior,Category,Source",
              "1,,t,Alpha behavior,Category one,Original", "2,PLACEHOLDER b,t,Beta behavior,Category two,Original")
    with pytest.raises(DataError, match=r"benign-behaviors.csv: row 1, column 'Goal': empty or missing prompt text"):
        load_pair_source(str(folder), preset="jbb")
    with pytest.raises(DataError, match="jbb preset reads a folder"):
        load_pair_source(str(folder / "harmful-behaviors.csv"), preset="jbb")


# ---------------------------------------------------------------------------------------------------- xstest


def test_xstest_pairs_contrast_prompts_by_focus_within_family(no_hub):
    for source in (FIXTURES / "xstest", FIXTURES / "xstest" / "xstest_prompts.csv"):
        result = load_pair_source(str(source), preset="xstest")
        got = {p.id: (p.category, p.benign) for p in result.pairs}
        assert got == {
            # two safe 'kill' homonyms: the smallest id (9, not '12' as text) wins
            "xstest-20": ("homonyms", "PLACEHOLDER safe homonym prompt using the word kill (first)"),
            "xstest-21": ("homonyms", "PLACEHOLDER safe homonym prompt using the word execute"),
            "xstest-22": ("figurative_language", "PLACEHOLDER safe figurative prompt using blow up"),
            "xstest-23": ("discr", "PLACEHOLDER safe prompt about real group A"),
            "xstest-24": ("discr", "PLACEHOLDER safe prompt about nonsense group B"),
            "xstest-25": ("privacy", "PLACEHOLDER safe prompt about public person A"),
            "xstest-26": ("privacy", "PLACEHOLDER safe prompt about fictional person B"),
        }
        assert all(p.harmful.startswith("PLACEHOLDER unsafe") and p.source == "xstest" for p in result.pairs)
        notes = " ".join(result.notes)
        assert "1 contrast prompt(s) had several safe prompts" in notes
        # contrast_definitions 'kill' must not borrow the homonyms 'kill' prompt; contrast_safe_targets has none
        assert "2 contrast prompt(s) with no safe prompt of the same focus were left out" in notes
        assert "definitions: 1" in notes and "safe_targets: 1" in notes
        assert "1 prompt(s) of unknown contrast type(s) were left out (contrast_mystery: 1)" in notes


def test_xstest_wrong_columns(tmp_path):
    write_csv(tmp_path / "xstest_prompts.csv", "id,text,category", "1,PLACEHOLDER,homonyms")
    with pytest.raises(DataError, match=r"missing column\(s\) prompt, type, focus .*id,prompt,type,label,focus,note"
                                        r".*has id, text, category"):
        load_pair_source(str(tmp_path), preset="xstest")


# -------------------------------------------------------------------------------------------------- advbench


def test_advbench_pairing_is_seeded_and_says_it_is_synthetic(no_hub):
    path = str(FIXTURES / "advbench" / "harmful_behaviors.csv")
    first = load_pair_source(path, preset="advbench", seed=0)
    assert first.pairs == load_pair_source(path, preset="advbench", seed=0).pairs
    assert first.pairs == load_pair_source(str(FIXTURES / "advbench"), preset="advbench", seed=0).pairs
    other = load_pair_source(path, preset="advbench", seed=1)
    assert [p.benign for p in other.pairs] != [p.benign for p in first.pairs]
    assert [p.harmful for p in other.pairs] == [p.harmful for p in first.pairs]
    assert [(p.id, p.category, p.source) for p in first.pairs] == [
        (f"advbench-{n}", "advbench", "advbench") for n in range(1, 6)]
    pool = {p.benign for p in load_pairs(shipped_dataset())}
    benign = [p.benign for p in first.pairs]
    assert set(benign) <= pool and len(set(benign)) == len(benign)  # drawn without replacement
    assert first.notes[0] == (
        "pairing is synthetic: AdvBench has harmful prompts only; each is paired with a benign prompt from "
        "refusal_pairs.jsonl by a seeded shuffle (seed 0), so the pairs are not minimal and differ in length")
    assert "seed 1" in other.notes[0]


def test_advbench_cycles_through_the_pool(tmp_path):
    pool = list(dict.fromkeys(p.benign for p in load_pairs(shipped_dataset())))
    goals = 2 * len(pool) + 3
    path = write_csv(tmp_path / "harmful_behaviors.csv", "goal,target",
                     *[f"PLACEHOLDER goal {i},PLACEHOLDER target" for i in range(goals)])
    result = load_pair_source(str(path), preset="advbench", seed=3)
    benign = [p.benign for p in result.pairs]
    assert len(benign) == goals
    assert sorted(benign[: len(pool)]) == sorted(pool) and sorted(benign[len(pool): 2 * len(pool)]) == sorted(pool)
    assert max(Counter(benign).values()) == 3
    assert any("reused" in note for note in result.notes)


def test_advbench_wrong_columns(tmp_path):
    path = write_csv(tmp_path / "harmful_behaviors.csv", "behavior,target", "PLACEHOLDER,PLACEHOLDER")
    with pytest.raises(DataError, match=r"harmful_behaviors.csv: missing column\(s\) goal .*goal,target"):
        load_pair_source(str(path), preset="advbench")
    path = write_csv(tmp_path / "harmful_behaviors.csv", "goal,target", "PLACEHOLDER g,t", ",t")
    with pytest.raises(DataError, match=r"harmful_behaviors.csv: row 2, column 'goal': empty or missing prompt text"):
        load_pair_source(str(path), preset="advbench")
