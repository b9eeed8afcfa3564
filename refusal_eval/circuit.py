"""The minimal refusal circuit: a small set of heads and MLPs whose *joint* patch recovers most of the gap.

Single shares do not add up (components overlap, interact and cancel), so every claim here is a joint patch
(:meth:`PatchEngine.patch_sets`), never a sum:

1. **Nodes**: every attention head (``hook_z``) and MLP output, at all positions (``--nodes all``) or at the last
   position (``last``). The residual stream and whole attention outputs are left out: they contain the nodes
   (a residual-stream node would be a one-node "circuit" by construction).
2. **Ranking**: the audit's own shares when the report has every node in the searched direction, else one
   exact single-node patch each.
3. **Greedy**: the ranking's top-k prefixes are patched together, k = 1 .. 8 one by one, then doubling, then
   bisection, for the smallest k that passes the rule; then **pruning** drops each member (least ranked first)
   whose removal still passes. The rule is the circuit's: its joint share's pair-bootstrap **CI lower bound** clears
   ``target`` (``ci_low``). The set chosen by the point estimate alone (``estimate``: the joint share reaches the
   target) is searched first, from the same prefixes, and reported beside it; where no set's CI clears the target,
   that set is the circuit and the report says its CI does not clear.
4. **Checks**: the circuit's joint share with its pair-bootstrap CI, its size as a fraction of the nodes, the
   **complement** (every other node patched together, the circuit left clean) and all nodes together.
5. **Edges**: path patching between circuit nodes: the sender's patch reaches the receiver only along the
   residual stream, every other head and MLP frozen at the target run's values; the receiver's output from that
   run is then patched alone into a clean target run. A node's edge to the score is its direct effect (every
   later node frozen).

Both directions can be searched: denoising (benign run, harmful activations patched in: what suffices to
produce the refusal) and noising (harmful run, benign activations: what is necessary); the two circuits may
differ, and the report says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from refusal_eval.errors import ConfigError
from refusal_eval.patching.components import Component
from refusal_eval.patching.exact import PairBatch, PatchEngine, Point
from refusal_eval.stats import ratio_of_sums, share_intervals

CIRCUIT_SCHEMA_VERSION = "1.1"
NODE_KINDS = ("head", "mlp_out")
SCORE = "score"
INPUT = "input"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ShareCI(_Model):
    share: float
    ci_low: float
    ci_high: float


class CircuitNode(_Model):
    id: str
    kind: str
    layer: int
    head: int | None
    position: int | None
    single_share: float = Field(description="the node's share patched alone (the ranking)")


RULES = {"ci_low": "its joint share's CI lower bound clears the target",
         "estimate": "its joint share's point estimate reaches the target"}


class CircuitStep(_Model):
    action: Literal["prefix", "remove", "add"] = Field(
        description="prefix: the ranking's top `size` nodes patched together (`id` is the last of them); remove: "
                    "the set without `id`; add: a prefix, as schema 1.0 wrote it")
    id: str
    size: int = Field(description="nodes in the set patched")
    joint_share: float = Field(description="share of the gap recovered by patching the set together")
    ci_low: float | None = Field(default=None, description="the joint share's CI lower bound (rule ci_low)")
    rule: Literal["ci_low", "estimate"] = Field(default="estimate", description="the search this patch served")


class PointCircuit(_Model):
    """The smallest set found whose joint share's point estimate reaches the target."""

    nodes: list[str]
    size: int
    joint: ShareCI


class CircuitEdge(_Model):
    sender: str = Field(description="node id, or 'input' is never a sender with a weight")
    receiver: str = Field(description="node id, or 'score' for the sender's direct effect on the refusal score")
    share: float = Field(description="path-patching effect as a share of the gap")
    ci_low: float
    ci_high: float
    fw_low: float = Field(description="family-wise interval over all edges of this circuit")
    fw_high: float
    significant: bool = Field(description="the family-wise interval excludes 0")


