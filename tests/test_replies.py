"""Greedy replies (refusal_eval.replies): the shared-prefix layout, length order and stopping once the matcher has
decided give the replies and verdicts of one plain left-padded ``generate`` per batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from refusal_eval import replies as replies_module
from refusal_eval.audit import format_prompt
from refusal_eval.data.pairs import load_pairs, shipped_dataset
from refusal_eval.metrics import DECISION_MARGIN, REFUSAL_PHRASES, is_refusal, refusal_decided
from refusal_eval.models.loading import LoadedModel, load_model
from refusal_eval.replies import greedy_replies, left_pad, shared_prefix_length

from .test_architectures import FAMILIES, build

# -- the matcher's decision rule ----------------------------------------------------------------------------------

pieces = st.sampled_from([*REFUSAL_PHRASES, "Sure", "here", " ", "  ", "\n", "\u2019", "'", ".", ",", "Σ", "é",
                          "I", "m", "can", "not", "help", "x" * 7, "y" * 13])


@settings(max_examples=400, deadline=None)
@given(st.lists(pieces, max_size=40), st.data())
def test_a_decided_prefix_has_the_whole_replys_verdict(parts, data):
    text = "".join(parts)
    cut = data.draw(st.integers(0, len(text)))
    if refusal_decided(text[:cut]):
        assert is_refusal(text[:cut]) == is_refusal(text)


def test_decision_needs_the_margin_after_a_refusal_phrase_or_a_full_window():
    assert not refusal_decided("I'm sorry")  # "I'm sorry to hear that" and "I'm sorry, but" agree, but not yet
    assert refusal_decided("I'm sorry" + "x" * DECISION_MARGIN)
    assert not refusal_decided("Sure! " + "a" * 70)
    assert refusal_decided("Sure! " + "a" * (80 + DECISION_MARGIN))
    assert not is_refusal("Sure! " + "a" * (80 + DECISION_MARGIN) + " I cannot")


def test_decoded_token_prefixes_keep_the_verdict():
    """Through a real byte-level BPE tokenizer (split UTF-8 characters, spaces before punctuation): every token
    prefix that is decided has the whole reply's verdict."""
    tok = load_model(None).tokenizer
    texts = ["I'm sorry , but I can't help with that ☃☃ request.", "Sure ! Here’s how: step 1 … " * 4,
             "Σ " * 30 + "I cannot", "Unfortunately, I cannot help. 🚫🚫🚫", "As an AI model I " + "ö" * 50]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        whole = is_refusal(tok.decode(ids))
        for k in range(1, len(ids) + 1):
            partial = tok.decode(ids[:k], skip_special_tokens=True)
            if refusal_decided(partial):
                assert is_refusal(partial) == whole, (text, k)


# -- equality with a plain generate ---------------------------------------------------------------------------------


class CharTokenizer:
    """Just enough tokenizer for greedy_replies on token-id models: each id decodes to its own two characters."""

    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        return "".join(f"{i:02d}" for i in ids if not (skip_special_tokens and i in (0, 2)))

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r, skip_special_tokens) for r in rows]


def plain_replies(loaded: LoadedModel, prompts, max_new_tokens: int, batch_size: int = 64):
    """The reference: one left-padded ``generate`` per batch, in the prompts' order."""
    tok, firsts, texts = loaded.tokenizer, [], []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], tok.pad_token_id)
        out = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[:, ids.shape[1] :]
        firsts += [int(t) for t in new[:, 0]]
        texts += tok.batch_decode(new, skip_special_tokens=True)
    return firsts, texts


