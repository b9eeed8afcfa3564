"""The refusal direction (Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

The difference in means between harmful and benign residual-stream activations, taken at the input of some layer
(``blocks.{L}.hook_resid_pre``) and at one of the last prompt positions, is a direction whose **ablation** (projecting
it out of everything written to the residual stream) removes refusal and whose **addition** (adding the un-normalised
difference at that layer's input, every position) induces it. This module measures that, audit-only: every change is a
forward hook held in memory for one call (the patch engine's transforms), and no weight is ever modified or written.

1. :func:`candidate_directions`: the difference in means at every layer and each of the last k prompt positions.
2. :func:`select_direction`: the calibration pairs split (seeded) into a fit part (the means) and a selection part,
   where candidates' ablation, addition and KL are measured and Arditi's filters applied (:data:`MAX_KL`,
   :data:`MIN_ADDITION_CHANGE`, :data:`LATE_LAYER_FRACTION`); the survivor whose ablation lowers the harmful refusal
   score most is chosen. To keep it cheap every candidate is first ranked on a few harmful prompts
   (:data:`RANK_PAIRS`) and only the best ranked are measured in full (:data:`CHECK_BATCH` at a time, until one
   survives); the prompts' shared opening (chat template, system prompt) runs once per candidate.
3. :func:`direction_effects`: on the scored pairs, the direction's share of the gap under ablation (necessity) and
   under addition (sufficiency), and the KL divergence ablation costs on benign prompts, with pair-bootstrap CIs;
   :func:`variant_effects` the same for several directions at once (e.g. every layer's candidate, for a picture).
4. :func:`refusal_after_ablation`: greedy replies under ablation, refusal rates with Wilson intervals;
   :func:`refusal_after_addition` the refusal that adding the direction induces (over-refusal on benign prompts).
5. :func:`direction_cosines`: agreement with patching, the cosine between the direction and each component's mean
   harmful − benign difference at the last prompt position, with pair-bootstrap CIs.

Scores are the audit's: every function takes the audit's engine (``pipeline.behaviour.tree_engine``: the opening
tree's score, its branch tokens appended after every prompt) and token ids formatted as the audit formats them
(``pipeline.inputs.format_prompt``). Ablation and addition act on every column of a forward, the branch-token columns
included, as they would on generated tokens. Positions count from the end of each prompt, whatever the left padding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats as sps

from refusal_eval.errors import ConfigError, DataError, MetricError
from refusal_eval.metrics import is_refusal
from refusal_eval.patching.components import Component
from refusal_eval.patching.exact import PatchEngine, with_tail
from refusal_eval.pipeline.inputs import common_suffix
from refusal_eval.replies import _cache_key, _cache_of, greedy_replies, left_pad, shared_prefix_length
from refusal_eval.stats import mean_interval, share_intervals, wilson_interval

# Arditi et al.'s choices, fixed before any model was looked at with them.
DEFAULT_POSITIONS = 5  # candidate positions: the last 5 prompt tokens (or the shared template suffix, if shorter)
SELECTION_FRACTION = 0.25  # share of the calibration pairs held out to select on (the rest fit the means)
MAX_KL = 0.1  # discard a candidate whose ablation moves benign next-token distributions by more (mean KL, nats)
MIN_ADDITION_CHANGE = 0.0  # discard a candidate whose addition does not raise the benign refusal score above this
LATE_LAYER_FRACTION = 0.2  # discard candidates in the last 20% of layers (too close to the unembedding)
# Our cost cut (not Arditi's): every candidate is ranked by its ablation on the harmful prompts of the first RANK_PAIRS
# selection pairs (all of them when fewer); then CHECK_BATCH candidates at a time, best ranked first, are measured on
# every selection pair and filtered, until one survives; the survivor whose ablation lowers the harmful score most
# on every selection pair is chosen. Late-layer and zero candidates are discarded without being measured.
RANK_PAIRS = 8
CHECK_BATCH = 8
# What ablation projects the direction out of: every layer's input and everything attention and MLPs write.
ABLATED_KINDS = ("resid_pre", "attn_out", "mlp_out")
# Components whose last-position difference :func:`direction_cosines` compares with the direction.
COSINE_KINDS = ("resid_pre", "attn_out", "mlp_out")

Point = tuple[str, int]
Transforms = dict[Point, Callable[[torch.Tensor], torch.Tensor]]
Ids = Sequence[Sequence[int]]


# -- inputs ------------------------------------------------------------------------------------------------------------
def _pad_id(loaded) -> int:
    """The id left padding uses: the tokenizer's pad token (as the audit pads), else its end of sequence, else 0."""
    tok = loaded.tokenizer
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, name, None) if tok is not None else None
        if value is not None:
            return int(value)
    return 0


def _prompts(engine: PatchEngine, seqs: Ids, what: str) -> list[list[int]]:
    """The prompts as lists of ints; DataError for no prompts, an empty prompt or an id outside the vocabulary."""
    if len(seqs) == 0:
        raise DataError(f"no {what} prompts given")
    vocab = engine.loaded.model.get_input_embeddings().weight.shape[0]
    out = []
    for i, seq in enumerate(seqs):
        ids = [int(t) for t in seq]
        if not ids:
            raise DataError(f"{what} prompt {i} has no tokens")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise DataError(f"{what} prompt {i} holds token id {bad[0]}, outside the model's {vocab} embeddings")
        out.append(ids)
    return out


def _paired(engine: PatchEngine, harmful_ids: Ids, benign_ids: Ids, minimum: int) -> tuple[list, list]:
    """Both sides' prompts, checked; DataError unless both sides hold the same number of pairs, at least ``minimum``."""
    harmful, benign = _prompts(engine, harmful_ids, "harmful"), _prompts(engine, benign_ids, "benign")
    if len(harmful) != len(benign):
        raise DataError(f"{len(harmful)} harmful and {len(benign)} benign prompts: the sides must pair up")
    if len(harmful) < minimum:
        raise DataError(f"{len(harmful)} pair(s): at least {minimum} are needed")
    return harmful, benign