class DirectionCircuit(_Model):
    direction: Literal["denoise", "noise"]
    target: float
    found: bool = Field(description="the joint share of the circuit (point estimate) reaches the target")
    clears_target: bool = Field(description="the joint share's whole CI lies at or above the target")
    rule: Literal["ci_low", "estimate"] = Field(
        default="estimate", description="what chose `nodes`: ci_low, the smallest set found whose joint share's CI "
        "lower bound clears the target; estimate, whose point estimate reaches it (no set's CI clears it, or schema "
        "1.0)")
    point_estimate: PointCircuit | None = Field(
        default=None, description="the smallest set found by the point estimate alone, beside a ci_low circuit")
    nodes: list[CircuitNode]
    size: int
    family_size: int = Field(description="nodes the search could choose from")
    fraction: float = Field(description="size / family_size")
    joint: ShareCI | None = Field(description="the circuit patched together (None: empty circuit)")
    complement: ShareCI = Field(description="every other node patched together, the circuit's nodes computing freely "
                                "(nodes downstream of the circuit relay its signal: not a test of other routes)")
    knockout: ShareCI | None = Field(description="the circuit patched in the noising direction (harmful run, its "
                                     "nodes given benign values): 1 - knockout of the gap survives without it")
    all_nodes: ShareCI = Field(description="every node patched together")
    ranking: str
    steps: list[CircuitStep]
    edges: list[CircuitEdge]
    edges_note: str | None = None
    patched_sets: int = Field(description="joint patches run for the search (each a forward over every pair)")
    seconds: float


class CircuitReport(_Model):
    schema_version: str = CIRCUIT_SCHEMA_VERSION
    model: str
    weights_sha256: str
    report: str = Field(description="the audit report the search started from")
    dataset_sha256: str
    n_pairs: int
    nodes: str = Field(description="the node family")
    level: float
    n_resamples: int
    seed: int
    circuits: list[DirectionCircuit]
    differences: str | None = Field(description="how the denoising and noising circuits differ, in words")
    audit_seconds: float = Field(description="the audit's own runtime, for scale")
    seconds: float
    command: str
    created: str


# -- search -----------------------------------------------------------------------------------------------------------
def check_family(family: str) -> None:
    if family not in ("all", "last"):
        raise ConfigError(f"--nodes {family}: choose 'all' (every position patched together) or 'last'")


def circuit_nodes(n_layers: int, n_heads: int, family: str) -> list[Component]:
    """Every head and MLP output of the model at all positions (``all``) or the last position (``last``)."""
    check_family(family)
    position = None if family == "all" else -1
    nodes = [Component("head", layer, head, position) for layer in range(n_layers) for head in range(n_heads)]
    nodes += [Component("mlp_out", layer, None, position) for layer in range(n_layers)]
    return sorted(nodes, key=order_key)


def order_key(c: Component) -> tuple[int, int, int]:
    """Computation order inside the model: layer, then attention heads before the MLP."""
    return c.layer, 0 if c.kind == "head" else 1, -1 if c.head is None else c.head


