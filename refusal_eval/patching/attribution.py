"""Attribution patching: a first-order estimate of every cell's patch effect from one backward pass.

For a patch replacing activation a_target by a_source at some slots, the change of the refusal score is
approximated by the gradient of the score at the target run dotted with the activation difference:

    m(target <- c) - m(target)  ~=  sum over patched slots of (a_source - a_target) . dm/da (at target)

One clean forward of the source side, one forward + backward of the target side give the estimate for
every component of every grid at once. Estimates are labelled approximate in reports; exact patching
(``PatchEngine.patch``) is the reference they are checked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusal_eval.patching.components import Component
from refusal_eval.patching.exact import PairBatch, PatchEngine, Point, _PrefixCache


def attribute(engine: PatchEngine, batch: PairBatch, components: Sequence[Component], direction: str = "denoise"):
    """Estimated patched score of the target side, shape [len(components), n_pairs] (like ``patch``)."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not '{direction}'")
    if not batch.equal_lengths and any(c.position is None for c in components):
        raise ValueError("an all-positions patch needs pairs of equal token length on both sides")
    points = sorted({c.point for c in components})
    result = torch.empty(len(components), batch.n_pairs)
    for rows in engine._pair_chunks(batch.n_pairs, engine.rows(batch.width)):
        sub = batch.select(rows)
        target, target_mask = sub.side(harmful=direction == "noise")
        source, source_mask = sub.side(harmful=direction == "denoise")
        masks, first_diff = engine._position_masks(target, target_mask, source, source_mask, components, sub.tail)
        shape = masks[None].shape
        inputs: list = []
        kv = _PrefixCache()
        base, acts, grads = _target_gradients(engine, target, target_mask, points, inputs, kv)
        source_cache = _source_activations(engine, sub, source, source_mask, points, inputs, kv, first_diff, acts)
        # Per point, each slot's first-order contribution: [n, T] (or [n, T, heads] at hook_z).
        slots = {}
        for point in points:
            prod = (source_cache[point].view(*shape, -1) - acts[point].view(*shape, -1)) * grads[point].view(*shape, -1)
            slots[point] = (prod.view(*shape, -1, engine.head_dim) if point[0] == "head" else prod).sum(-1)
        values = torch.stack([
            slots[c.point][..., c.head] if c.head is not None else slots[c.point] for c in components
        ]).to(base.dtype)  # on the model's device
        # the masks come from the batch's token ids, which stay on the CPU
        stacked = torch.stack([masks[c.position] for c in components]).to(values.device, base.dtype)  # [C, n, T]
        result[:, rows] = base[None, :] + (values * stacked).sum(-1).cpu()
    return result


def _source_activations(engine: PatchEngine, batch: PairBatch, ids, mask, points, inputs, kv, first_diff: int, acts):
    """Source activations [n, T, d] at the points.

    Both sides agree on every column before ``first_diff``, so where the pairs have equal lengths (same
    masks and positions on both sides) the source run is the target run's keys/values there plus a replay
    of the later columns from the source's embeddings (:meth:`PatchEngine.scores_from_layer`): ~40% of a
    forward for chat-templated pairs. Checked once per engine against a full source forward; elsewhere (or
    where the check fails, or for the embeddings themselves) the source side runs in full.
    """
    n, width = ids.shape
    usable = (batch.equal_lengths and 0 < first_diff < width and len(kv.recorded) == len(inputs) > 0
              and all(point[0] != "embed" for point in points) and engine._attribution_prefix is not False)
    if usable:
        try:
            store: dict[Point, torch.Tensor] = {}

            def recorder(point: Point):
                def fn(x: torch.Tensor) -> torch.Tensor:
                    store[point] = x.detach().view(n, width - first_diff, -1).clone()
                    return x

                return fn

            hidden = engine.embedded(ids, mask)
            replay = [((hidden,), inputs[0][1]), *inputs[1:]]
            prefix = _PrefixCache(kv.recorded)
            scores = engine.scores_from_layer(0, replay, 1, {p: recorder(p) for p in points}, first_diff, prefix)
            if engine._attribution_prefix is None:
                engine._attribution_prefix = bool(torch.allclose(scores, engine.scores(ids, mask), atol=1e-4,
                                                                 rtol=1e-4))
            if engine._attribution_prefix:
                return {p: torch.cat([acts[p].view(n, width, -1)[:, :first_diff], store[p]], 1) for p in points}
        except Exception:  # layers that cannot be replayed this way (see PatchEngine._check_replay)
            engine._attribution_prefix = False
    return engine.cache(ids, mask, points)


def _target_gradients(engine: PatchEngine, ids: torch.Tensor, mask: torch.Tensor, points: Sequence[Point],
                      inputs: list, kv: _PrefixCache):
    """(scores, activations, d(sum of scores)/d activation) of the target side at the given points; also
    records every decoder layer's inputs into ``inputs`` and every attention layer's keys/values into ``kv``."""
    acts: dict[Point, torch.Tensor] = {}

    def keep(point: Point):
        def fn(x: torch.Tensor) -> torch.Tensor:
            x.retain_grad()
            acts[point] = x
            return x

        return fn

    def start_graph(_module, _args, output):
        # Parameters stay frozen; the graph starts at the embeddings so every activation gets a gradient.
        return output.detach().requires_grad_(True)

    model = engine.model
    handle = model.get_input_embeddings().register_forward_hook(start_graph)
    # Gradients with respect to activations only: no weight gradients, about half the backward pass.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), engine._hooks({p: keep(p) for p in points}), engine.recording_inputs(inputs, kv):
            scores = engine.score_fn(engine.forward_logits(ids, mask)).float()
            scores.sum().backward()
    finally:
        handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    grads = {p: a.grad.detach() for p, a in acts.items()}
    return scores.detach().cpu(), {p: a.detach() for p, a in acts.items()}, grads
