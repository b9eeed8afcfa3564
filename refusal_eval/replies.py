"""Greedy replies: the behaviour rates (scored pairs, tricky set) and the calibration replies behind the token sets.

:func:`greedy_replies` calls ``model.generate`` (so a checkpoint's generation config, such as a repetition penalty,
applies as in any transformers generation), with three savings over one left-padded ``generate`` per batch:

* **Shared prefix.** The chat-formatted prompts of one call start with the same template tokens (SmolLM2: a system
  turn and the user header, 24 of about 40 tokens). They are run once per batch on one row and the cache is repeated
  per row; rows are laid out ``[prefix][padding][own tokens]`` with the padding masked and position ids counted over
  real tokens, so every token sees what it sees in a plain left-padded batch. Not used under a sliding attention
  window shorter than the rows (the padding would displace the window), with a cache that cannot be repeated, or
  where a two-row check of first-step logits against a plain left-padded run disagrees (checked once per model).
* **Length order.** Rows are batched by prompt length, so a batch pads little; results come back in prompt order.
* **Stop when decided** (``until_decided``). A reply stops once the refusal matcher's verdict cannot change
  (:func:`refusal_eval.metrics.refusal_decided`: a refusal opening takes a few tokens). Every :data:`SEGMENT`
  tokens the finished rows leave the batch and the cache is cut to the rest, so a batch of refusals costs a few
  decoding steps. The verdict is the one the whole reply would get; the reply kept is the text up to that point.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from refusal_eval import distributed
from refusal_eval.metrics import refusal_decided
from refusal_eval.models.loading import LoadedModel, input_device
from refusal_eval.patching.exact import forward_row_bytes, free_memory

log = logging.getLogger("refusal_eval")

# Decoding steps between two compactions of the batch when replies stop once decided.
SEGMENT = 8
# Shared prefixes shorter than this are not worth a separate forward.
MIN_PREFIX = 4
# Per model: does the shared-prefix layout reproduce a plain left-padded run? (decided on first use)
_PREFIX_AGREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def batch_rows(loaded: LoadedModel, width: int) -> int:
    """Rows per ``generate`` call for replies ``width`` tokens long (prompt plus reply): what a quarter of the free
    memory holds for one row's forward and its KV cache, capped at 256 (CPU: larger batches stop paying; on
    SmolLM2, 256 rows took 0.69 of the time of 64) or 1024 on an accelerator."""
    config = loaded.model.config
    head_dim = int(getattr(config, "head_dim", 0) or loaded.d_model // loaded.n_heads)
    element = next(loaded.model.parameters()).element_size()
    cache = element * width * loaded.n_layers * 2 * loaded.n_kv_heads * head_dim
    device = input_device(loaded.model)
    cap = 256 if device.type == "cpu" else 1024
    return int(min(cap, max(1, free_memory(device) // 4 // (forward_row_bytes(loaded, width) + cache))))


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [n, width] padded on the left with ``pad_id``, and the attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Leading tokens every prompt shares, leaving each prompt at least one token of its own (0 for one prompt)."""
    if len(prompts) < 2:
        return 0
    first, longest = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < longest and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _cache_key(model) -> str:
    """The keyword under which this transformers version passes a KV cache (``cache`` from 5.2x on)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


class _Decided(StoppingCriteria):
    """Per row: the refusal matcher's verdict on the reply so far can no longer change."""

    def __init__(self, tokenizer, start: int):
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([refusal_decided(t) for t in texts], dtype=torch.bool, device=input_ids.device)


def _window_fits(model, width: int) -> bool:
    window = getattr(model.config, "sliding_window", None)
    return not isinstance(window, int) or window >= width


def _inputs(loaded: LoadedModel, seqs: Sequence[Sequence[int]], prefix: int):
    """(ids, mask, cache or None) for one batch: ``[prefix][padding][own tokens]`` with the prefix's cache repeated
    per row, or plain left padding when ``prefix`` is 0 (or the model's cache cannot be repeated)."""
    model, pad, device = loaded.model, loaded.tokenizer.pad_token_id, input_device(loaded.model)
    if prefix:
        head = torch.tensor([list(seqs[0][:prefix])], dtype=torch.long)
        cache = _cache_of(model(input_ids=head.to(device), use_cache=True))
        if callable(getattr(cache, "batch_repeat_interleave", None)):
            cache.batch_repeat_interleave(len(seqs))
            ids, mask = left_pad([s[prefix:] for s in seqs], pad)
            ids = torch.cat([head.expand(len(seqs), -1), ids], dim=1)
            mask = torch.cat([torch.ones(len(seqs), prefix, dtype=torch.long), mask], dim=1)
            return ids.to(device), mask.to(device), cache
    ids, mask = left_pad(seqs, pad)
    return ids.to(device), mask.to(device), None


def _generate(loaded: LoadedModel, ids, mask, cache, max_new_tokens: int, stop=None, **extra):
    kwargs = {_cache_key(loaded.model): cache} if cache is not None else {}
    return loaded.model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=loaded.tokenizer.pad_token_id, return_dict_in_generate=True,
        stopping_criteria=StoppingCriteriaList([stop]) if stop is not None else None, **kwargs, **extra,
    )