@dataclass
class Search:
    """What one direction's search needs: the engine, the pairs and their clean scores."""

    engine: PatchEngine
    batch: PairBatch
    m_h: np.ndarray
    m_b: np.ndarray
    direction: str
    patched_sets: int = 0
    bar: object = None  # a tqdm bar counting joint patches and path-patched edges, or None

    @property
    def gaps(self) -> np.ndarray:
        return self.m_h - self.m_b

    def effects(self, sets: Sequence[Sequence[Component]]) -> np.ndarray:
        """[len(sets), n_pairs] score moves of the joint patches (denoise: patched − benign; noise: harmful −
        patched)."""
        if not sets:
            return np.zeros((0, self.batch.n_pairs))
        scores = self.engine.patch_sets(self.batch, sets, self.direction)
        self.patched_sets += len(sets)
        if self.bar is not None:
            self.bar.update(len(sets))
        return self._moves(scores)

    def single_shares(self, nodes: Sequence[Component]) -> np.ndarray:
        """Each node's share patched alone (the engine's batched single-component path)."""
        return ratio_of_sums(self._moves(self.engine.patch(self.batch, list(nodes), self.direction)), self.gaps)

    def _moves(self, scores: torch.Tensor) -> np.ndarray:
        """Patched target scores [k, n_pairs] -> the effects the shares count (toward the source side)."""
        scores = scores.numpy().astype(np.float64)
        return scores - self.m_b if self.direction == "denoise" else self.m_h - scores

    def opposite(self) -> Search:
        """The same pairs, patched in the other direction."""
        return Search(self.engine, self.batch, self.m_h, self.m_b, "noise" if self.direction == "denoise" else
                      "denoise")

    def shares(self, sets: Sequence[Sequence[Component]]) -> np.ndarray:
        return ratio_of_sums(self.effects(sets), self.gaps)


def _interval(effects: np.ndarray, gaps: np.ndarray, level: float, n_boot: int, seed: int) -> list[ShareCI]:
    iv = share_intervals(effects, gaps, level, n_boot, "BCa", seed)
    return [ShareCI(share=float(e), ci_low=float(lo), ci_high=float(hi))
            for e, lo, hi in zip(iv.estimate, iv.low, iv.high, strict=True)]


class _Sets:
    """Joint patches of node sets for the search, each run once, with their shares and CI lower bounds."""

    def __init__(self, search: Search, order: list[Component], level: float, n_boot: int, seed: int):
        self.search, self.order = search, order
        self.level, self.n_boot, self.seed = level, n_boot, seed
        self.rows: dict[frozenset[str], np.ndarray] = {}
        self.lows: dict[frozenset[str], float] = {}
        self.steps: list[CircuitStep] = []

    def key(self, nodes: Sequence[Component]) -> frozenset[str]:
        return frozenset(c.id for c in nodes)

    def row(self, nodes: Sequence[Component]) -> np.ndarray:
        return self.rows[self.key(nodes)]

    def run(self, sets: list[list[Component]]) -> None:
        missing = list({self.key(s): s for s in sets if self.key(s) not in self.rows}.values())
        if not missing:
            return
        for nodes, row in zip(missing, self.search.effects(missing), strict=True):
            self.rows[self.key(nodes)] = row

    def share(self, nodes: Sequence[Component]) -> float:
        return float(ratio_of_sums(self.row(nodes)[None], self.search.gaps)[0])

    def ci_low(self, nodes: Sequence[Component]) -> float:
        key = self.key(nodes)
        if key not in self.lows:
            self.lows[key] = _interval(self.row(nodes)[None], self.search.gaps, self.level, self.n_boot,
                                       self.seed)[0].ci_low
        return self.lows[key]

    def passes(self, nodes: Sequence[Component], rule: str, target: float) -> bool:
        return (self.ci_low(nodes) if rule == "ci_low" else self.share(nodes)) >= target

    def record(self, action: str, node: Component, nodes: Sequence[Component], rule: str) -> None:
        self.steps.append(CircuitStep(action=action, id=node.id, size=len(nodes), joint_share=self.share(nodes),
                                      ci_low=self.ci_low(nodes) if rule == "ci_low" else None, rule=rule))

    def prefixes(self, sizes: list[int], tried: set[int], rule: str) -> None:
        sizes = [k for k in sizes if k not in tried]
        self.run([self.order[:k] for k in sizes])
        for k in sizes:
            tried.add(k)
            self.record("prefix", self.order[k - 1], self.order[:k], rule)

    def smallest(self, rule: str, target: float, block: int) -> list[Component] | None:
        """The smallest top-k prefix passing ``rule`` (the first ``block`` one by one, then doubling, then bisection
        between the last prefix tried below it and the first passing), pruned: least-ranked members first, each
        dropped while the set without it still passes."""
        order, tried = self.order, set()
        self.prefixes(list(range(1, min(block, len(order)) + 1)), tried, rule)
        k = block
        while not any(self.passes(order[:j], rule, target) for j in tried) and k < len(order):
            k = min(2 * k, len(order))
            self.prefixes([k], tried, rule)
        reached = sorted(j for j in tried if self.passes(order[:j], rule, target))
        if not reached:
            return None
        low = max((j for j in tried if j < reached[0]), default=0)
        high = reached[0]
        while high - low > 1:
            mid = (low + high) // 2
            self.prefixes([mid], tried, rule)
            low, high = (low, mid) if self.passes(order[:mid], rule, target) else (mid, high)
        chosen = order[:high]
        for member in list(reversed(chosen)):
            if len(chosen) == 1:
                break
            without = [c for c in chosen if c != member]
            self.run([without])
            if self.passes(without, rule, target):
                chosen = without
                self.record("remove", member, without, rule)
        return sorted(chosen, key=order_key)


