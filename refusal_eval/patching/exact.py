"""Exact activation patching, batched: many patched variants of many pairs in one forward pass.

Definition (one forward per cell): run the *target* side of every pair with one component's activation
replaced by its value from the *source* side, and read the refusal score at the last prompt token.
Denoising: target = benign, source = harmful. Noising: target = harmful, source = benign.

Sides are left-padded, so position offsets count from the end of the prompt (-1 = last prompt token) and
mean the same slot on both sides. Pairs of equal token length are fully aligned: any position, or all of
them at once, can be patched. Pairs of unequal length are *right-aligned*: only offsets inside both sides
(in practice the shared chat-template suffix) can be patched, and an all-positions patch is refused.

What runs is only what can change a result (each shortcut checked against the full forward, falling back
where it disagrees): cells that provably cannot move the score are exact zeros and are not run; a patched
forward starts at the first patched layer from the clean run's recorded layer inputs (layer skip) and
recomputes only the columns from the first patched one on, attending to the clean keys/values of earlier
columns (prefix reuse); only the last position is unembedded; cells are grouped into batched forwards of
variants x pairs by a cost model (:meth:`PatchEngine._plan_chunks`).

A score read one token into the reply (an opening tree of depth 2, :class:`refusal_eval.metrics.TokenSets`)
appends its branch tokens after every prompt: the engine's ``tail``. Each tail column attends to the prompt and to
itself only, at the position right after the prompt, so every branch reads p(t2 | prompt, t) from one forward.
Patches write prompt columns only, and position offsets still count from the end of the prompt.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_eval import distributed
from refusal_eval.errors import ModelError
from refusal_eval.models.loading import LoadedModel, input_device
from refusal_eval.patching.components import Component
from refusal_eval.resume import chunk_key

Point = tuple[str, int]


@dataclass
class PairBatch:
    """Tokenised pairs, each side left-padded to a common width with its own attention mask."""

    harmful_ids: torch.Tensor  # [N, T]
    benign_ids: torch.Tensor  # [N, T]
    harmful_mask: torch.Tensor  # [N, T], 1 on real tokens
    benign_mask: torch.Tensor  # [N, T]
    pair_ids: list[str]
    tail: int = 0  # branch-token columns after every prompt (the last ``tail`` columns of both sides)

    @property
    def n_pairs(self) -> int:
        return self.harmful_ids.shape[0]

    @property
    def width(self) -> int:
        return self.harmful_ids.shape[1]

    @property
    def prompt_width(self) -> int:
        """Columns of the prompts (position offsets count back from the last of them)."""
        return self.width - self.tail

    @property
    def equal_lengths(self) -> bool:
        return bool(torch.equal(self.harmful_mask, self.benign_mask))

    def side(self, harmful: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of one side."""
        return (self.harmful_ids, self.harmful_mask) if harmful else (self.benign_ids, self.benign_mask)

    def select(self, rows: slice) -> PairBatch:
        """A sub-batch of pairs, trimmed of columns that are padding on both sides of every kept pair."""
        real = self.harmful_mask[rows] | self.benign_mask[rows]
        start = int((real.sum(0) == 0).sum())
        return PairBatch(
            self.harmful_ids[rows, start:], self.benign_ids[rows, start:],
            self.harmful_mask[rows, start:], self.benign_mask[rows, start:], self.pair_ids[rows], self.tail,
        )


