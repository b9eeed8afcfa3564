"""Mixed alignment: pairs of unequal token length are patched at the aligned (last/suffix) positions, and the
all-position patches use only the equal-length pairs; shares and tests use each component's own pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refusal_eval.audit import audit
from refusal_eval.compare import compare_reports
from refusal_eval.config import AuditConfig
from refusal_eval.data.pairs import shipped_dataset
from refusal_eval.report.markdown import render_markdown
from refusal_eval.stats import ratio_of_sums, share_intervals, sign_flip_test

N_EQUAL, N_UNEQUAL = 8, 4


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    """Eval pairs of the shipped set (equal length under the tiny-refuser tokenizer); in the last few the benign
    side gets an extra word, so their sides differ in token length."""
    rows = [json.loads(line) for line in open(shipped_dataset())]
    rows = [r for r in rows if r["split"] == "eval"][: N_EQUAL + N_UNEQUAL]
    for r in rows[N_EQUAL:]:
        r["benign"] = r["benign"].rstrip("?.!") + " please?"
    path = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(path, **kw) -> AuditConfig:
    base = dict(dataset=str(path), components=["mlp_out", "attn_out"], positions=["all", "last"], n_boot=300,
                n_permutations=512, token_sets="canonical")
    return AuditConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def mixed(mixed_file):
    return audit(_config(mixed_file), progress=False)


def test_every_pair_is_patched_and_each_family_states_its_pairs(mixed):
    d = mixed.dataset
    assert d.alignment == "mixed" and d.n_used == d.n_pairs == N_EQUAL + N_UNEQUAL and not d.exclusions
    assert d.n_full_pairs == N_EQUAL
    unequal = [k for k, pid in enumerate(mixed.used_pair_ids)
               if next(p for p in mixed.pairs if p.id == pid).n_tokens_harmful
               != next(p for p in mixed.pairs if p.id == pid).n_tokens_benign]
    assert len(unequal) == N_UNEQUAL
    for c in mixed.components:
        if c.position is None:
            assert c.n_pairs == N_EQUAL
            assert [k for k, v in enumerate(c.effects) if v is None] == unequal
        else:
            assert c.n_pairs == d.n_used and None not in c.effects
    assert mixed.gap_equal_length is not None and mixed.gap_equal_length.n_pairs == N_EQUAL
    text = render_markdown(mixed)
    assert f"use the {N_EQUAL} pairs of equal token length" in text and f"use all {d.n_used} pairs" in text


def test_each_family_equals_an_audit_of_its_own_pairs(mixed, mixed_file, tmp_path):
    """Independent runs: the last-position effects equal a right-aligned audit of every pair; the all-position
    effects equal a full-alignment audit of the equal-length pairs alone."""
    last_only = audit(_config(mixed_file, positions=["last"]), progress=False)
    assert last_only.dataset.alignment == "right"
    by_id = {c.id: c for c in last_only.components}
    for c in mixed.components:
        if c.position is not None:
            np.testing.assert_allclose(c.effects, by_id[c.id].effects, atol=1e-5)
    rows = [json.loads(line) for line in open(mixed_file)][:N_EQUAL]
    equal_file = tmp_path / "equal.jsonl"
    equal_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = audit(_config(equal_file, positions=["all"]), progress=False)
    assert full.dataset.alignment == "full"
    by_id = {c.id: c for c in full.components}
    for c in mixed.components:
        if c.position is None:
            np.testing.assert_allclose([v for v in c.effects if v is not None], by_id[c.id].effects, atol=1e-5)
    assert mixed.gap_equal_length.mean == pytest.approx(full.gap.mean, abs=1e-6)


def test_shares_use_each_components_own_pairs(mixed):
    """Share = sum of the component's effects / sum of the gaps over the pairs it was patched on (naive loop)."""
    assert mixed.shares_defined
    gaps = {p.id: p.m_harmful - p.m_benign for p in mixed.pairs}
    for c in mixed.components:
        num = den = 0.0
        for pid, e in zip(mixed.used_pair_ids, c.effects, strict=True):
            if e is not None:
                num, den = num + e, den + gaps[pid]
        if c.share is not None:
            assert c.share == pytest.approx(num / den, rel=1e-4, abs=1e-6)