def search_circuit(search: Search, nodes: list[Component], target: float, prior: dict[str, float] | None = None,
                   level: float = 0.95, n_boot: int = 2000, seed: int = 0, block: int = 8) -> DirectionCircuit:
    """Greedy search then pruning, by the point estimate and then by the CI lower bound (module docstring); every
    joint share is a real joint patch."""
    started = time.perf_counter()
    if prior is not None and all(c.id in prior for c in nodes):
        singles = np.array([prior[c.id] for c in nodes])
        ranking = "the audit report's single-component shares"
    else:
        singles = search.single_shares(nodes)
        ranking = "exact single-node patches in this direction"
    order = [nodes[i] for i in np.argsort(-singles, kind="stable")]
    single_of = {c.id: float(s) for c, s in zip(nodes, singles, strict=True)}
    sets = _Sets(search, order, level, n_boot, seed)
    by_estimate = sets.smallest("estimate", target, block)
    by_ci = sets.smallest("ci_low", target, block) if by_estimate is not None else None
    rule = "ci_low" if by_ci is not None else "estimate"
    circuit = by_ci if by_ci is not None else (by_estimate or [])
    members = set(circuit)
    complement = [c for c in nodes if c not in members]
    point = None
    if by_ci is not None and sets.key(by_ci) != sets.key(by_estimate):
        point = by_estimate
    sets.run([complement, nodes])
    effects = np.vstack([sets.row(s) for s in ([circuit] if circuit else []) + ([point] if point else [])
                         + [complement, nodes]])
    knock_out = bool(circuit) and search.direction == "denoise"  # a noising circuit's joint share is its knock-out
    if knock_out:
        other = search.opposite()
        effects = np.vstack([effects, other.effects([circuit])])
        search.patched_sets += other.patched_sets
    intervals = _interval(effects, search.gaps, level, n_boot, seed)
    knockout = intervals.pop() if knock_out else None
    joint = intervals[0] if circuit else None
    if circuit and knockout is None:
        knockout = joint
    point_estimate = None
    if by_ci is not None:
        point_estimate = PointCircuit(nodes=[c.id for c in by_estimate], size=len(by_estimate),
                                      joint=intervals[1] if point else joint)
    return DirectionCircuit(
        direction=search.direction, target=target, found=bool(circuit),
        clears_target=bool(joint is not None and joint.ci_low >= target), rule=rule, point_estimate=point_estimate,
        nodes=[CircuitNode(id=c.id, kind=c.kind, layer=c.layer, head=c.head, position=c.position,
                           single_share=single_of[c.id]) for c in circuit],
        size=len(circuit), family_size=len(nodes), fraction=len(circuit) / len(nodes), joint=joint,
        complement=intervals[-2], all_nodes=intervals[-1], knockout=knockout, ranking=ranking, steps=sets.steps,
        edges=[], patched_sets=search.patched_sets, seconds=round(time.perf_counter() - started, 2),
    )