def build_pair_batch(
    tokenized: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, pair_ids: Sequence[str],
    allow_unequal: bool = False, tail: Sequence[int] = (),
) -> PairBatch:
    """Left-pad (harmful, benign) token lists into one PairBatch (right-aligned if lengths differ), with the
    ``tail`` token ids (an opening tree's branch tokens) appended after every prompt."""
    if not tokenized:
        raise ValueError("no pairs to batch")
    width = max(max(len(h), len(b)) for h, b in tokenized)
    n = len(tokenized)
    ids = {side: torch.full((n, width), pad_id, dtype=torch.long) for side in (0, 1)}
    masks = {side: torch.zeros((n, width), dtype=torch.long) for side in (0, 1)}
    for i, pair in enumerate(tokenized):
        if len(pair[0]) != len(pair[1]) and not allow_unequal:
            raise ValueError(
                f"pair {pair_ids[i]}: sides have {len(pair[0])} and {len(pair[1])} tokens; need equal lengths"
            )
        for side, tokens in enumerate(pair):
            ids[side][i, width - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
            masks[side][i, width - len(tokens) :] = 1
    extended = [with_tail(ids[side], masks[side], tail) for side in (0, 1)]
    return PairBatch(extended[0][0], extended[1][0], extended[0][1], extended[1][1], list(pair_ids), len(tail))


def with_tail(ids: torch.Tensor, mask: torch.Tensor, tail: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts [n, T] with the ``tail`` token ids appended as real tokens: [n, T + len(tail)]."""
    if not tail:
        return ids, mask
    n = ids.shape[0]
    extra = torch.tensor(list(tail), dtype=ids.dtype).expand(n, -1)
    return torch.cat([ids, extra.to(ids.device)], 1), torch.cat([mask, torch.ones_like(extra).to(mask.device)], 1)


def _tail_inputs(mask: torch.Tensor, tail: int, like: torch.Tensor, implementation: str):
    """Position ids [n, T] and the [n, 1, T, T] attention mask of left-padded rows whose last ``tail`` columns are
    branch tokens: prompt columns attend causally to the prompt; each branch column attends to the prompt and to
    itself, at the position after the prompt (padding columns attend to themselves only, so nothing is empty)."""
    n, width = mask.shape
    prompt = width - tail
    real = mask.bool()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    position_ids[:, prompt:] = position_ids[:, prompt - 1 : prompt] + 1
    rows = torch.arange(width, device=mask.device)[:, None]
    cols = torch.arange(width, device=mask.device)[None, :]
    allowed = (cols <= rows) & (cols < prompt)  # causal over prompt keys (branch rows see the whole prompt)
    allowed = allowed[None] & real[:, None, :]
    allowed |= (cols == rows)[None]
    if implementation == "sdpa":
        return position_ids, allowed[:, None]
    if implementation == "eager":
        blocked = torch.full(allowed.shape, torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return position_ids, torch.where(allowed.to(like.device), zero, blocked)[:, None]
    raise ModelError(f"{tail} branch tokens need a 4D attention mask, which attention implementation "
                     f"'{implementation}' does not take; load the model with SDPA or eager attention, or use "
                     "--score-depth 1")


def _detach(value):
    """Recorded layer arguments, detached (tensors) and otherwise kept as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _tile(value, repeat: int, n: int):
    """Tile tensors with batch size ``n`` ``repeat`` times along dim 0 (rows are variant-major: v * n + pair);
    others (batch 1 broadcasting over rows, scalars) are left as they are."""
    if repeat == 1:
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != n:
            return value
        return value.repeat(repeat, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_tile(v, repeat, n) for v in value)
    if isinstance(value, list):
        return [_tile(v, repeat, n) for v in value]
    return value


class _PrefixCache:
    """Duck-typed stand-in for a transformers ``Cache`` passed to replayed decoder layers.

    Recording (``prefix=None``): each attention layer's keys/values pass through and are kept. Replaying:
    the recorded keys/values of columns ``:col0`` (tiled ``repeat`` times over the batch, one layer at a
    time, so that only one layer's copy is ever alive) are prepended, so queries of the replayed columns
    attend to the whole prompt while only those columns are recomputed.
    """

    def __init__(
        self, prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, col0: int = 0, repeat: int = 1
    ) -> None:
        self.prefix = prefix
        self.col0 = col0
        self.repeat = repeat
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def replaying(self, col0: int, repeat: int) -> _PrefixCache:
        return _PrefixCache(self.prefix, col0, repeat)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.prefix is None:
            self.recorded[layer_idx] = (key_states.detach(), value_states.detach())
            return key_states, value_states
        keys, values = self.prefix[layer_idx]
        n = keys.shape[0]
        keys = _tile(keys[..., : self.col0, :], self.repeat, n)
        values = _tile(values[..., : self.col0, :], self.repeat, n)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


# kinds whose patch at a layer reaches other positions only through later layers' attention
_OUTPUTS = frozenset({"attn_out", "mlp_out", "head", "resid_post"})


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early."""


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _slice_columns(name: str, value, col0: int, width: int):
    """A recorded layer keyword argument restricted to query columns ``col0:`` (keys keep every column).

    Raises ``ValueError`` for a tensor argument whose sequence axis cannot be identified safely."""
    if name == "attention_mask" and isinstance(value, torch.Tensor):
        if value.dim() != 4 or value.shape[-2] != width or value.shape[-1] != width:
            raise ValueError(f"attention mask of shape {tuple(value.shape)}")
        return value[..., col0:, :]
    if name in ("position_ids", "cache_position") and isinstance(value, torch.Tensor):
        return value[..., col0:] if value.shape[-1] == width else value
    if name == "position_embeddings" and isinstance(value, tuple):
        return tuple(v[..., col0:, :] for v in value)
    if isinstance(value, torch.Tensor) and width in value.shape:
        raise ValueError(f"argument '{name}' of shape {tuple(value.shape)}")
    return value


def _causal_mask(col0: int, width: int, like: torch.Tensor, implementation: str) -> torch.Tensor:
    """The [1, 1, width - col0, width] causal mask of queries col0.. over every key, in the form the
    attention implementation takes (boolean for SDPA, additive for eager), for batches that need no padding
    mask (transformers passes ``None`` there and relies on a top-left ``is_causal`` that a cached prefix breaks)."""
    rows = torch.arange(col0, width, device=like.device)[:, None]
    allowed = torch.arange(width, device=like.device)[None, :] <= rows
    if implementation == "sdpa":
        return allowed[None, None]
    if implementation == "eager":
        blocked = torch.full(allowed.shape, torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
        return torch.where(allowed, torch.zeros((), dtype=like.dtype, device=like.device), blocked)[None, None]
    raise ValueError(f"attention implementation '{implementation}'")


def forward_row_bytes(loaded: LoadedModel, width: int) -> int:
    """Bytes one row of a forward over ``width`` tokens holds at its peak (residual, MLP and attention activations;
    an upper bound used to size batches)."""
    config = loaded.model.config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1024)
    inner = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * hidden)
    element = next(loaded.model.parameters()).element_size()
    return element * width * (8 * hidden + 4 * inner + 2 * max(1, loaded.n_heads) * width)


def free_memory(device: torch.device) -> int:
    """Bytes free for activations: the accelerator's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _check_patch(batch: PairBatch, components: Sequence[Component], direction: str) -> None:
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not '{direction}'")
    if not batch.equal_lengths and any(c.position is None for c in components):
        raise ValueError("an all-positions patch needs pairs of equal token length on both sides")


@dataclass
class _Shard:
    """This process's share of one sharded patch call: every ``size``-th planned forward, from ``rank``; ``owned``
    marks the [component, pair] cells it ran."""

    rank: int
    size: int
    owned: torch.Tensor
    planned: int = 0

    def take(self, ks: Sequence[int], rows: slice) -> bool:
        """Whether the next planned forward (cells ``ks`` x ``rows``) runs in this process; marks its cells."""
        mine = self.planned % self.size == self.rank
        self.planned += 1
        if mine:
            self.owned[list(ks), rows] = True
        return mine


class PatchEngine:
    """Runs clean and patched forward passes of one model and returns refusal scores."""

    def __init__(
        self,
        loaded: LoadedModel,
        score_fn: Callable[[torch.Tensor], torch.Tensor],
        max_rows: int | str = "auto",
        progress: bool = False,
        layer_skip: bool = True,
        prefix_reuse: bool = True,
        merge_overhead: int | None = None,
        max_chunk_tokens: int | None = None,
        tail: Sequence[int] = (),
    ) -> None:
        self.loaded = loaded
        # branch tokens appended after every prompt (an opening tree of depth 2): score_fn then takes logits
        # [rows, 1 + len(tail), vocab]; inputs handed to the engine carry them (build_pair_batch, with_tail)
        self.tail = list(tail)
        self.model = loaded.model
        self.adapter = loaded.adapter
        self.score_fn = score_fn
        self._auto_rows = max_rows == "auto"
        self.max_rows = 0 if self._auto_rows else max(1, int(max_rows))
        self.progress = progress
        self.device = input_device(self.model)  # a device map may spread (or offload) the rest
        self.head_dim = self.adapter.head_dim(self.model.config)
        self._layer_skip: bool | None = None if layer_skip else False
        self.prefix_reuse = prefix_reuse
        self._attribution_prefix: bool | None = None if prefix_reuse else False
        # what the patched forwards computed: decoder-layer applications to one token, summed
        self.work = {"patched_forwards": 0, "token_layers": 0, "batches": 0, "prefix_batches": 0, "batch_rows": 0}
        # Optional store of finished pair chunks (``refusal_eval.resume.ResultsLog``): get(key) / put(key, values).
        self.checkpoint = None
        # Under torch.distributed: this process's share of the planned forwards of one _patch call
        # (rank, world size, forwards planned so far, cells run here); None in a single process.
        self._shard: _Shard | None = None
        self.merge_overhead = merge_overhead
        self.max_chunk_tokens = max_chunk_tokens
        # keys/values of a chunk span every column: cap rows x width as well (a multiple of the token cap)
        self.kv_tokens_factor = 4

    # -- hook points -------------------------------------------------------------------------------------
    def _module(self, point: Point) -> tuple[nn.Module, str]:
        kind, layer = point
        self.adapter.require(kind)  # ModelError where this family cannot patch the kind exactly
        block = self.adapter.layers(self.model)[layer] if kind != "embed" else None
        if kind == "embed":  # token embeddings (TransformerLens hook_embed)
            return self.model.get_input_embeddings(), "out"
        if kind == "resid_pre":  # input of the decoder layer
            return block, "pre"
        if kind == "resid_post":  # output of the decoder layer
            return block, "out"
        if kind == "attn_out":  # output of the module whose output is added to the residual
            return self.adapter.attn_out(block), "out"
        if kind == "mlp_out":
            return self.adapter.mlp_out(block), "out"
        if kind == "head":  # input of the output projection: concatenated per-head outputs (hook_z)
            return self.adapter.o_proj(block), "pre"
        raise ValueError(f"unknown component kind '{kind}'")

    @contextmanager
    def _hooks(self, transforms: dict[Point, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Apply ``transform(activation) -> activation`` at each hook point for the duration."""
        handles = []
        try:
            for point, fn in transforms.items():
                module, where = self._module(point)
                if where == "pre":

                    def pre(_m, args, kwargs, fn=fn):
                        if args:
                            return (fn(args[0]), *args[1:]), kwargs
                        kwargs = dict(kwargs)
                        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
                        return args, kwargs

                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                else:

                    def post(_m, _args, output, fn=fn):
                        if isinstance(output, tuple):
                            return (fn(output[0]), *output[1:])
                        return fn(output)

                    handles.append(module.register_forward_hook(post))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- forward passes ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def scores(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        transforms: dict[Point, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Refusal score at the last prompt position (and the branch columns after it) for each row of a
        left-padded batch (float32, on CPU)."""
        with self._hooks(transforms or {}):
            return self.score_fn(self.forward_logits(ids, mask)).float().cpu()

    def forward_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logits ``score_fn`` takes from a forward of the rows (the model's grad mode and hooks apply):
        [n, vocab] at the last position, or with a tail [n, 1 + len(tail), vocab] from the last prompt position on."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        n_tail = len(self.tail)
        if n_tail > 1:
            config = self.model.config
            window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
            if window and ids.shape[1] > window:
                raise ModelError(f"{n_tail} branch tokens need one attention mask for every layer, which this model's "
                                 f"sliding-window attention (window {window}) cannot take for prompts of "
                                 f"{ids.shape[1]} tokens; use --score-depth 1")
            implementation = getattr(config, "_attn_implementation", "eager")
            position_ids, attention = _tail_inputs(mask, n_tail, self.model.get_input_embeddings().weight,
                                                   implementation)
        else:  # one branch column follows the prompt causally: the plain causal mask is the branch mask
            position_ids, attention = (mask.cumsum(-1) - 1).clamp(min=0), mask
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=position_ids,
                         logits_to_keep=1 + n_tail, use_cache=False)
        return self._score_logits(out.logits)

    def _score_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, :] if not self.tail else logits[:, -1 - len(self.tail) :, :]

    @torch.inference_mode()
    def embedded(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The first decoder layer's input (token embeddings plus whatever the model adds before its layers),
        from a forward stopped there."""
        seen: dict[str, torch.Tensor] = {}

        def stop(_m, args, kwargs):
            seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _StopForward

        handle = self.adapter.layers(self.model)[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.scores(ids, mask)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return seen["hidden"]

    # -- layer skip and prefix reuse ---------------------------------------------------------------------------
    @torch.inference_mode()
    def layer_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) every decoder layer receives in a clean forward of the batch (for replay)."""
        return self._clean_run(ids, mask)[0]

    @torch.inference_mode()
    def _clean_run(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[tuple[tuple, dict]], torch.Tensor]:
        """One clean forward: every decoder layer's recorded (args, kwargs), and the scores."""
        inputs: list[tuple[tuple, dict]] = []
        with self.recording_inputs(inputs):
            clean = self.scores(ids, mask)
        return inputs, clean

    @contextmanager
    def recording_inputs(self, inputs: list[tuple[tuple, dict]], kv: _PrefixCache | None = None) -> Iterator[None]:
        """While open, append every decoder layer's (args, kwargs) to ``inputs`` (detached, positional
        arguments named after the hidden states); with ``kv``, also pass it to the layers as their cache so
        that it records each attention layer's keys and values (where the layers take a cache argument)."""

        def record(layer: nn.Module, args: tuple, kwargs: dict):
            # Name the positional arguments after the hidden states (GPT-2 passes its cache and mask by
            # position) so that a replay can find and replace them.
            try:
                signature = inspect.signature(layer.forward)
                bound = signature.bind(*args, **kwargs)
                first = next(iter(bound.arguments))
                if any(p.kind is p.VAR_POSITIONAL and p.name in bound.arguments for p in signature.parameters.values()):
                    raise ValueError("variadic positional arguments")
                var = [p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
                named = {k: v for k, v in bound.arguments.items() if k != first and k not in var}
                for name in var:
                    named.update(bound.arguments.get(name, {}))
                args, kwargs = (bound.arguments[first],), named
            except (TypeError, ValueError, StopIteration):
                pass
            inputs.append((_detach(args), _detach(kwargs)))
            name = next((k for k in _CACHE_KWARGS if k in kwargs and kwargs[k] is None), None)
            if kv is not None and name is not None:
                return args, {**kwargs, name: kv}
            return None

        layers = self.adapter.layers(self.model)
        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.inference_mode()
    def scores_from_layer(
        self,
        start: int,
        inputs: list[tuple[tuple, dict]],
        repeat: int,
        transforms: dict[Point, Callable[[torch.Tensor], torch.Tensor]],
        col0: int = 0,
        cache: _PrefixCache | None = None,
    ) -> torch.Tensor:
        """Scores of a forward that starts at decoder layer ``start`` and column ``col0`` from recorded inputs.

        Layers before ``start`` are untouched by any patch at ``start`` or later, so their output is the
        recorded clean residual stream; replaying the remaining layers with their recorded arguments (masks,
        rotary embeddings) tiled ``repeat`` times gives the same numbers as a full forward. Causal attention
        means columns before ``col0`` are untouched too: with ``cache`` holding their recorded keys/values
        (see :meth:`record_prefix`), only columns ``col0:`` are recomputed. Both shortcuts are checked against
        the full model by :meth:`_check_replay` before they are used.
        """
        layers = self.adapter.layers(self.model)
        args, kwargs = inputs[start]
        hidden = args[0] if args else kwargs["hidden_states"]
        n, width = hidden.shape[0], hidden.shape[1]
        hidden = _tile(hidden[:, col0:], repeat, n)
        if cache is not None and cache.prefix is not None:
            cache = cache.replaying(col0, repeat)
        with self._hooks(transforms):
            causal = None  # built once per call where transformers passed no mask
            for index in range(start, len(layers)):
                args, kwargs = inputs[index]
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if cache is not None:
                    name = next(k for k in _CACHE_KWARGS if k in kw)
                    kw[name] = cache
                    if col0 and "attention_mask" in kw:
                        kw = {k: _slice_columns(k, v, col0, width) for k, v in kw.items()}
                        if kw["attention_mask"] is None:
                            if causal is None:
                                implementation = getattr(self.model.config, "_attn_implementation", "eager")
                                causal = _causal_mask(col0, width, hidden, implementation)
                            kw["attention_mask"] = causal
                    elif col0:
                        raise ValueError("the layers take no attention mask argument")
                kw = {k: _tile(v, repeat, n) for k, v in kw.items()}
                out = layers[index](hidden, *_tile(args[1:], repeat, n), **kw)
                hidden = out[0] if isinstance(out, tuple) else out
        last = self.adapter.final_norm(self.model)(hidden[:, -1 - len(self.tail) :, :])
        return self.score_fn(self._score_logits(self.model.get_output_embeddings()(last))).float().cpu()

    @torch.inference_mode()
    def record_prefix(self, inputs: list[tuple[tuple, dict]]) -> tuple[torch.Tensor, _PrefixCache] | None:
        """Replay every layer once, recording each attention layer's keys and values for prefix reuse.

        Returns the replayed scores and the recorded cache, or None where the layers take no cache argument.
        """
        if not inputs or not any(k in inputs[0][1] for k in _CACHE_KWARGS):
            return None
        cache = _PrefixCache()
        replay = self.scores_from_layer(0, inputs, 1, {}, cache=cache)
        if len(cache.recorded) != len(inputs):
            return None
        return replay, _PrefixCache(cache.recorded)

    def _check_replay(
        self, inputs: list[tuple[tuple, dict]], full: torch.Tensor, first_diff: int
    ) -> tuple[bool, _PrefixCache | None]:
        """Which shortcuts reproduce the full forward's scores ``full`` for this batch: (layer skip, prefix
        cache or None).

        Layer skip is decided by the first batch of a model, with a replay from layer 0. Prefix reuse is
        checked on every batch: the replay that records the keys/values must reproduce ``full``, and so must
        a replay of columns ``first_diff:`` (the first column a cell replays from) on top of them; otherwise
        every column is recomputed.
        """

        def agrees(values: torch.Tensor) -> bool:
            return bool(torch.allclose(values, full, atol=1e-4, rtol=1e-4))

        recorded = None
        if self._layer_skip is not False:
            try:
                if self.prefix_reuse and first_diff > 0:
                    recorded = self.record_prefix(inputs)
                if recorded is not None:
                    ok = agrees(recorded[0])
                else:
                    ok = True if self._layer_skip else agrees(self.scores_from_layer(0, inputs, 1, {}))
            except Exception:  # an architecture whose layers cannot be replayed this way: full forwards
                ok = False
            if self._layer_skip is None:
                self._layer_skip = ok
            if not ok:
                return False, None
        if not self._layer_skip or recorded is None:
            return bool(self._layer_skip), None
        try:
            trimmed = self.scores_from_layer(0, inputs, 1, {}, col0=first_diff, cache=recorded[1])
        except (ValueError, TypeError, KeyError, RuntimeError, StopIteration):
            return True, None
        return True, recorded[1] if agrees(trimmed) else None

    @torch.inference_mode()
    def cache(
        self, ids: torch.Tensor, mask: torch.Tensor, points: Sequence[Point], from_col: int = 0
    ) -> dict[Point, torch.Tensor]:
        """Activations [n, T - from_col, d] at the given hook points for a batch (one clean forward), kept
        from column ``from_col`` on."""
        store: dict[Point, torch.Tensor] = {}
        n, width = ids.shape

        def recorder(point: Point) -> Callable[[torch.Tensor], torch.Tensor]:
            def fn(x: torch.Tensor) -> torch.Tensor:
                # view: OPT's fc2 sees tokens flattened to [n * T, d]
                store[point] = x.detach().view(n, width, -1)[:, from_col:].clone()
                return x

            return fn

        self.scores(ids, mask, {p: recorder(p) for p in points})
        return store

    def baseline(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpatched refusal scores (harmful, benign) for every pair."""
        harmful, benign = [], []
        for rows in self._pair_chunks(batch.n_pairs, self.rows(batch.width)):
            sub = batch.select(rows)
            harmful.append(self.scores(*sub.side(harmful=True)))
            benign.append(self.scores(*sub.side(harmful=False)))
        return torch.cat(harmful), torch.cat(benign)

    @staticmethod
    def _pair_chunks(n: int, size: int) -> list[slice]:
        return [slice(i, min(n, i + size)) for i in range(0, n, size)]

    def rows(self, width: int) -> int:
        """Rows (pairs x patched variants) per forward for prompts ``width`` tokens wide: the fixed
        ``max_rows``, or with ``"auto"`` what a quarter of the free memory holds (capped at 4096 rows on an
        accelerator, 256 on CPU, where larger batches stop paying)."""
        if not self._auto_rows:
            return self.max_rows
        cap = 256 if self.device.type == "cpu" else 4096
        return int(min(cap, max(1, free_memory(self.device) // 4 // forward_row_bytes(self.loaded, width))))

    def patch(self, batch: PairBatch, components: Sequence[Component], direction: str = "denoise") -> torch.Tensor:
        """Patched refusal score of the target side, shape [len(components), n_pairs]."""
        return self._patch(batch, components, direction, identity=False)

    def patch_sets(
        self, batch: PairBatch, sets: Sequence[Sequence[Component]], direction: str = "denoise"
    ) -> torch.Tensor:
        """Refusal score of the target side with all the components of each set patched **together** from the
        source side (a joint patch), shape [len(sets), n_pairs]; an empty set gives the clean score. Every set is
        a full forward of the model (no layer skip or prefix reuse: a set spans layers and positions)."""
        flat = [c for members in sets for c in members]
        _check_patch(batch, flat, direction)
        result = torch.empty(len(sets), batch.n_pairs)
        points = sorted({c.point for c in flat})
        rows_per_forward = self.rows(batch.width)
        for rows in self._pair_chunks(batch.n_pairs, rows_per_forward):
            sub = batch.select(rows)
            target, target_mask = sub.side(harmful=direction == "noise")
            source, source_mask = sub.side(harmful=direction == "denoise")
            masks, first_diff = self._position_masks(target, target_mask, source, source_mask, flat, sub.tail)
            source_cache = self.cache(source, source_mask, points, from_col=first_diff) if points else {}
            per_forward = max(1, rows_per_forward // len(target))
            for start in range(0, len(sets), per_forward):
                group = sets[start : start + per_forward]
                entries = [(v, c) for v, members in enumerate(group) for c in members]
                transforms = self._set_transforms(entries, len(group), source_cache, masks, 0, first_diff)
                values = self.scores(target.repeat(len(group), 1), target_mask.repeat(len(group), 1), transforms)
                result[start : start + len(group), rows] = values.view(len(group), -1)
                self.work["patched_forwards"] += 1
        return result

    def identity_patch(
        self, batch: PairBatch, components: Sequence[Component], direction: str = "denoise"
    ) -> torch.Tensor:
        """The target side patched with its *own* activations, shape [len(components), n_pairs], computed the
        way :meth:`patch` computes the real pairs: the same active and idle cells, first differing column,
        layer skip and prefix cache, chunk plan, rows per forward and written slots; only the source
        activations are recorded from the target itself. Mathematically every cell equals the clean score;
        what it differs by is the rounding of the engine's computation path (see :func:`noise_floor`).

        Unlike :meth:`patch`, active cells keep the patched forward's value even where nothing the cell writes
        differs from the target's own (that shortcut would make the result trivially exact); idle cells, which
        are not run in the real pass either, hold the clean score. Counts its forwards in ``work``."""
        return self._patch(batch, components, direction, identity=True)

    def _patch(
        self, batch: PairBatch, components: Sequence[Component], direction: str, identity: bool
    ) -> torch.Tensor:
        """:meth:`patch` (``identity=False``) or :meth:`identity_patch` (``identity=True``).

        Under ``torch.distributed`` (see :mod:`refusal_eval.distributed`) every process plans the same batched
        forwards, runs every world-th of them and receives the others' results: the same numbers as one process."""
        _check_patch(batch, components, direction)
        result = torch.empty(len(components), batch.n_pairs)
        points = sorted({c.point for c in components})
        # resolved once per call: the pair chunks and the variants per forward follow the same row budget
        rows_per_forward = self.rows(batch.width)
        rank, size = distributed.world()
        if size > 1:
            rows_per_forward = distributed.agree_min(rows_per_forward)  # "auto" differs with each one's free memory
            self._shard = _Shard(rank, size, torch.zeros(len(components), batch.n_pairs, dtype=torch.bool))
            before = (self.work["patched_forwards"], self.work["token_layers"])
        self.work["batch_rows"] = rows_per_forward
        pair_chunks = self._pair_chunks(batch.n_pairs, rows_per_forward)
        bar = tqdm(total=len(components) * len(pair_chunks), desc="patching", unit="component",
                   disable=not self.progress, leave=False)
        ids = [c.id for c in components]
        checkpoint = self.checkpoint if size == 1 else None  # a process's chunk holds only its share of the cells
        for rows in pair_chunks:
            key = None
            if checkpoint is not None:
                chunk_ids = batch.pair_ids[rows]
                key = chunk_key("identity" if identity else "patch", direction, ids, chunk_ids)
                done = checkpoint.get(key)
                if done is not None and tuple(done.shape) == (len(components), len(chunk_ids)):
                    result[:, rows] = done
                    bar.update(len(components))
                    continue
            self._patch_chunk(batch, components, direction, identity, rows, points, rows_per_forward, result, bar)
            if key is not None:
                checkpoint.put(key, result[:, rows])
        bar.close()
        if size > 1:
            owned = self._shard.owned
            self._shard = None
            mine = (self.work["patched_forwards"] - before[0], self.work["token_layers"] - before[1])
            parts = distributed.gather((result, owned, mine))
            for values, cells, _ in parts:
                result[cells] = values[cells]
            self.work["patched_forwards"] = before[0] + sum(p[2][0] for p in parts)
            self.work["token_layers"] = before[1] + sum(p[2][1] for p in parts)
        return result

    def _patch_chunk(self, batch: PairBatch, components: Sequence[Component], direction: str, identity: bool,
                     rows, points, rows_per_forward: int, result: torch.Tensor, bar) -> None:
        """One chunk of pairs of :meth:`_patch`: fills ``result[:, rows]``."""
        sub = batch.select(rows)
        target, target_mask = sub.side(harmful=direction == "noise")
        source, source_mask = sub.side(harmful=direction == "denoise")
        masks, first_diff = self._position_masks(target, target_mask, source, source_mask, components, sub.tail)
        # A patch that touches no slot (every chosen position precedes the pair's first differing token,
        # where both runs are identical, or lies outside the prompt) leaves the target run unchanged.
        # Nor does a patch after the last layer's attention at a position other than the last: nothing
        # carries it to the last position any more.
        last = self.loaded.n_layers - 1
        active = [k for k, c in enumerate(components) if masks[c.position].any()
                  and not (c.layer == last and c.kind in _OUTPUTS and c.position not in (None, -1))]
        idle = sorted(set(range(len(components))) - set(active))
        if not active:
            result[:, rows] = self.scores(target, target_mask)
            bar.update(len(components))
            return
        inputs, clean = self._clean_run(target, target_mask)
        result[idle, rows] = clean
        bar.update(len(idle))
        # Columns before the first difference are never written (both runs agree there): not kept.
        # (the identity patch writes the target's own activations, from its own clean full forward)
        recorded_ids, recorded_mask = (target, target_mask) if identity else (source, source_mask)
        source_cache = self.cache(recorded_ids, recorded_mask, points, from_col=first_diff)
        width = sub.width - sub.tail  # columns of the prompt (offsets count from its end)
        # A patch at one column leaves every earlier column untouched, whatever the padding: where no column
        # is shared by all pairs (right-aligned pairs of unequal length), single-position cells still reuse
        # the clean prefix before their own column.
        single = [width + components[k].position for k in active if components[k].position is not None]
        skip, prefix = self._check_replay(inputs, clean, first_diff if first_diff > 0 else min(single, default=0))
        self.work["batches"] += 1
        self.work["prefix_batches"] += prefix is not None
        # Where each cell's forward can start: its layer (layer skip) and, with prefix reuse, its column
        # (a single position) or the batch's first differing column (all positions).
        starts = {}
        for k in active:
            c = components[k]
            layer = c.layer if skip and c.kind != "embed" else -1
            col = 0
            if prefix is not None and layer >= 0:
                col = first_diff if c.position is None else width + c.position
            starts[k] = (layer, col)
        for ks in self._plan_chunks(active, starts, len(target), sub.width, rows_per_forward):
            if self._shard is not None and not self._shard.take(ks, rows):  # another process runs this forward
                bar.update(len(ks))
                continue
            chunk = [components[k] for k in ks]
            layer, col0 = min(starts[k][0] for k in ks), min(starts[k][1] for k in ks)
            transforms = self._patch_transforms(chunk, source_cache, masks, col0, first_diff)
            v = len(chunk)
            if layer >= 0:
                values = self.scores_from_layer(layer, inputs, v, transforms, col0, prefix if col0 else None)
            else:
                values = self.scores(target.repeat(v, 1), target_mask.repeat(v, 1), transforms)
            values = values.view(v, -1)
            if identity:
                result[ks, rows] = values.to(result.dtype)
            else:
                # A pair whose slots this cell does not touch keeps its clean score exactly (a replay of
                # fewer columns may round differently; unmoved pairs must read as exactly 0).
                touched = torch.stack([self._moves(c, masks, source_cache, inputs, first_diff) for c in chunk])
                touched = touched.to(values.device)
                result[ks, rows] = torch.where(touched, values, clean[None, :].to(values.device)).to(result.dtype)
            self.work["patched_forwards"] += 1
            self.work["token_layers"] += v * len(target) * (sub.width - col0) * (self.loaded.n_layers - max(layer, 0))
            bar.update(v)

    def _moves(
        self,
        component: Component,
        masks: dict[int | None, torch.Tensor],
        source_cache: dict[Point, torch.Tensor],
        inputs: list[tuple[tuple, dict]],
        first_diff: int,
    ) -> torch.Tensor:
        """[n] bool: pairs for which the patch writes a value different from the target's own. Where the
        target's activation is at hand (the residual stream entering a layer), identical values (the same
        token at layer 0) make the patch a no-op, whatever the replay's rounding."""
        touched = masks[component.position].any(1)
        if component.kind != "resid_pre" or not inputs:
            return touched
        args, kwargs = inputs[component.layer]
        target = (args[0] if args else kwargs["hidden_states"])[:, first_diff:]
        source = source_cache[component.point].view(target.shape)
        differs = (source != target).any(-1) & masks[component.position][:, first_diff:].to(target.device)
        return touched & differs.any(1).cpu()

    def _plan_chunks(
        self, active: list[int], starts: dict[int, tuple[int, int]], n: int, width: int, rows: int | None = None
    ) -> list[list[int]]:
        """Group cells into batched forwards. A forward from layer L over columns c.. of V variants costs
        about (layers from L) x (V x n x (width - c) + overhead) token-layer applications, ``overhead`` being
        the fixed cost of one layer call in tokens (weights streamed from memory, kernel launches). Cells
        sorted by (start column, start layer) join the previous group while that is cheaper than a forward
        of their own, within the row cap and ``max_chunk_tokens`` (past which caches stop paying on CPU)."""
        n_layers = self.loaded.n_layers
        n_variants = max(1, (rows or self.rows(width)) // n)
        overhead = self.merge_overhead
        if overhead is None:
            overhead = 32 if self.device.type == "cpu" else 4096
        max_tokens = self.max_chunk_tokens
        if max_tokens is None:
            max_tokens = 1024 if self.device.type == "cpu" else 1 << 30

        def cost(group: list[int]) -> float:
            layer, col = min(starts[j][0] for j in group), min(starts[j][1] for j in group)
            layers = n_layers - layer if layer >= 0 else n_layers + 1  # a full forward (embed patches)
            return layers * (len(group) * n * (width - col) + overhead)

        chunks: list[list[int]] = []
        # column-major: neighbours share their columns (the larger factor late in a prompt) and differ in layers
        for k in sorted(active, key=lambda k: (starts[k][0] < 0, starts[k][1], starts[k][0], k)):
            if chunks:
                group = chunks[-1] + [k]
                col = min(starts[j][1] for j in group)
                if ((starts[chunks[-1][0]][0] < 0) == (starts[k][0] < 0) and len(group) <= n_variants
                        and len(group) * n * (width - col) <= max_tokens
                        and len(group) * n * width <= self.kv_tokens_factor * max_tokens
                        and cost(group) <= cost(chunks[-1]) + cost([k])):
                    chunks[-1] = group
                    continue
            chunks.append([k])
        return chunks

    @staticmethod
    def _position_masks(
        target: torch.Tensor,
        target_mask: torch.Tensor,
        source: torch.Tensor,
        source_mask: torch.Tensor,
        components: Sequence[Component],
        tail: int = 0,
    ) -> tuple[dict[int | None, torch.Tensor], int]:
        """Boolean [n, T] masks of the slots each position patches: every prompt slot (None) or the slot at
        offset -k from the end of the prompt, where both sides have a token and the pair has already diverged
        (earlier slots hold identical activations in both runs, so patching them is a no-op); and the first
        column where any pair differs (every activation before it is the same in both runs). The last ``tail``
        columns (branch tokens) are never patched."""
        real = target_mask.bool() & source_mask.bool()
        if tail:
            real[:, -tail:] = False
        differs = (target != source) | (target_mask != source_mask)
        width = real.shape[1] - tail
        diverged = differs.cumsum(1) > 0  # True from the pair's first differing slot on
        out: dict[int | None, torch.Tensor] = {None: real & diverged}
        for position in {c.position for c in components if c.position is not None}:
            m = torch.zeros_like(real)
            if -position <= width:
                col = width + position
                m[:, col] = real[:, col] & diverged[:, col]
            out[position] = m
        columns = diverged.any(0).nonzero()
        return out, int(columns[0]) if len(columns) else width - 1

    def _patch_transforms(
        self,
        chunk: Sequence[Component],
        source_cache: dict[Point, torch.Tensor],
        masks: dict[int | None, torch.Tensor],
        col0: int = 0,
        cache_col: int = 0,
    ) -> dict[Point, Callable[[torch.Tensor], torch.Tensor]]:
        """Hook transforms writing each variant's source activation into its rows of a batch whose columns
        start at ``col0`` (rows are variant-major: variant * n_pairs + pair). ``source_cache`` holds columns
        from ``cache_col`` on; the masks are False before it."""
        return self._set_transforms(list(enumerate(chunk)), len(chunk), source_cache, masks, col0, cache_col)

    def _set_transforms(
        self,
        entries: Sequence[tuple[int, Component]],
        n_variants: int,
        source_cache: dict[Point, torch.Tensor],
        masks: dict[int | None, torch.Tensor],
        col0: int = 0,
        cache_col: int = 0,
    ) -> dict[Point, Callable[[torch.Tensor], torch.Tensor]]:
        """:meth:`_patch_transforms` for ``(variant, component)`` entries: a variant may patch several components
        together (a joint patch)."""
        by_point: dict[Point, list[tuple[int, Component]]] = {}
        for v, component in entries:
            by_point.setdefault(component.point, []).append((v, component))
        head_dim = self.head_dim
        n, width = masks[None].shape
        prompt = width - len(self.tail)  # offsets count from the end of the prompt
        low = max(col0, cache_col)  # first column that may be written

        def make(point: Point, entries: list[tuple[int, Component]]) -> Callable[[torch.Tensor], torch.Tensor]:
            src = source_cache[point].view(n, width - cache_col, -1)[:, low - cache_col :]

            def fn(x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                # [variants, n, columns from low, d] (a view also where OPT's fc2 flattens tokens)
                view = x.view(n_variants, n, width - col0, -1)[:, :, low - col0 :]
                for v, component in entries:
                    m = masks[component.position][:, low:].to(x.device)
                    cols, dims = slice(None), slice(None)
                    if component.position is not None:
                        col = prompt + component.position - low
                        if col < 0:
                            continue  # before the first difference: nothing to write
                        cols = slice(col, col + 1)
                    if component.head is not None:
                        dims = slice(component.head * head_dim, (component.head + 1) * head_dim)
                    target = view[v, :, cols, dims]
                    view[v, :, cols, dims] = torch.where(m[:, cols, None], src[:, cols, dims], target)
                return x

            return fn

        return {point: make(point, entries) for point, entries in by_point.items()}


def noise_floor(
    engine: PatchEngine, batch: PairBatch, components: Sequence[Component], direction: str, baseline: torch.Tensor
) -> torch.Tensor:
    """Numerical noise floor of each component's patch, shape [len(components)]: the largest deviation over
    pairs of its identity patch (:meth:`PatchEngine.identity_patch`) from ``baseline``, the clean scores of the
    target side (benign for ``denoise``, harmful for ``noise``) as the caller computes them, one per pair.

    The identity patch must leave every score unchanged; what it moves is rounding of the engine's computation
    path (layer skip, prefix reuse, batched variants, dtype), so effects below the floor cannot be told from
    rounding. Non-finite scores give a non-finite floor."""
    baseline = torch.as_tensor(baseline).detach().float().cpu().reshape(-1)
    if baseline.numel() != batch.n_pairs:
        raise ValueError(f"baseline has {baseline.numel()} scores for {batch.n_pairs} pairs")
    identity = engine.identity_patch(batch, components, direction)
    return (identity - baseline[None, :]).abs().amax(dim=1)