def template_prompts(n: int = 9, prefix: int = 6, seed: int = 3):
    """Token-id prompts that share a 'chat template' head and differ in length after it."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(5, 97, (prefix,), generator=gen).tolist()
    return [head + torch.randint(5, 97, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@pytest.fixture
def spy_prefix(monkeypatch):
    """The prefix lengths the batches were laid out with."""
    used: list[int] = []
    original = replies_module._inputs

    def spy(loaded, seqs, prefix):
        used.append(prefix)
        return original(loaded, seqs, prefix)

    monkeypatch.setattr(replies_module, "_inputs", spy)
    return used


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replies_equal_a_plain_left_padded_generate_on_every_family(family, spy_prefix):
    torch.set_num_threads(1)
    loaded = build(family)
    loaded.tokenizer = CharTokenizer()
    loaded.model.generation_config.eos_token_id = None  # random models: keep every row the full length
    prompts = template_prompts()
    want = plain_replies(loaded, prompts, 6)
    assert greedy_replies(loaded, prompts, 6, batch_size=4, progress=False) == want
    window = getattr(loaded.model.config, "sliding_window", None)
    # The shared head was reused (on top of the two-row check's layouts) unless a short sliding window forbids it.
    assert (max(spy_prefix) == 6) == (not isinstance(window, int))


def test_a_layout_that_disagrees_with_a_plain_run_is_not_used(monkeypatch, spy_prefix):
    """If the shared-prefix cache gave other logits than a plain run (here: a prefix cache built from the wrong
    tokens), the two-row check turns it off and the replies are the plain ones."""
    loaded = build("llama")
    loaded.tokenizer = CharTokenizer()
    loaded.model.generation_config.eos_token_id = None
    original = replies_module._inputs

    def corrupt(loaded_, seqs, prefix):
        if not prefix:
            return original(loaded_, seqs, prefix)
        ids, mask, _ = original(loaded_, seqs, prefix)
        wrong = torch.tensor([[7] * prefix])
        cache = replies_module._cache_of(loaded_.model(input_ids=wrong, use_cache=True))
        cache.batch_repeat_interleave(len(seqs))
        return ids, mask, cache

    monkeypatch.setattr(replies_module, "_inputs", corrupt)
    prompts = template_prompts(seed=4)
    assert greedy_replies(loaded, prompts, 5, progress=False) == plain_replies(loaded, prompts, 5)


# -- stopping once decided ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_model(None)


@pytest.fixture(scope="module")
def mixed_prompts(tiny):
    """Harmful and benign eval prompts interleaved: batches that hold refusals and compliances together."""
    pairs = [p for p in load_pairs(shipped_dataset()) if p.split == "eval"][:40]
    return [format_prompt(tiny.tokenizer, text) for p in pairs for text in (p.harmful, p.benign)]


@pytest.mark.parametrize("compact", [True, False])
def test_stopping_once_decided_keeps_every_verdict_and_cuts_refusals(tiny, mixed_prompts, monkeypatch, compact):
    if not compact:  # a cache that cannot be cut: the remaining rows are re-run from their text
        monkeypatch.setattr(DynamicCache, "batch_select_indices", None)
    firsts, whole = plain_replies(tiny, mixed_prompts, 24)
    got_firsts, cut = greedy_replies(tiny, mixed_prompts, 24, batch_size=16, progress=False, until_decided=True)
    assert got_firsts == firsts
    assert [is_refusal(c) for c in cut] == [is_refusal(w) for w in whole]
    assert all(w.startswith(c) for c, w in zip(cut, whole, strict=True))
    refusals = [(c, w) for c, w in zip(cut, whole, strict=True) if is_refusal(w)]
    assert 30 <= len(refusals) < len(whole)
    assert sum(len(c) < len(w) for c, w in refusals) >= len(refusals) // 2  # most refusals stopped early
    assert all(refusal_decided(c) or c == w for c, w in zip(cut, whole, strict=True))


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each prompt keeps one token of its own
    assert shared_prefix_length([[1, 2, 3]]) == 0


def test_batch_rows_follow_free_memory(tiny, monkeypatch):
    monkeypatch.setattr(replies_module, "free_memory", lambda device: 0)
    assert replies_module.batch_rows(tiny, 70) == 1
    monkeypatch.setattr(replies_module, "free_memory", lambda device: 1 << 50)
    assert replies_module.batch_rows(tiny, 70) == 256  # the CPU cap
    per_row = replies_module.forward_row_bytes(tiny, 70)
    monkeypatch.setattr(replies_module, "free_memory", lambda device: 4 * 10 * per_row)
    assert 1 < replies_module.batch_rows(tiny, 70) < 10  # ten rows' forwards, less their KV caches