# -- path patching ----------------------------------------------------------------------------------------------------
def path_effects(search: Search, circuit: Sequence[Component], n_layers: int) -> tuple[list[tuple[str, str]],
                                                                                      np.ndarray]:
    """Edge effects [edges, n_pairs] between circuit nodes (sender before receiver) and from each node to the
    score, by path patching (module docstring)."""
    engine, batch = search.engine, search.batch
    circuit = sorted(circuit, key=order_key)
    edges = [(s, r) for i, s in enumerate(circuit) for r in circuit[i + 1:] if order_key(s)[:2] < order_key(r)[:2]]
    edges += [(s, None) for s in circuit]
    points: list[Point] = [(kind, layer) for layer in range(n_layers) for kind in NODE_KINDS]
    out = np.zeros((len(edges), batch.n_pairs))
    noise = search.direction == "noise"
    for rows in engine._pair_chunks(batch.n_pairs, max(1, engine.rows(batch.width))):
        sub = batch.select(rows)
        moved = _edge_chunk(engine, sub.side(harmful=noise), sub.side(harmful=not noise), circuit, edges, points,
                            search.bar)
        out[:, rows] = -moved if noise else moved
    names = [(s.id, SCORE if r is None else r.id) for s, r in edges]
    return names, out


def _edge_chunk(engine: PatchEngine, target_side, source_side, circuit, edges, points, bar=None) -> np.ndarray:
    """Score moves [edges, n] of path patching on one chunk of pairs (see :func:`path_effects`)."""
    target, target_mask = target_side
    source, source_mask = source_side
    head_dim = engine.head_dim
    n, width = target.shape
    masks, _ = engine._position_masks(target, target_mask, source, source_mask, list(circuit))
    clean = engine.cache(target, target_mask, points)  # [n, T, d] at every head and MLP point
    patched = engine.cache(source, source_mask, sorted({c.point for c in circuit}))
    clean_score = engine.scores(target, target_mask)

    def overwrite(base: torch.Tensor, node: Component, value: torch.Tensor) -> torch.Tensor:
        """``base`` [n, T, d] with ``value`` written at the node's slots (its columns, its head's dims)."""
        cols, dims = masks[node.position].to(base.device)[:, :, None], slice(None)
        if node.head is not None:
            dims = slice(node.head * head_dim, (node.head + 1) * head_dim)
        base = base.clone()
        base[:, :, dims] = torch.where(cols, value.to(base.device)[:, :, dims], base[:, :, dims])
        return base

    def frozen(point: Point, sender: Component, receiver: Component | None, recorded: dict) -> Callable:
        def fn(x: torch.Tensor) -> torch.Tensor:
            computed = x.view(n, width, -1)
            value = clean[point].to(x.device)
            if receiver is not None and receiver.point == point:  # the receiver computes freely
                value = overwrite(value, receiver, computed)
                recorded["value"] = computed.detach().clone()
            if sender.point == point:  # the sender carries the source run's value
                value = overwrite(value, sender, patched[point])
            return value.reshape(x.shape)

        return fn

    def written(receiver: Component, value: torch.Tensor) -> Callable:
        return lambda x: overwrite(x.view(n, width, -1), receiver, value).reshape(x.shape)

    out = np.zeros((len(edges), n))
    for e, (sender, receiver) in enumerate(edges):
        recorded: dict[str, torch.Tensor] = {}
        final = engine.scores(target, target_mask, {p: frozen(p, sender, receiver, recorded) for p in points})
        if receiver is not None:
            final = engine.scores(target, target_mask, {receiver.point: written(receiver, recorded["value"])})
        out[e] = (final - clean_score).numpy()
        if bar is not None:
            bar.update(1)
    return out


