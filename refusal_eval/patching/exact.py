"""Exact activation patching, batched: many patched variants of many pairs in one forward pass.

Definition (one forward per cell): run the *target* side of every pair with one component's activation
replaced by its value from the *source* side, and read the refusal score at the last prompt token.
Denoising: target = benign, source = harmful. Noising: target = harmful, source = benign.

Sides are left-padded, so position offsets count from the end of the prompt (-1 = last prompt token) and
mean the same slot on both sides. Pairs of equal token length are fully aligned: any position, or all of
them at once, can be patched. Pairs of unequal length are *right-aligned*: only offsets inside both sides
(in practice the shared chat-template suffix) can be patched, and an all-positions patch is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_eval.models.loading import LoadedModel
from refusal_eval.patching.components import Component

Point = tuple[str, int]


@dataclass
class PairBatch:
    """Tokenised pairs, each side left-padded to a common width with its own attention mask."""

    harmful_ids: torch.Tensor  # [N, T]
    benign_ids: torch.Tensor  # [N, T]
    harmful_mask: torch.Tensor  # [N, T], 1 on real tokens
    benign_mask: torch.Tensor  # [N, T]
    pair_ids: list[str]

    @property
    def n_pairs(self) -> int:
        return self.harmful_ids.shape[0]

    @property
    def width(self) -> int:
        return self.harmful_ids.shape[1]

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
            self.harmful_mask[rows, start:], self.benign_mask[rows, start:], self.pair_ids[rows],
        )


def build_pair_batch(
    tokenized: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, pair_ids: Sequence[str],
    allow_unequal: bool = False,
) -> PairBatch:
    """Left-pad (harmful, benign) token lists into one PairBatch (right-aligned if lengths differ)."""
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
    return PairBatch(ids[0], ids[1], masks[0], masks[1], list(pair_ids))


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


class PatchEngine:
    """Runs clean and patched forward passes of one model and returns refusal scores."""

    def __init__(
        self,
        loaded: LoadedModel,
        score_fn: Callable[[torch.Tensor], torch.Tensor],
        max_rows: int = 256,
        progress: bool = False,
        layer_skip: bool = True,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.adapter = loaded.adapter
        self.score_fn = score_fn
        self.max_rows = max(1, int(max_rows))
        self.progress = progress
        self.device = next(self.model.parameters()).device
        self.head_dim = self.adapter.head_dim(self.model.config)
        self._layer_skip: bool | None = None if layer_skip else False

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
        """Refusal score at the last position for each row of a left-padded batch (float32, on CPU)."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._hooks(transforms or {}):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1, use_cache=False
            )
        return self.score_fn(out.logits[:, -1, :]).float().cpu()

    # -- layer skip ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def layer_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[tuple, dict]]:
        """The (args, kwargs) every decoder layer receives in a clean forward of the batch (for replay)."""
        inputs: list[tuple[tuple, dict]] = []
        handles = [
            layer.register_forward_pre_hook(
                lambda _m, args, kwargs: inputs.append((_detach(args), _detach(kwargs))), with_kwargs=True
            )
            for layer in self.adapter.layers(self.model)
        ]
        try:
            self.scores(ids, mask)
        finally:
            for handle in handles:
                handle.remove()
        return inputs

    @torch.inference_mode()
    def scores_from_layer(
        self,
        start: int,
        inputs: list[tuple[tuple, dict]],
        repeat: int,
        transforms: dict[Point, Callable[[torch.Tensor], torch.Tensor]],
    ) -> torch.Tensor:
        """Scores of a forward that starts at decoder layer ``start`` from the recorded clean inputs.

        Layers before ``start`` are untouched by any patch at ``start`` or later, so their output is the
        recorded clean residual stream; replaying the remaining layers with their recorded arguments (masks,
        rotary embeddings) tiled ``repeat`` times gives the same numbers as a full forward, at a fraction of
        the cost. The tail (final norm, unembedding of the last position) is checked against the full model
        by :meth:`_check_layer_skip` before this path is used.
        """
        layers = self.adapter.layers(self.model)
        args, kwargs = inputs[start]
        hidden = args[0] if args else kwargs["hidden_states"]
        n = hidden.shape[0]
        hidden = _tile(hidden, repeat, n)
        with self._hooks(transforms):
            for index in range(start, len(layers)):
                args, kwargs = inputs[index]
                rest_args = _tile(args[1:], repeat, n)
                kw = {k: _tile(v, repeat, n) for k, v in kwargs.items() if k != "hidden_states"}
                out = layers[index](hidden, *rest_args, **kw)
                hidden = out[0] if isinstance(out, tuple) else out
        last = self.adapter.final_norm(self.model)(hidden[:, -1:, :])
        logits = self.model.get_output_embeddings()(last)[:, -1, :]
        return self.score_fn(logits).float().cpu()

    def _check_layer_skip(self, ids: torch.Tensor, mask: torch.Tensor, inputs: list[tuple[tuple, dict]]) -> bool:
        """Use layer skip only where replaying layers reproduces the full forward (else fall back)."""
        if self._layer_skip is None:
            try:
                replay = self.scores_from_layer(0, inputs, 1, {})
                self._layer_skip = bool(torch.allclose(replay, self.scores(ids, mask), atol=1e-4, rtol=1e-4))
            except Exception:  # an architecture whose layers cannot be replayed this way: full forwards
                self._layer_skip = False
        return self._layer_skip

    @torch.inference_mode()
    def cache(self, ids: torch.Tensor, mask: torch.Tensor, points: Sequence[Point]) -> dict[Point, torch.Tensor]:
        """Activations at the given hook points for a batch (one clean forward)."""
        store: dict[Point, torch.Tensor] = {}

        def recorder(point: Point) -> Callable[[torch.Tensor], torch.Tensor]:
            def fn(x: torch.Tensor) -> torch.Tensor:
                store[point] = x.detach().clone()
                return x

            return fn

        self.scores(ids, mask, {p: recorder(p) for p in points})
        return store

    def baseline(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpatched refusal scores (harmful, benign) for every pair."""
        harmful, benign = [], []
        for rows in self._pair_chunks(batch.n_pairs):
            sub = batch.select(rows)
            harmful.append(self.scores(*sub.side(harmful=True)))
            benign.append(self.scores(*sub.side(harmful=False)))
        return torch.cat(harmful), torch.cat(benign)

    def _pair_chunks(self, n: int) -> list[slice]:
        return [slice(i, min(n, i + self.max_rows)) for i in range(0, n, self.max_rows)]

    def patch(self, batch: PairBatch, components: Sequence[Component], direction: str = "denoise") -> torch.Tensor:
        """Patched refusal score of the target side, shape [len(components), n_pairs]."""
        if direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', not '{direction}'")
        if not batch.equal_lengths and any(c.position is None for c in components):
            raise ValueError("an all-positions patch needs pairs of equal token length on both sides")
        result = torch.empty(len(components), batch.n_pairs)
        points = sorted({c.point for c in components})
        pair_chunks = self._pair_chunks(batch.n_pairs)
        n_variants = max(1, self.max_rows // min(batch.n_pairs, self.max_rows))
        bar = tqdm(total=len(components) * len(pair_chunks), desc="patching", unit="component",
                   disable=not self.progress, leave=False)
        for rows in pair_chunks:
            sub = batch.select(rows)
            target, target_mask = sub.side(harmful=direction == "noise")
            source, source_mask = sub.side(harmful=direction == "denoise")
            masks = self._position_masks(target, target_mask, source, source_mask, components)
            # A patch that touches no slot (every chosen position precedes the pair's first differing token,
            # where both runs are identical, or lies outside the prompt) leaves the target run unchanged.
            active = [k for k, c in enumerate(components) if masks[c.position].any()]
            idle = [k for k in range(len(components)) if not masks[components[k].position].any()]
            if idle:
                result[idle, rows] = self.scores(target, target_mask)
                bar.update(len(idle))
            if not active:
                continue
            source_cache = self.cache(source, source_mask, points)
            inputs = self.layer_inputs(target, target_mask)
            skip = self._check_layer_skip(target, target_mask, inputs)
            # Sorting by layer lets a chunk start its forward at its earliest patched layer.
            active.sort(key=lambda k: (components[k].kind == "embed", components[k].layer))
            for start in range(0, len(active), n_variants):
                ks = active[start : start + n_variants]
                chunk = [components[k] for k in ks]
                transforms = self._patch_transforms(chunk, source_cache, masks)
                v = len(chunk)
                if skip and all(c.kind != "embed" for c in chunk):
                    first_layer = min(c.layer for c in chunk)
                    values = self.scores_from_layer(first_layer, inputs, v, transforms).view(v, -1)
                else:
                    values = self.scores(target.repeat(v, 1), target_mask.repeat(v, 1), transforms).view(v, -1)
                result[ks, rows] = values
                bar.update(v)
        bar.close()
        return result

    @staticmethod
    def _position_masks(
        target: torch.Tensor,
        target_mask: torch.Tensor,
        source: torch.Tensor,
        source_mask: torch.Tensor,
        components: Sequence[Component],
    ) -> dict[int | None, torch.Tensor]:
        """Boolean [n, T] masks of the slots each position patches: every real token (None) or the slot at
        offset -k, where both sides have a token and the pair has already diverged (earlier slots hold
        identical activations in both runs, so patching them is a no-op)."""
        real = target_mask.bool() & source_mask.bool()
        differs = (target != source) | (target_mask != source_mask)
        width = real.shape[1]
        diverged = differs.cumsum(1) > 0  # True from the pair's first differing slot on
        out: dict[int | None, torch.Tensor] = {None: real}
        for position in {c.position for c in components if c.position is not None}:
            m = torch.zeros_like(real)
            if -position <= width:
                col = width + position
                m[:, col] = real[:, col] & diverged[:, col]
            out[position] = m
        return out

    def _patch_transforms(
        self,
        chunk: Sequence[Component],
        source_cache: dict[Point, torch.Tensor],
        masks: dict[int | None, torch.Tensor],
    ) -> dict[Point, Callable[[torch.Tensor], torch.Tensor]]:
        by_point: dict[Point, list[tuple[int, Component]]] = {}
        for v, component in enumerate(chunk):
            by_point.setdefault(component.point, []).append((v, component))
        n_variants = len(chunk)
        n_heads = self.loaded.n_heads
        head_dim = self.head_dim

        def make(point: Point, entries: list[tuple[int, Component]]) -> Callable[[torch.Tensor], torch.Tensor]:
            src = source_cache[point].view(*masks[None].shape, -1)  # [n, T, d] also where tokens come flat (OPT fc2)

            def fn(x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                n, width = src.shape[0], src.shape[1]
                view = x.view(n_variants, n, width, -1)
                for v, component in entries:
                    m = masks[component.position].to(x.device)[..., None]
                    if component.head is None:
                        view[v] = torch.where(m, src, view[v])
                    else:
                        h = slice(component.head * head_dim, (component.head + 1) * head_dim)
                        view[v, :, :, h] = torch.where(m, src[:, :, h], view[v, :, :, h])
                return x

            return fn

        assert n_heads > 0
        return {point: make(point, entries) for point, entries in by_point.items()}