def _prefix_agrees(loaded: LoadedModel, prompts: Sequence[Sequence[int]], prefix: int) -> bool:
    """Whether the shared-prefix layout gives a plain left-padded run's first-step logits (within the dtype's
    rounding) for the shortest and the longest prompt (the most padding). Decided once per model."""
    model = loaded.model
    if model in _PREFIX_AGREES:
        return _PREFIX_AGREES[model]
    two = [min(prompts, key=len), max(prompts, key=len)]
    got = _generate(loaded, *_inputs(loaded, two, prefix), 1, output_logits=True).logits[0].float()
    want = _generate(loaded, *_inputs(loaded, two, 0), 1, output_logits=True).logits[0].float()
    eps = torch.finfo(next(model.parameters()).dtype).eps
    tolerance = max(1e-3, 8 * eps) * float(want.abs().max())
    difference = float((got - want).abs().max())
    agrees = difference <= tolerance
    if not agrees:
        log.warning("generating without the shared-prompt-prefix cache: on this model it moves first-step logits "
                    "by %.3g (tolerance %.3g)", difference, tolerance)
    _PREFIX_AGREES[model] = agrees
    return agrees


def _stop_ids(loaded: LoadedModel) -> set[int]:
    """Ids that end a reply: the tokenizer's and the generation config's end of sequence."""
    eos = loaded.model.generation_config.eos_token_id
    return ({loaded.tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos])) - {None}


def _ended(tokens: torch.Tensor, stops: set[int], pad: int) -> bool:
    return int(tokens[-1]) == pad or any(int(t) in stops for t in tokens)


def _batch(loaded: LoadedModel, seqs: Sequence[Sequence[int]], prefix: int, max_new_tokens: int,
           until_decided: bool) -> list[torch.Tensor]:
    """Generated tokens of each row (after an end of sequence or a decided verdict: padding, or cut there)."""
    tok = loaded.tokenizer
    ids, mask, cache = _inputs(loaded, seqs, prefix)
    start = ids.shape[1]
    if not until_decided:
        return list(_generate(loaded, ids, mask, cache, max_new_tokens).sequences[:, start:].cpu())
    stops = _stop_ids(loaded)
    rows, done, left = list(range(len(seqs))), {}, max_new_tokens
    while True:
        out = _generate(loaded, ids, mask, cache, min(SEGMENT, left), stop=_Decided(tok, start))
        produced = out.sequences.shape[1] - ids.shape[1]
        left -= produced
        new = out.sequences[:, start:].cpu()
        texts = tok.batch_decode(new, skip_special_tokens=True)
        keep = [j for j in range(len(rows)) if left > 0 and not _ended(new[j], stops, tok.pad_token_id)
                and not refusal_decided(texts[j])]
        finished = set(range(len(rows))) - set(keep)
        done.update({rows[j]: new[j] for j in finished})
        if not keep:
            return [done[i] for i in range(len(seqs))]
        cache = _cache_of(out)
        index = torch.tensor(keep, device=out.sequences.device)
        if callable(getattr(cache, "batch_select_indices", None)):
            cache.batch_select_indices(index)
        else:
            cache = None  # re-run the remaining rows' prompts and replies so far
        ones = torch.ones(mask.shape[0], produced, dtype=mask.dtype, device=mask.device)
        ids, mask = out.sequences[index], torch.cat([mask, ones], dim=1)[index]
        rows = [rows[j] for j in keep]


def opening_ids(tokens: torch.Tensor, n: int, stops: set[int]) -> tuple[int, ...]:
    """The first ``n`` generated ids of a reply, cut after an end of sequence (or the padding after it)."""
    out: list[int] = []
    for t in tokens[:n].tolist():
        out.append(int(t))
        if t in stops:
            break
    return tuple(out)


@torch.inference_mode()
def greedy_replies(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int | None = None,
    desc: str = "generating", progress: bool = True, until_decided: bool = False, opening: int = 1,
) -> tuple[list, list[str]]:
    """Greedy completions of tokenised prompts: (first generated token id, decoded reply) for each, in order; with
    ``opening`` 2, a tuple of the first two generated ids instead of the first (one where the reply ended after
    one token). With ``until_decided`` a reply stops once the refusal matcher's verdict on it is settled (see the
    module). ``batch_size`` None: :func:`batch_rows`."""
    tok, n = loaded.tokenizer, len(prompts)
    if not n:
        return [], []
    # Under torchrun every process generates the replies itself: one batch size for all (the smallest), so that
    # all derive the same token sets from the same numerics.
    width = max(map(len, prompts)) + max_new_tokens
    batch_size = batch_size or distributed.agree_min(batch_rows(loaded, width))
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    prefix = shared_prefix_length(prompts)
    if prefix < MIN_PREFIX or not _window_fits(loaded.model, width) or not _prefix_agrees(loaded, prompts, prefix):
        prefix = 0
    firsts, replies = [0] * n, [""] * n
    stops = _stop_ids(loaded) | {tok.pad_token_id} - {None}
    for begin in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        rows = order[begin : begin + batch_size]
        seqs = [prompts[i] for i in rows]
        for i, tokens in zip(rows, _batch(loaded, seqs, prefix, max_new_tokens, until_decided), strict=True):
            firsts[i] = int(tokens[0]) if opening == 1 else opening_ids(tokens, opening, stops)
            replies[i] = tok.decode(tokens, skip_special_tokens=True)
    return firsts, replies