def add_edges(result: DirectionCircuit, search: Search, circuit: Sequence[Component], n_layers: int,
              max_nodes: int, level: float, n_boot: int, seed: int) -> None:
    """Fill ``result.edges`` by path patching (at most ``max_nodes`` circuit nodes, the largest single shares)."""
    if not circuit:
        return
    started = time.perf_counter()
    kept = list(circuit)
    if len(kept) > max_nodes:
        single = {n.id: n.single_share for n in result.nodes}
        kept = sorted(kept, key=lambda c: -single[c.id])[:max_nodes]
        result.edges_note = (f"edges among the {max_nodes} nodes with the largest single shares only "
                             f"(the circuit has {len(circuit)}; raise --max-edge-nodes for all)")
    names, effects = path_effects(search, kept, n_layers)
    iv = share_intervals(effects, search.gaps, level, n_boot, "BCa", seed)
    result.edges = [
        CircuitEdge(sender=s, receiver=r, share=float(e), ci_low=float(lo), ci_high=float(hi), fw_low=float(fl),
                    fw_high=float(fh), significant=bool(fl > 0 or fh < 0))
        for (s, r), e, lo, hi, fl, fh in zip(names, iv.estimate, iv.low, iv.high, iv.fw_low, iv.fw_high, strict=True)
    ]
    result.seconds = round(result.seconds + time.perf_counter() - started, 2)


def differences(circuits: list[DirectionCircuit]) -> str | None:
    """Words on how the denoising and noising circuits differ (None with one direction)."""
    by = {c.direction: c for c in circuits}
    if len(by) < 2:
        return None
    d, n = ({x.id for x in by[k].nodes} for k in ("denoise", "noise"))
    if d == n:
        return "The denoising (sufficient) and noising (necessary) circuits are the same nodes."
    return (f"The denoising (sufficient) and noising (necessary) circuits differ: {len(d & n)} node(s) in both, "
            f"{len(d - n)} only in the denoising circuit ({', '.join(sorted(d - n)) or 'none'}), {len(n - d)} only in "
            f"the noising circuit ({', '.join(sorted(n - d)) or 'none'}).")


def created_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- from a report ----------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """An audited model reloaded with its report's pairs and score: what joint patches need."""

    loaded: object
    engine: PatchEngine
    batch: PairBatch
    ids: list[str]
    m_h: np.ndarray
    m_b: np.ndarray


def prepare(report, report_path: str | Path, model: str | None = None, adapter: str | None = None,
            family: str = "all") -> Prepared:
    """Reload an audited model (``model``/``adapter`` default to the report's; its weights must be the audited ones)
    with the report's pairs, opening tree and score form; ``all`` keeps the pairs of equal token length."""
    from refusal_eval.config import AuditConfig
    from refusal_eval.models.loading import load_model
    from refusal_eval.patching.exact import build_pair_batch
    from refusal_eval.pipeline.behaviour import token_sets_of, tree_engine
    from refusal_eval.pipeline.inputs import format_prompt, load_inputs

    shares_defined = report.gap.separated if report.shares_defined is None else report.shares_defined
    if not shares_defined:
        reason = report.shares_reason or "the gap is not separated from 0"
        raise ConfigError(f"{report_path}: its shares are undefined ({reason}); a circuit that 'recovers' a gap "
                          "that is not there would mean nothing")
    config = AuditConfig.model_validate(report.config)
    update = {k: v for k, v in (("model", model), ("adapter", adapter)) if v is not None}
    config = config.model_copy(update=update)
    inputs = load_inputs(config)
    by_id = {p.id: p for p in inputs.pairs}
    missing = [i for i in report.used_pair_ids if i not in by_id]
    if missing:
        raise ConfigError(f"{report_path}: {len(missing)} of its pairs (e.g. '{missing[0]}') are not in "
                          f"{inputs.dataset_path} any more; rerun the audit")
    check_family(family)
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, adapter=config.adapter,
                        device_map=config.device_map)
    if loaded.weights_sha256() != report.model.weights_sha256:
        raise ConfigError(f"the model loaded from {config.model or 'tiny-refuser'} does not have the weights the "
                          f"report was made with (sha256 {report.model.weights_sha256[:12]}…); pass --model (and "
                          "--adapter) of the audited model")
    tok = loaded.tokenizer
    tokenized = [(format_prompt(tok, by_id[i].harmful), format_prompt(tok, by_id[i].benign))
                 for i in report.used_pair_ids]
    ids = list(report.used_pair_ids)
    if family == "all":  # all-position nodes need sides of equal token length
        keep = [k for k, (h, b) in enumerate(tokenized) if len(h) == len(b)]
        if len(keep) < 2:
            raise ConfigError(f"{report_path}: fewer than 2 pairs have sides of equal token length; use --nodes last")
        tokenized, ids = [tokenized[k] for k in keep], [ids[k] for k in keep]
    engine = tree_engine(loaded, token_sets_of(report.metric), config.model_copy(update={"metric": report.metric.form}))
    batch = build_pair_batch(tokenized, tok.pad_token_id, ids, allow_unequal=family == "last", tail=engine.tail)
    m_h, m_b = (t.numpy().astype(np.float64) for t in engine.baseline(batch))
    return Prepared(loaded, engine, batch, ids, m_h, m_b)