def test_compare_of_a_mixed_report_with_itself_is_zero(mixed):
    result = compare_reports(mixed, mixed, n_boot=200)
    assert result.components
    for change in result.components:
        assert change.diff == 0.0 and not change.significant
        own = next(c for c in mixed.components if c.id == change.id)
        assert change.share_a == pytest.approx(own.share, rel=1e-4, abs=1e-6)


def test_masked_statistics_ignore_what_the_mask_hides():
    """NaN cells: the estimate is the subset's ratio of sums, a hidden cell in one row leaves the other rows'
    intervals as they were, and the exact sign-flip p-value with hidden cells set to 0 equals the subset's."""
    rng = np.random.default_rng(3)
    n = 12
    gaps = rng.gamma(4, 0.5, n)
    effects = 0.4 * gaps + rng.normal(0, 0.3, (2, n))
    masked = effects.copy()
    masked[0, :4] = np.nan
    assert ratio_of_sums(masked, gaps)[0] == pytest.approx(effects[0, 4:].sum() / gaps[4:].sum())
    assert ratio_of_sums(masked, gaps)[1] == pytest.approx(effects[1].sum() / gaps.sum())
    a = share_intervals(masked, gaps, n_resamples=400, seed=1, expand=False)
    b = share_intervals(effects, gaps, n_resamples=400, seed=1, expand=False)
    np.testing.assert_allclose([a.low[1], a.high[1]], [b.low[1], b.high[1]], rtol=1e-9)
    assert not np.isclose(a.low[0], b.low[0])
    assert np.all(np.isfinite(a.low)) and np.all(a.low < a.estimate) and np.all(a.estimate < a.high)
    full = sign_flip_test(np.nan_to_num(masked, nan=0.0), n_permutations=2**n)
    sub = sign_flip_test(effects[0, 4:], n_permutations=2**8)
    assert full.exact and sub.exact and full.p[0] == pytest.approx(sub.p[0])
    # Unmasked input takes the unmasked path: the same numbers as before masks existed.
    plain = share_intervals(effects, gaps, n_resamples=400, seed=1)
    np.testing.assert_array_equal(plain.estimate, effects.sum(1) / gaps.sum())


def test_attribution_verify_checks_both_families(mixed_file):
    report = audit(_config(mixed_file, method="attribution+verify", verify_top=2, verify_random=1), progress=False)
    a = report.attribution
    assert report.dataset.alignment == "mixed"
    assert a.n_top == 4 and a.n_random == 2 and a.n_verified == 6 and len(set(a.verified_ids)) == 6
    families = {c.position is None for c in report.components if c.id in a.verified_ids}
    assert families == {True, False}
    exact = {c.id: c for c in report.components if not c.approximate}
    assert set(exact) == set(a.verified_ids)


def test_each_position_before_the_shared_suffix_uses_equal_pairs_only(mixed_file):
    report = audit(_config(mixed_file, positions=["each"], components=["mlp_out"]), progress=False)
    d = report.dataset
    assert d.alignment == "mixed" and d.n_aligned_positions >= 1
    for c in report.components:
        inside = c.position >= -d.n_aligned_positions
        assert c.n_pairs == (d.n_used if inside else N_EQUAL), c.id
    assert {c.n_pairs for c in report.components} == {d.n_used, N_EQUAL}


def test_all_position_shares_are_undefined_when_their_pairs_do_not_separate(tmp_path):
    """Equal-length pairs that differ only in punctuation (no harmful word: gap ~ 0) and unequal real pairs: the
    last-position shares stand, the all-position ones are undefined, and the report says why."""
    rows = [json.loads(line) for line in open(shipped_dataset())]
    rows = [r for r in rows if r["split"] == "eval"][:24]
    for r in rows[:6]:
        body = r["benign"].rstrip("?.!")
        r["harmful"], r["benign"] = body + "?", body + "."
    for r in rows[6:]:
        r["benign"] = r["benign"].rstrip("?.!") + " please?"
    path = tmp_path / "flat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = audit(_config(path), progress=False)
    assert report.dataset.alignment == "mixed" and report.dataset.n_full_pairs == 6
    assert report.gap_equal_length.verdict != "separated"
    assert report.shares_defined
    for c in report.components:
        if c.position is None:
            assert c.share is None and c.significant is None and c.fw_low is None
        else:
            assert c.share is not None and c.significant is not None
    assert any(w.startswith(f"UNDEFINED SHARES for the {sum(c.position is None for c in report.components)} "
                            "all-position component(s)") for w in report.warnings)