def default_positions(prompts: Ids) -> int:
    """Candidate positions per layer: :data:`DEFAULT_POSITIONS`, or fewer where the prompts share a shorter template
    suffix (the post-instruction tokens every prompt ends with); at least the last prompt token."""
    shared = min((common_suffix(prompts[0], p) for p in prompts), default=0)
    return max(1, min(DEFAULT_POSITIONS, shared))


def _groups(engine: PatchEngine, seqs: list[list[int]]) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(rows, ids, mask) batches of the prompts, left-padded as the audit pads them, the engine's tail (branch tokens)
    appended, each within the engine's row budget."""
    size = engine.rows(max(map(len, seqs)) + len(engine.tail))
    pad = _pad_id(engine.loaded)
    for start in range(0, len(seqs), size):
        part = seqs[start : start + size]
        ids, mask = with_tail(*left_pad(part, pad), engine.tail)
        yield slice(start, start + len(part)), ids, mask


def _finite(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values``, or MetricError naming what came out NaN or infinite."""
    if not torch.isfinite(values).all():
        raise MetricError(f"{what} came out NaN or infinite")
    return values


# -- activations and steering ------------------------------------------------------------------------------------------
def _record(engine: PatchEngine, ids: torch.Tensor, mask: torch.Tensor, points: Sequence[Point],
            k: int) -> torch.Tensor:
    """Activations [rows, len(points), k, d] (float32, CPU) at the hook points, at the last ``k`` prompt columns of one
    left-padded batch (the tail's branch columns follow them), from one clean forward."""
    n, width = ids.shape
    end = width - len(engine.tail)
    seen: dict[Point, torch.Tensor] = {}

    def recorder(point: Point) -> Callable[[torch.Tensor], torch.Tensor]:
        """A hook transform keeping the last k prompt columns of ``point``'s activation."""

        def fn(x: torch.Tensor) -> torch.Tensor:
            """Record the activation, pass it on unchanged."""
            # view: OPT's fc2 sees tokens flattened to [n * T, d]
            seen[point] = x.detach().view(n, width, -1)[:, end - k : end].float().cpu()
            return x

        return fn

    engine.scores(ids, mask, {p: recorder(p) for p in points})
    return torch.stack([seen[p] for p in points], 1)


@torch.inference_mode()
def last_positions(engine: PatchEngine, seqs: Ids, points: Sequence[Point], k: int = 1) -> torch.Tensor:
    """Activations [n, len(points), k, d] (float32, CPU) at the hook points ``(kind, layer)``, at each prompt's last
    ``k`` tokens (index j: offset j − k from the end of the prompt), from clean forwards of left-padded batches."""
    prompts = _prompts(engine, seqs, "input")
    if k < 1 or k > min(map(len, prompts)):
        raise DataError(f"{k} position(s) from the end of the prompt: the shortest prompt has "
                        f"{min(map(len, prompts))} tokens")
    out: torch.Tensor | None = None
    for rows, ids, mask in _groups(engine, prompts):
        block = _record(engine, ids, mask, points, k)
        if out is None:
            out = torch.empty(len(prompts), len(points), k, block.shape[-1])
        out[rows] = block
    return out


def _ablation(directions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x minus its component along each variant's unit direction ([V, d]; rows variant-major), in float32."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        """The activation with each variant's direction projected out."""
        r = directions.to(x.device)
        y = x.float().reshape(r.shape[0], -1, r.shape[1])
        y = y - torch.einsum("vnd,vd->vn", y, r)[..., None] * r[:, None, :]
        return y.reshape(x.shape).to(x.dtype)

    return fn


def _addition(vectors: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x plus each variant's vector ([V, d]; rows variant-major) at every position, in float32."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        """The activation with each variant's vector added."""
        v = vectors.to(x.device)
        y = x.float().reshape(v.shape[0], -1, v.shape[1]) + v[:, None, :]
        return y.reshape(x.shape).to(x.dtype)

    return fn


def ablation_transforms(n_layers: int, directions: torch.Tensor) -> Transforms:
    """Hook transforms of directional ablation: each variant's unit direction ([V, d]) projected out of every layer's
    residual input and every attention and MLP output, so the stream stays orthogonal to it everywhere."""
    fn = _ablation(directions.float())
    return {(kind, layer): fn for layer in range(n_layers) for kind in ABLATED_KINDS}


def addition_transforms(vectors: torch.Tensor) -> Transforms:
    """Hook transforms of activation addition: ``vectors[v, layer]`` ([V, layers, d]) added to layer ``layer``'s
    residual input at every position of variant v's rows (layers where every vector is zero are not hooked)."""
    vectors = vectors.float()
    return {("resid_pre", layer): _addition(vectors[:, layer]) for layer in range(vectors.shape[1])
            if bool(vectors[:, layer].any())}


@contextmanager
def ablated(engine: PatchEngine, direction: torch.Tensor) -> Iterator[None]:
    """While open, every forward of the engine's model (``generate`` included) runs with ``direction`` ([d], made
    unit length here) ablated; the hooks are removed on exit, whatever happens."""
    norm = float(direction.float().norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise DataError("a zero or non-finite direction cannot be ablated")
    # the engine's own hook mechanism (as attribution.py uses it): the same modules the patching hooks
    with engine._hooks(ablation_transforms(engine.loaded.n_layers, direction.float()[None] / norm)):
        yield


@contextmanager
def added(engine: PatchEngine, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """While open, every forward of the engine's model (``generate`` included) runs with ``vector`` ([d], as given)
    added to layer ``layer``'s residual input at every position; the hooks are removed on exit, whatever happens."""
    n_layers = engine.loaded.n_layers
    if not 0 <= layer < n_layers:
        raise DataError(f"layer {layer} is not one of the model's {n_layers} layers")
    if not torch.isfinite(vector.float()).all():
        raise DataError("a non-finite vector cannot be added")
    vectors = torch.zeros(1, n_layers, vector.shape[-1])
    vectors[0, layer] = vector.float()
    with engine._hooks(addition_transforms(vectors)):
        yield


def _probe(engine: PatchEngine) -> PatchEngine:
    """An engine on the same model and tail whose rows read [refusal score, log-probabilities of the next token at
    the last prompt position] from one forward."""
    score_fn = engine.score_fn

    def fn(logits: torch.Tensor) -> torch.Tensor:
        """[rows, 1 + vocab]: the refusal score, then the next-token log-probabilities."""
        first = logits if logits.dim() == 2 else logits[:, 0]
        return torch.cat([score_fn(logits).float()[:, None], torch.log_softmax(first.float(), dim=-1)], dim=-1)

    return PatchEngine(engine.loaded, fn, tail=engine.tail)


@torch.inference_mode()
def _clean(engine: PatchEngine, probe: PatchEngine, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean refusal scores [n] and next-token log-probabilities [n, vocab] of the prompts."""
    scores, logp = [], []
    for _, ids, mask in _groups(engine, seqs):
        out = probe.scores(ids, mask)
        scores.append(out[:, 0])
        logp.append(out[:, 1:])
    return _finite(torch.cat(scores), "a clean refusal score"), torch.cat(logp)


def _prefixed_scores(probe: PatchEngine, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                     transforms: Transforms, c: int) -> torch.Tensor:
    """``probe.scores(prefix + ids, ...)`` of the rows repeated for ``c`` variants (variant-major), the shared prefix
    run once per variant under its steering and its keys and values reused by that variant's rows: the rows' own
    columns follow the cached prefix, left-padded after it (position ids count real tokens only)."""
    model, dev, m, p = probe.model, probe.device, ids.shape[0], prefix.shape[0]
    rows_ids, rows_mask = ids.repeat(c, 1).to(dev), mask.repeat(c, 1).to(dev)
    with probe._hooks(transforms):
        cache = _cache_of(model(input_ids=prefix.to(dev)[None].expand(c, -1), use_cache=True))
        cache.batch_repeat_interleave(m)
        full_mask = torch.cat([torch.ones(c * m, p, dtype=rows_mask.dtype, device=dev), rows_mask], 1)
        position_ids = p + (rows_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=rows_ids, attention_mask=full_mask, position_ids=position_ids, logits_to_keep=1 +
                    len(probe.tail), use_cache=True, **{_cache_key(model): cache})
        return probe.score_fn(probe._score_logits(out.logits)).float().cpu()


def _prefix_plan(engine: PatchEngine, probe: PatchEngine, seqs: list[list[int]]):
    """(shared prefix ids or None, the prompts without it): the prefix is reused only where it is at least 2 tokens,
    the score reads no more than one branch token (more need a 4D mask) and, checked here on the first rows, the
    cached forward reproduces the full one's score and next-token distribution (a model whose positions do not follow
    its position ids falls back to full forwards)."""
    n = shared_prefix_length(seqs)
    if n < 2 or len(engine.tail) > 1:
        return None, seqs
    prefix, rest = torch.tensor(seqs[0][:n]), [s[n:] for s in seqs]
    _, ids, mask = next(_groups(engine, seqs[:8]))
    _, ids_r, mask_r = next(_groups(engine, rest[:8]))
    with torch.inference_mode():
        full = probe.scores(ids, mask)
        try:
            cached = _prefixed_scores(probe, prefix, ids_r, mask_r, {}, 1)
        except (TypeError, ValueError, RuntimeError, AttributeError):  # a forward that takes no cache this way
            return None, seqs
    # within the dtype's rounding, as replies.py accepts its prefix cache for generation
    tolerance = max(1e-3, 8 * torch.finfo(next(engine.model.parameters()).dtype).eps)
    close = (float((full[:, 0] - cached[:, 0]).abs().max()) <= tolerance * max(1.0, float(full[:, 0].abs().max()))
             and float((full[:, 1:].exp() - cached[:, 1:].exp()).abs().max()) <= tolerance)
    return (prefix, rest) if close else (None, seqs)


@torch.inference_mode()
def _steered(engine: PatchEngine, probe: PatchEngine, seqs: list[list[int]], params: torch.Tensor,
             make: Callable[[torch.Tensor], Transforms], reference: torch.Tensor | None = None):
    """Refusal scores [V, n] of the prompts under each variant's steering (``make(params[chunk])``: transforms for
    variant-major rows), and KL(reference ‖ steered) [V, n] of the next-token distribution where ``reference``
    (clean log-probabilities [n, vocab]) is given (else NaN). Variants share forwards within the row budget; the
    prompts' shared prefix (the chat template's opening) runs once per variant (:func:`_prefix_plan`)."""
    n_var, n = params.shape[0], len(seqs)
    scores, kl = torch.empty(n_var, n), torch.full((n_var, n), float("nan"))
    prefix, rest = _prefix_plan(engine, probe, seqs)
    for rows, ids, mask in _groups(engine, rest):
        m = ids.shape[0]
        per = max(1, engine.rows(ids.shape[1] + (0 if prefix is None else prefix.shape[0])) // m)
        for v0 in range(0, n_var, per):
            chunk = params[v0 : v0 + per]
            c = chunk.shape[0]
            if prefix is None:
                out = probe.scores(ids.repeat(c, 1), mask.repeat(c, 1), make(chunk))
            else:
                out = _prefixed_scores(probe, prefix, ids, mask, make(chunk), c)
            out = out.view(c, m, -1)
            scores[v0 : v0 + c, rows] = out[..., 0]
            if reference is not None:
                ref = reference[rows][None]
                p = ref.exp()  # tokens of probability 0 add nothing (and would make 0 * inf)
                terms = torch.where(p > 0, p * (ref - out[..., 1:]), torch.zeros_like(p))
                kl[v0 : v0 + c, rows] = terms.sum(-1).clamp_min(0.0)
    return _finite(scores, "a steered refusal score"), kl


# -- 1. candidates -----------------------------------------------------------------------------------------------------
def candidate_directions(engine: PatchEngine, harmful_ids: Ids, benign_ids: Ids, k: int | None = None) -> torch.Tensor:
    """Difference in means, harmful minus benign, of the residual stream entering every layer at each of the last
    ``k`` prompt positions: [layers, k, d] (float32), index j being offset j − k from the end of each prompt (−1 = the
    last prompt token). ``k`` None: :func:`default_positions` over both sides' prompts. The sides need not pair up."""
    harmful, benign = _prompts(engine, harmful_ids, "harmful"), _prompts(engine, benign_ids, "benign")
    if k is None:
        k = default_positions(harmful + benign)
    if k < 1:
        raise ConfigError(f"k = {k}: at least one candidate position is needed")
    points = [("resid_pre", layer) for layer in range(engine.loaded.n_layers)]
    mean_h = last_positions(engine, harmful, points, k).double().mean(0)
    mean_b = last_positions(engine, benign, points, k).double().mean(0)
    return (mean_h - mean_b).float()


# -- 2. selection ------------------------------------------------------------------------------------------------------
@dataclass
class Direction:
    """A refusal direction: the difference in means at ``layer``'s input and ``position`` (offset from the end of the
    prompt), un-normalised (``vector`` [d], float32)."""

    layer: int
    position: int
    vector: torch.Tensor

    @property
    def unit(self) -> torch.Tensor:
        """The direction at unit length; DataError for a zero or non-finite vector."""
        norm = float(self.vector.float().norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise DataError(f"the direction at layer {self.layer}, position {self.position} has length {norm}")
        return self.vector.float() / norm


@dataclass
class CandidateScore:
    """One candidate's numbers on the selection part of the calibration pairs (means over its prompts; NaN where
    not measured: a late-layer or zero candidate, or, beyond its rank, one never checked against the filters)."""

    layer: int
    position: int  # offset from the end of the prompt (-1: the last prompt token)
    norm: float  # length of the difference in means
    ranked_change: float  # change of the harmful refusal score under ablation on the ranking pairs' prompts
    ablated_harmful: float  # mean refusal score of the harmful prompts under directional ablation (survivors only)
    ablation_change: float  # ablated_harmful minus their clean mean (negative: ablation lowers refusal)
    addition_change: float  # mean change of the benign refusal score under addition at ``layer``
    kl: float  # mean KL(clean || ablated) of the benign prompts' next-token distribution (nats)
    discarded: list[str] = field(default_factory=list)  # why the filters discard it
    checked: bool = True  # measured on every selection pair and filtered (False: discarded unmeasured, or not reached)

    @property
    def survives(self) -> bool:
        """Whether it was checked and no filter discards it."""
        return self.checked and not self.discarded

    @property
    def verdict(self) -> list[str]:
        """The filters' reasons, or why it was never checked (empty: it survives)."""
        if self.discarded or self.checked:
            return self.discarded
        return ["not checked against the filters: ranked below a candidate that survives them"]


@dataclass
class DirectionSelection:
    """Every candidate (layer-major, positions in order) with its numbers, the chosen one (None when no candidate
    survives the filters) and why, and how the calibration pairs were split."""

    candidates: list[CandidateScore]
    chosen: CandidateScore | None
    direction: Direction | None
    reason: str
    n_layers: int
    positions: list[int]
    fit_pairs: list[int]  # indices into the calibration pairs given
    selection_pairs: list[int]
    rank_pairs: list[int]  # the selection pairs whose harmful prompts rank every candidate (the first RANK_PAIRS)
    clean_harmful: float  # mean clean refusal score of the selection part's harmful prompts
    clean_benign: float
    seed: int
    diffs: torch.Tensor | None = None  # every candidate's difference in means [layers, positions, d] (fit part)

    def grid(self, name: str) -> np.ndarray:
        """One number of every candidate as a [layers, positions] array (e.g. ``'ablation_change'``), for a
        per-layer picture."""
        return np.array([getattr(c, name) for c in self.candidates], dtype=np.float64).reshape(
            self.n_layers, len(self.positions))


def split_pairs(n: int, seed: int, fraction: float = SELECTION_FRACTION) -> tuple[list[int], list[int]]:
    """(fit, selection) indices of ``n`` calibration pairs, a seeded random split with ``fraction`` of them (at least
    2, leaving at least 2) held out for selection."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"selection fraction {fraction}: must lie strictly between 0 and 1")
    if n < 4:
        raise DataError(f"{n} calibration pair(s): at least 4 are needed (2 to fit the means, 2 to select on)")
    held = min(n - 2, max(2, round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[held:]), sorted(int(i) for i in order[:held])


def late_layer_start(n_layers: int) -> int:
    """The first layer in the last :data:`LATE_LAYER_FRACTION` of layers (at least the last layer)."""
    return n_layers - max(1, math.ceil(round(LATE_LAYER_FRACTION * n_layers, 9)))


def _discard_reasons(layer: int, norm: float, kl: float, addition: float, late: int,
                     checked: bool = True) -> list[str]:
    """Why Arditi's filters discard a candidate (NaN numbers fail their filter; an unchecked candidate is judged on its
    layer and length only)."""
    reasons = []
    if norm == 0.0:
        reasons.append("the difference in means is zero (both sides' activations are equal there)")
    if layer >= late:
        reasons.append(f"layer {layer} is in the last {LATE_LAYER_FRACTION:.0%} of layers (from {late})")
    if not checked:
        return reasons
    if not kl <= MAX_KL:
        reasons.append(f"ablation costs benign prompts a KL of {kl:.3g} > {MAX_KL}")
    if not addition > MIN_ADDITION_CHANGE:
        reasons.append(f"addition changes the benign refusal score by {addition:.3g}, not above {MIN_ADDITION_CHANGE}")
    return reasons


def _score_candidates(engine: PatchEngine, diffs: torch.Tensor, harmful: list, benign: list):
    """(candidates without filters applied, clean harmful mean, clean benign mean): every live candidate's ablation on
    the ranking prompts (the first :data:`RANK_PAIRS` harmful ones), then, best ranked first, :data:`CHECK_BATCH`
    candidates at a time measured on every selection prompt until one survives the filters: KL and addition on the
    benign prompts, and the harmful prompts' score under ablation for the survivors (NaN for the rest, which the
    filters discard whatever it is); candidates are batched as variants."""
    n_layers, k, d = diffs.shape
    vectors = diffs.reshape(n_layers * k, d).float()
    norms = vectors.norm(dim=-1)
    units = torch.where(norms[:, None] > 0, vectors / norms.clamp_min(1e-30)[:, None], torch.zeros_like(vectors))
    probe = _probe(engine)
    clean, logp = _clean(engine, probe, harmful + benign)
    nh, late = len(harmful), late_layer_start(n_layers)
    clean_h, clean_b = float(clean[:nh].double().mean()), float(clean[nh:].double().mean())
    live = [v for v in range(n_layers * k) if v // k < late and float(norms[v]) > 0]
    ranked = torch.full((n_layers * k,), float("nan"), dtype=torch.float64)
    r = min(RANK_PAIRS, nh)
    if live:
        scores, _ = _steered(engine, probe, harmful[:r], units[live], lambda u: ablation_transforms(n_layers, u))
        ranked[live] = scores.double().mean(1) - clean[:r].double().mean()
    order = sorted(live, key=lambda v: (float(ranked[v]), v))
    measured: dict[int, tuple[float, float, float]] = {}  # candidate: (ablated harmful, addition change, KL)
    for start in range(0, len(order), CHECK_BATCH):
        batch = order[start : start + CHECK_BATCH]
        # the filters first (benign prompts: KL under ablation, addition); the harmful side only for survivors
        _, kl = _steered(engine, probe, benign, units[batch], lambda u: ablation_transforms(n_layers, u), logp[nh:])
        adds = torch.zeros(len(batch), n_layers, d)
        adds[torch.arange(len(batch)), torch.tensor(batch) // k] = vectors[batch]
        added, _ = _steered(engine, probe, benign, adds, addition_transforms)
        for i, v in enumerate(batch):
            measured[v] = (float("nan"), float((added[i] - clean[nh:]).double().mean()), float(kl[i].double().mean()))
        passed = [v for v in batch if not _discard_reasons(v // k, 1.0, measured[v][2], measured[v][1], late)]
        if passed:
            ablated, _ = _steered(engine, probe, harmful, units[passed], lambda u: ablation_transforms(n_layers, u))
            for i, v in enumerate(passed):
                measured[v] = (float(ablated[i].double().mean()), *measured[v][1:])
            break
    out = []
    nan = float("nan")
    for v in range(n_layers * k):
        ablated_h, addition, kl_v = measured.get(v, (nan, nan, nan))
        out.append(CandidateScore(
            layer=v // k, position=v % k - k, norm=float(norms[v]), ranked_change=float(ranked[v]),
            ablated_harmful=ablated_h, ablation_change=ablated_h - clean_h, addition_change=addition, kl=kl_v,
            checked=v in measured))
    return out, clean_h, clean_b


def _choose(candidates: list[CandidateScore], n_layers: int) -> tuple[CandidateScore | None, str]:
    """The surviving candidate whose ablation lowers the harmful refusal score most on every selection prompt (first
    in layer-major order on a tie), and the reason in words."""
    survivors = [c for c in candidates if c.survives]
    checked = [c for c in candidates if c.checked]
    if not survivors:
        late = sum(c.layer >= late_layer_start(n_layers) for c in candidates)
        kl = sum(not c.kl <= MAX_KL for c in checked)
        add = sum(not c.addition_change > MIN_ADDITION_CHANGE for c in checked)
        return None, (f"no candidate survives the filters: of {len(candidates)}, {late} lie in the last "
                      f"{LATE_LAYER_FRACTION:.0%} of layers; of the {len(checked)} others measured, {kl} cost a KL "
                      f"above {MAX_KL} and {add} do not raise the benign refusal score by addition (a candidate may "
                      "fail several)")
    best = min(survivors, key=lambda c: c.ablated_harmful)
    words = (f"layer {best.layer}, position {best.position}: of the {len(checked)} best-ranked candidates measured on "
             f"every selection pair, {len(survivors)} survive the filters and its ablation changes the harmful refusal "
             f"score most ({best.ablation_change:+.3g}; KL {best.kl:.3g}, addition {best.addition_change:+.3g})")
    if best.ablation_change >= 0:
        words += "; but no surviving candidate's ablation lowers the harmful refusal score"
    return best, words


def select_direction(engine: PatchEngine, harmful_ids: Ids, benign_ids: Ids, seed: int = 0, k: int | None = None,
                     fraction: float = SELECTION_FRACTION) -> DirectionSelection:
    """Arditi et al.'s selection on calibration pairs (never the scored ones): the means fitted on a seeded part of the
    pairs, the (layer, position) candidates measured on the rest (:class:`CandidateScore`; ranked first, see
    :data:`RANK_PAIRS`), candidates discarded whose ablation costs a KL above :data:`MAX_KL`, whose addition does not
    raise the benign refusal score, or whose layer lies in the last :data:`LATE_LAYER_FRACTION` of layers, and the
    survivor whose ablation lowers the harmful refusal score most chosen."""
    harmful, benign = _paired(engine, harmful_ids, benign_ids, 4)
    fit, held = split_pairs(len(harmful), seed, fraction)
    if k is None:
        k = default_positions(harmful + benign)
    diffs = candidate_directions(engine, [harmful[i] for i in fit], [benign[i] for i in fit], k)
    n_layers = diffs.shape[0]
    candidates, clean_h, clean_b = _score_candidates(engine, diffs, [harmful[i] for i in held],
                                                     [benign[i] for i in held])
    late = late_layer_start(n_layers)
    for c in candidates:
        c.discarded = _discard_reasons(c.layer, c.norm, c.kl, c.addition_change, late, c.checked)
    chosen, reason = _choose(candidates, n_layers)
    direction = None if chosen is None else Direction(chosen.layer, chosen.position,
                                                      diffs[chosen.layer, chosen.position + k].clone())
    return DirectionSelection(candidates, chosen, direction, reason, n_layers, list(range(-k, 0)), fit, held,
                              held[:RANK_PAIRS], clean_h, clean_b, seed, diffs)


# -- 3. effects on the scored pairs ------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """A point estimate with its confidence interval."""

    estimate: float
    low: float
    high: float


@dataclass
class DirectionEffects:
    """What the direction does on the scored pairs: shares of the gap (ratio of sums) under ablation on the harmful
    side (necessity: Σ(m_h − m_h ablated) / Σ gap) and under addition on the benign side (sufficiency: Σ(m_b added −
    m_b) / Σ gap), the mean KL(clean ‖ ablated) on benign prompts, pair-bootstrap CIs, and every pair's numbers."""

    layer: int
    position: int
    necessity: Estimate
    sufficiency: Estimate
    kl: Estimate
    m_h: np.ndarray
    m_b: np.ndarray
    m_h_ablated: np.ndarray
    m_b_ablated: np.ndarray
    m_b_added: np.ndarray
    kl_benign: np.ndarray
    gaps: np.ndarray
    level: float
    n_boot: int
    method: str
    seed: int


def _gaps(gaps: Sequence[float] | None, clean_gaps: np.ndarray) -> np.ndarray:
    """The denominators of the shares: the audit's ``gaps`` where given (checked), else this call's clean gaps."""
    values = clean_gaps if gaps is None else np.asarray(gaps, dtype=np.float64).reshape(-1)
    if values.shape != clean_gaps.shape:
        raise DataError(f"{values.size} gaps for {clean_gaps.size} pairs")
    if not np.isfinite(values).all():
        raise DataError("a gap is NaN or infinite")
    if values.sum() == 0.0:
        raise DataError("the gaps sum to 0: a share of the gap is undefined")
    return values


def direction_effects(engine: PatchEngine, direction: Direction, harmful_ids: Ids, benign_ids: Ids,
                      gaps: Sequence[float] | None = None, level: float = 0.95, n_boot: int = 2000,
                      method: str = "BCa", seed: int = 0) -> DirectionEffects:
    """The direction's necessity and sufficiency shares of the gap and its KL cost on the scored pairs, with
    pair-bootstrap CIs (``stats.share_intervals``, ``stats.mean_interval``, seeded). ``gaps``: the audit's m_h − m_b
    per pair (None: from this call's clean scores, computed the same way as the steered ones)."""
    harmful, benign = _paired(engine, harmful_ids, benign_ids, 2)
    if not 0.5 < level < 1.0:
        raise ConfigError(f"confidence level {level}: must lie between 0.5 and 1")
    unit, n, n_layers = direction.unit, len(harmful), engine.loaded.n_layers
    if not 0 <= direction.layer < n_layers:
        raise DataError(f"the direction's layer {direction.layer} is not one of the model's {n_layers} layers")
    probe = _probe(engine)
    clean, logp = _clean(engine, probe, harmful + benign)
    ablated, kl = _steered(engine, probe, harmful + benign, unit[None],
                           lambda u: ablation_transforms(n_layers, u), logp)
    adds = torch.zeros(1, n_layers, unit.shape[0])
    adds[0, direction.layer] = direction.vector.float()
    added, _ = _steered(engine, probe, benign, adds, addition_transforms)
    m_h, m_b = clean[:n].double().numpy(), clean[n:].double().numpy()
    m_h_abl, m_b_abl = ablated[0, :n].double().numpy(), ablated[0, n:].double().numpy()
    m_b_add, kl_b = added[0].double().numpy(), kl[0, n:].double().numpy()
    used = _gaps(gaps, m_h - m_b)
    shares = share_intervals(np.stack([m_h - m_h_abl, m_b_add - m_b]), used, level, n_boot, method, seed)
    kl_ci = mean_interval(kl_b, level, n_boot, method, seed)

    def est(i: int) -> Estimate:
        """Share i of ``shares`` as an :class:`Estimate`."""
        return Estimate(float(shares.estimate[i]), float(shares.low[i]), float(shares.high[i]))

    return DirectionEffects(direction.layer, direction.position, est(0), est(1),
                            Estimate(float(kl_ci.estimate), float(kl_ci.low), float(kl_ci.high)), m_h, m_b, m_h_abl,
                            m_b_abl, m_b_add, kl_b, used, level, n_boot, method, seed)


@dataclass
class VariantEffects:
    """Several directions' effects on the same pairs, each direction alone (a variant): per pair, the clean scores
    ``m_h``, ``m_b`` [n], and per variant [V, n] the scores under ablation of its unit direction everywhere and under
    addition of its vector at its layer's input, and the benign KL(clean ‖ ablated); with the gaps given, each
    variant's necessity and sufficiency shares with pair-bootstrap CIs (None for a zero vector: nothing to ablate)."""

    layers: list[int]
    norms: list[float]
    m_h: np.ndarray
    m_b: np.ndarray
    m_h_ablated: np.ndarray
    m_b_ablated: np.ndarray
    m_b_added: np.ndarray
    kl_benign: np.ndarray
    necessity: list[Estimate | None]
    sufficiency: list[Estimate | None]
    kl: list[Estimate]


def _estimates(iv, rows: list[int], size: int) -> list[Estimate | None]:
    """``size`` entries: row ``rows[i]`` of the interval ``iv`` at index ``rows[i]``, None elsewhere."""
    out: list[Estimate | None] = [None] * size
    for i, v in enumerate(rows):
        out[v] = Estimate(float(iv.estimate[i]), float(iv.low[i]), float(iv.high[i]))
    return out


def variant_effects(engine: PatchEngine, layers: Sequence[int], vectors: torch.Tensor, harmful_ids: Ids,
                    benign_ids: Ids, gaps: Sequence[float] | None = None, level: float = 0.95, n_boot: int = 2000,
                    method: str = "BCa", seed: int = 0, own_gaps: bool = False) -> VariantEffects:
    """:func:`direction_effects` for several directions at once (``vectors`` [V, d], un-normalised; variant v added at
    layer ``layers[v]``), batched as the selection batches its candidates: e.g. the candidate of every layer at one
    position, for a per-layer picture. Shares only where ``gaps`` (m_h − m_b per pair, the denominators) are given,
    or with ``own_gaps`` of these pairs' own clean gaps."""
    harmful, benign = _paired(engine, harmful_ids, benign_ids, 2)
    n_layers, vectors = engine.loaded.n_layers, vectors.float()
    if vectors.dim() != 2 or vectors.shape[0] != len(layers) or not len(layers):
        raise DataError(f"{len(layers)} layer(s) for vectors of shape {list(vectors.shape)}: give one [d] row each")
    if any(not 0 <= layer < n_layers for layer in layers):
        raise DataError(f"layers {list(layers)}: the model has {n_layers}")
    norms = vectors.norm(dim=-1)
    units = torch.where(norms[:, None] > 0, vectors / norms.clamp_min(1e-30)[:, None], torch.zeros_like(vectors))
    probe = _probe(engine)
    clean, logp = _clean(engine, probe, harmful + benign)
    ablated_scores, kl = _steered(engine, probe, harmful + benign, units,
                                  lambda u: ablation_transforms(n_layers, u), logp)
    adds = torch.zeros(len(layers), n_layers, vectors.shape[1])
    adds[torch.arange(len(layers)), torch.tensor(list(layers))] = vectors
    added_scores, _ = _steered(engine, probe, benign, adds, addition_transforms)
    n = len(harmful)
    m_h, m_b = clean[:n].double().numpy(), clean[n:].double().numpy()
    abl_h, abl_b = ablated_scores[:, :n].double().numpy(), ablated_scores[:, n:].double().numpy()
    add_b, kl_b = added_scores.double().numpy(), kl[:, n:].double().numpy()
    live = [v for v in range(len(layers)) if float(norms[v]) > 0]
    necessity: list[Estimate | None] = [None] * len(layers)
    sufficiency = list(necessity)
    if (gaps is not None or own_gaps) and live:
        used = _gaps(gaps, m_h - m_b)
        necessity = _estimates(share_intervals(m_h - abl_h[live], used, level, n_boot, method, seed), live,
                               len(layers))
        sufficiency = _estimates(share_intervals(add_b[live] - m_b, used, level, n_boot, method, seed), live,
                                 len(layers))
    kl_ci = [mean_interval(row, level, n_boot, method, seed) for row in kl_b]
    return VariantEffects(list(layers), [float(x) for x in norms], m_h, m_b, abl_h, abl_b, add_b, kl_b, necessity,
                          sufficiency, [Estimate(float(c.estimate), float(c.low), float(c.high)) for c in kl_ci])


# -- 4. refusal after ablation -----------------------------------------------------------------------------------------
@dataclass
class Rate:
    """How many greedy replies were refusals, of how many, with the Wilson interval at ``level``."""

    refused: int
    total: int
    low: float
    high: float
    level: float

    @property
    def rate(self) -> float:
        """The refusal rate (NaN for no replies)."""
        return self.refused / self.total if self.total else float("nan")


@dataclass
class AblatedRefusal:
    """Refusal rates of greedy replies under directional ablation (harmful prompts; benign ones where given), and the
    replies (text up to the matcher's verdict where replies stop once decided)."""

    harmful: Rate
    benign: Rate | None
    replies_harmful: list[str]
    replies_benign: list[str]


def refusal_after_ablation(engine: PatchEngine, direction: Direction | torch.Tensor, harmful_ids: Ids,
                           benign_ids: Ids = (), max_new_tokens: int = 24, level: float = 0.95,
                           until_decided: bool = True) -> AblatedRefusal:
    """Greedy replies (``replies.greedy_replies``, as the audit generates them) with the direction ablated at every
    step, judged by ``metrics.is_refusal``: refusal rates with Wilson intervals (``stats.wilson_interval``)."""
    harmful = _prompts(engine, harmful_ids, "harmful")
    benign = _prompts(engine, benign_ids, "benign") if len(benign_ids) else []
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens}: at least 1 reply token is needed")
    unit = direction.unit if isinstance(direction, Direction) else direction
    with ablated(engine, unit):
        rate_h, replies_h = _judged(engine, harmful, max_new_tokens, level, until_decided)
        rate_b, replies_b = _judged(engine, benign, max_new_tokens, level, until_decided) if benign else (None, [])
    return AblatedRefusal(rate_h, rate_b, replies_h, replies_b)


def _judged(engine: PatchEngine, prompts: list[list[int]], max_new_tokens: int, level: float,
            until_decided: bool) -> tuple[Rate, list[str]]:
    """Greedy replies to the prompts (under whatever hooks are open) and how many are refusals, with the Wilson
    interval."""
    replies = greedy_replies(engine.loaded, prompts, max_new_tokens, progress=False, until_decided=until_decided)[1]
    refused = sum(is_refusal(r) for r in replies)
    return Rate(refused, len(replies), *wilson_interval(refused, len(replies), level), level), replies


def refusal_after_addition(engine: PatchEngine, direction: Direction, prompts: Ids, max_new_tokens: int = 24,
                           level: float = 0.95, until_decided: bool = True) -> tuple[Rate, list[str]]:
    """Greedy replies with the direction's vector added at its layer's input (every position, every generated step),
    judged by ``metrics.is_refusal``: the refusal the direction induces (on benign prompts: over-refusal), with the
    Wilson interval, and the replies."""
    seqs = _prompts(engine, prompts, "input")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens}: at least 1 reply token is needed")
    with added(engine, direction.layer, direction.vector):
        return _judged(engine, seqs, max_new_tokens, level, until_decided)