def run_circuit(report, report_path: str | Path, model: str | None = None, adapter: str | None = None,
                target: float = 0.8, directions: Sequence[str] = ("denoise", "noise"), family: str = "all",
                max_edge_nodes: int = 12, command: str = "", progress: bool = False) -> CircuitReport:
    """Search the circuit(s) of an audited model: the pairs, token sets and statistics options come from the
    report; the model is reloaded (``model``/``adapter`` default to the report's) and must have its weights."""
    started = time.perf_counter()
    if not 0 < target <= 1:
        raise ConfigError(f"--target {target}: give the share of the gap to recover, in (0, 1], e.g. 0.8")
    if max_edge_nodes < 0:
        raise ConfigError(f"--max-edge-nodes {max_edge_nodes}: give 0 (no edges) or more")
    setup = prepare(report, report_path, model, adapter, family)
    loaded, engine, batch, ids, m_h, m_b = setup.loaded, setup.engine, setup.batch, setup.ids, setup.m_h, setup.m_b
    nodes = circuit_nodes(loaded.n_layers, loaded.n_heads, family)
    circuits = []
    for direction in directions:
        if direction not in ("denoise", "noise"):
            raise ConfigError(f"--directions {direction}: choose denoise, noise or both")
        prior = None
        if direction == report.direction and len(ids) == len(report.used_pair_ids):
            prior = {c.id: c.share for c in report.components if c.share is not None}
        bar = tqdm(desc=f"circuit ({direction}): joint patches and edges", unit="patch", disable=not progress,
                   leave=False)
        search = Search(engine, batch, m_h, m_b, direction, bar=bar)
        result = search_circuit(search, nodes, target, prior, report.stats.level, report.stats.n_resamples,
                                report.stats.seed)
        members = [c for c in nodes if c.id in {n.id for n in result.nodes}]
        if max_edge_nodes:
            add_edges(result, search, members, loaded.n_layers, max_edge_nodes, report.stats.level,
                      report.stats.n_resamples, report.stats.seed)
        bar.close()
        circuits.append(result)
    family_words = {"all": "attention heads (hook_z) and MLP outputs, every position patched together",
                    "last": "attention heads (hook_z) and MLP outputs at the last prompt token"}[family]
    return CircuitReport(
        model=report.model.name, weights_sha256=report.model.weights_sha256, report=str(report_path),
        dataset_sha256=report.dataset.sha256, n_pairs=batch.n_pairs, nodes=family_words, level=report.stats.level,
        n_resamples=report.stats.n_resamples, seed=report.stats.seed, circuits=circuits,
        differences=differences(circuits), audit_seconds=report.runtime_seconds,
        seconds=round(time.perf_counter() - started, 2), command=command, created=created_now(),
    )