# -- 5. agreement with patching ----------------------------------------------------------------------------------------
@dataclass
class DirectionCosine:
    """Cosine between the unit direction and one component's mean harmful − benign difference at the last prompt
    position (NaN where that difference is zero on every pair: nothing to compare), with a pair-bootstrap CI."""

    component: str  # component id, e.g. blocks.2.hook_mlp_out@-1
    kind: str
    layer: int
    cosine: float
    low: float
    high: float


def _cosine_intervals(diffs: np.ndarray, unit: np.ndarray, level: float, n_boot: int, method: str,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosines of the mean of ``diffs`` [n, C, d] over pairs with ``unit`` [d], and their pair-bootstrap interval
    (``scipy.stats.bootstrap`` on pair indices; percentile where BCa is undefined)."""
    n, n_comp, d = diffs.shape
    flat = diffs.reshape(n, n_comp * d)

    def cosines(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        """Cosines [C, *resamples] of the pairs drawn by ``idx`` [*resamples, m] (counts, so repeats weigh)."""
        idx = np.asarray(idx)
        lead = idx.shape[:-1]
        rows = idx.reshape(-1, idx.shape[-1])
        weights = np.zeros((rows.shape[0], n))
        np.add.at(weights, (np.arange(rows.shape[0])[:, None], rows), 1.0)
        means = (weights @ flat).reshape(*lead, n_comp, d) / rows.shape[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.moveaxis((means @ unit) / np.linalg.norm(means, axis=-1), -1, 0)

    estimate = np.atleast_1d(cosines(np.arange(n)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (a zero mean) surface as NaN
        result = sps.bootstrap((np.arange(n),), cosines, n_resamples=n_boot, vectorized=True, confidence_level=level,
                               method=method, rng=np.random.default_rng(seed),
                               batch=max(1, min(n_boot, (1 << 22) // max(1, n_comp * d + n))))
    low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
    bad = ~(np.isfinite(low) & np.isfinite(high)) & np.isfinite(estimate)
    if bad.any():
        dist = np.atleast_2d(result.bootstrap_distribution)[bad]
        low[bad], high[bad] = np.nanquantile(dist, (1 - level) / 2, axis=-1), np.nanquantile(dist, (1 + level) / 2, -1)
    defined = np.isfinite(estimate)
    low = np.where(defined, np.minimum(low, estimate), np.nan)
    return estimate, low, np.where(defined, np.maximum(high, estimate), np.nan)


def direction_cosines(engine: PatchEngine, direction: Direction | torch.Tensor, harmful_ids: Ids, benign_ids: Ids,
                      kinds: Sequence[str] = COSINE_KINDS, level: float = 0.95, n_boot: int = 2000,
                      method: str = "BCa", seed: int = 0) -> list[DirectionCosine]:
    """For each component of ``kinds`` at every layer (attention output, MLP output, residual stream entering the
    layer), the cosine between the unit direction and the mean over pairs of its harmful − benign difference at the
    last prompt position (what patching it at -1 moves), with a pair-bootstrap CI; in kind-major, layer order."""
    harmful, benign = _paired(engine, harmful_ids, benign_ids, 2)
    if not kinds or set(kinds) - set(COSINE_KINDS):
        raise ConfigError(f"kinds {list(kinds)}: choose among {', '.join(COSINE_KINDS)}")
    unit = (direction.unit if isinstance(direction, Direction) else direction.float() / direction.float().norm())
    if not torch.isfinite(unit).all():
        raise DataError("a zero or non-finite direction has no cosine")
    points = [(kind, layer) for kind in kinds for layer in range(engine.loaded.n_layers)]
    diffs = (last_positions(engine, harmful, points)[:, :, 0].double()
             - last_positions(engine, benign, points)[:, :, 0].double()).numpy()
    estimate, low, high = _cosine_intervals(diffs, unit.double().numpy(), level, n_boot, method, seed)
    return [DirectionCosine(Component(kind, layer, position=-1).id, kind, layer, float(estimate[i]), float(low[i]),
                            float(high[i])) for i, (kind, layer) in enumerate(points)]
