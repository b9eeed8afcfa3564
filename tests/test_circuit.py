"""The minimal circuit: joint patches, greedy search and pruning, path-patching edges, the command and its files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_eval.audit import format_prompt
from refusal_eval.circuit import Search, circuit_nodes, path_effects, run_circuit, search_circuit
from refusal_eval.cli import main
from refusal_eval.data.pairs import load_pairs, shipped_dataset
from refusal_eval.metrics import refusal_score
from refusal_eval.models.loading import load_model
from refusal_eval.patching.components import Component
from refusal_eval.report.kinds import load_report

from .conftest import score_fn

SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "reports" / "tiny-refuser" / "report.json"


# -- an independent joint patch: one pair at a time, no padding, plain forward hooks -----------------------------------
def _point_module(loaded, kind: str, layer: int):
    block = loaded.adapter.layers(loaded.model)[layer]
    return loaded.adapter.o_proj(block) if kind == "head" else loaded.adapter.mlp_out(block)


def _naive_run(loaded, ids: list[int], score, write=None, record=None) -> float:
    """Score one unpadded prompt; ``write``: {(kind, layer): fn(activation [T, d]) -> activation};
    ``record``: dict filled with each hooked point's activation."""
    handles = []
    points = set(write or {}) | set(record if record is not None else {})
    for kind, layer in points:
        module = _point_module(loaded, kind, layer)

        def apply(x, key=(kind, layer)):
            if record is not None and key in record:
                record[key] = x[0].detach().clone()
            if write and key in write:
                x = write[key](x[0]).unsqueeze(0)
            return x

        if kind == "head":  # o_proj input
            handles.append(module.register_forward_pre_hook(lambda m, args, f=apply: (f(args[0]),)))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, f=apply: f(out)))
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits
    finally:
        for h in handles:
            h.remove()
    return float(score(logits[:, -1, :])[0])


def _naive_joint(loaded, pairs_ids, nodes, score, head_dim, direction="denoise") -> np.ndarray:
    """Per-pair effect of patching every node together at every position, from the other side's run."""
    points = {(c.kind, c.layer) for c in nodes}
    out = []
    for harmful, benign in pairs_ids:
        source, target = (harmful, benign) if direction == "denoise" else (benign, harmful)
        cache = {p: None for p in points}
        _naive_run(loaded, source, score, record=cache)
        clean = _naive_run(loaded, target, score)

        def writer(point, cache=cache):
            def fn(x):
                x = x.clone()
                for c in nodes:
                    if (c.kind, c.layer) == point:
                        dims = slice(None) if c.head is None else slice(c.head * head_dim, (c.head + 1) * head_dim)
                        x[:, dims] = cache[point][:, dims]
                return x
            return fn

        patched = _naive_run(loaded, target, score, write={p: writer(p) for p in points})
        out.append(patched - clean if direction == "denoise" else clean - patched)
    return np.array(out)


def test_joint_patch_matches_single_patches_and_a_naive_joint_patch(llama, pairs, batch, engine):
    heads = [Component("head", 0, 1), Component("head", 2, 3)]
    mlps = [Component("mlp_out", 1), Component("mlp_out", 2)]
    singles = engine.patch(batch, heads + mlps)
    assert torch.allclose(engine.patch_sets(batch, [[c] for c in heads + mlps]), singles, atol=1e-5)
    for direction in ("denoise", "noise"):
        joint = engine.patch_sets(batch, [heads + mlps, [], heads], direction).numpy()
        m_h, m_b = (t.numpy() for t in engine.baseline(batch))
        effect = joint - m_b if direction == "denoise" else m_h - joint
        naive = _naive_joint(llama, pairs, heads + mlps, score_fn, engine.head_dim, direction)
        np.testing.assert_allclose(effect[0], naive, atol=1e-4)
        np.testing.assert_allclose(joint[1], m_b if direction == "denoise" else m_h, atol=1e-5)  # empty set: clean
        np.testing.assert_allclose(effect[2], _naive_joint(llama, pairs, heads, score_fn, engine.head_dim,
                                                           direction), atol=1e-4)


def test_direct_edge_to_the_score_is_the_senders_change_through_the_final_norm(llama, pairs, batch, engine):
    """An MLP's edge to the score, every later node frozen, equals its output change added to the clean final
    residual and read out through the final norm and the unembedding (computed here by hand)."""
    sender = Component("mlp_out", 1)
    m_h, m_b = (t.numpy().astype(np.float64) for t in engine.baseline(batch))
    names, effects = path_effects(Search(engine, batch, m_h, m_b, "denoise"), [sender], llama.n_layers)
    assert names == [(sender.id, "score")]
    model = llama.model
    for i, (harmful, benign) in enumerate(pairs):
        rec_h, rec_b = {("mlp_out", 1): None}, {("mlp_out", 1): None}
        _naive_run(llama, harmful, score_fn, record=rec_h)
        _naive_run(llama, benign, score_fn, record=rec_b)
        final = {}
        handle = model.model.norm.register_forward_pre_hook(lambda m, args, d=final: d.update(x=args[0][0]))
        with torch.no_grad():
            model(input_ids=torch.tensor([benign]))
        handle.remove()
        delta = rec_h[("mlp_out", 1)] - rec_b[("mlp_out", 1)]
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(final["x"] + delta))
        expected = float(score_fn(logits[-1:])[0]) - float(m_b[i])
        assert effects[0, i] == pytest.approx(expected, abs=1e-4)


def test_mlp_to_mlp_edge_matches_a_hand_computed_path(llama, pairs, batch, engine):
    """Edge MLP1 -> MLP2: MLP2 recomputed on (its clean input + MLP1's change), then patched alone."""
    sender, receiver = Component("mlp_out", 0), Component("mlp_out", 2)
    m_h, m_b = (t.numpy().astype(np.float64) for t in engine.baseline(batch))
    names, effects = path_effects(Search(engine, batch, m_h, m_b, "denoise"), [sender, receiver], llama.n_layers)
    assert names[0] == (sender.id, receiver.id)
    block = llama.model.model.layers[2]
    for i, (harmful, benign) in enumerate(pairs):
        rec_h, rec_b = {("mlp_out", 0): None}, {("mlp_out", 0): None}
        _naive_run(llama, harmful, score_fn, record=rec_h)
        _naive_run(llama, benign, score_fn, record=rec_b)
        mid = {}
        handle = block.post_attention_layernorm.register_forward_pre_hook(
            lambda m, args, d=mid: d.update(x=args[0][0]))
        _naive_run(llama, benign, score_fn)
        handle.remove()
        with torch.no_grad():
            new_out = block.mlp(block.post_attention_layernorm(mid["x"] + rec_h[("mlp_out", 0)]
                                                               - rec_b[("mlp_out", 0)]))
        patched = _naive_run(llama, benign, score_fn, write={("mlp_out", 2): lambda x, v=new_out: v})
        assert effects[0, i] == pytest.approx(patched - float(m_b[i]), abs=1e-4)


class AdditiveSearch(Search):
    """A stand-in whose joint share is the capped sum of fixed node weights (no model)."""

    def __init__(self, weights: dict[str, float], n: int = 20):
        rng = np.random.default_rng(0)
        self.gaps_ = rng.uniform(1, 2, n)
        super().__init__(None, None, self.gaps_, np.zeros(n), "denoise")
        self.weights = weights

    def effects(self, sets):
        self.patched_sets += len(sets)
        return np.array([min(1.0, sum(self.weights[c.id] for c in s)) * self.gaps_ for s in sets]).reshape(
            len(sets), -1)

    def opposite(self):
        return self


def test_greedy_then_pruning_keeps_only_what_the_target_needs():
    nodes = [Component("mlp_out", layer) for layer in range(6)]
    # ranked by prior: a, b, c, d... ; a joint patch of the top 4 reaches 0.8, and then b is redundant
    weights = dict(zip([c.id for c in nodes], [0.5, 0.05, 0.12, 0.2, 0.0, 0.0], strict=True))
    prior = dict(zip([c.id for c in nodes], [0.6, 0.5, 0.4, 0.3, 0.2, 0.1], strict=True))
    result = search_circuit(AdditiveSearch(weights), nodes, 0.8, prior, n_boot=200)
    assert result.found and [n.id for n in result.nodes] == [nodes[0].id, nodes[2].id, nodes[3].id]
    assert result.joint.share == pytest.approx(0.82)
    # the first block tries every prefix; the top 4 is the smallest reaching the target; pruning then drops b
    by_estimate = [s for s in result.steps if s.rule == "estimate"]
    assert [(s.action, s.size) for s in by_estimate] == [("prefix", k) for k in range(1, 7)] + [("remove", 3)]
    assert [s.joint_share >= 0.8 for s in by_estimate[:6]] == [False, False, False, True, True, True]
    # every pair moves by the same fraction of its gap: the CI is a point, and both rules choose the same set
    assert result.rule == "ci_low" and result.point_estimate.nodes == [n.id for n in result.nodes]
    assert result.complement.share == pytest.approx(0.05)
    # unreachable target: nothing is claimed
    short = search_circuit(AdditiveSearch(weights), nodes, 0.9, prior, n_boot=200)
    assert not short.found and short.nodes == [] and short.joint is None
    assert short.all_nodes.share == pytest.approx(0.87)


def test_long_prefix_search_doubles_then_bisects_to_the_smallest_prefix():
    nodes = [Component("head", layer, head) for layer in range(8) for head in range(5)]
    weights = {c.id: 0.0385 for c in nodes}  # 21 of them reach 0.8, 20 do not
    prior = {c.id: 1.0 - i / 100 for i, c in enumerate(nodes)}
    result = search_circuit(AdditiveSearch(weights), nodes, 0.8, prior, n_boot=200)
    assert result.found and result.size == 21 and result.joint.share == pytest.approx(21 * 0.0385)
    tried = [s.size for s in result.steps if s.action == "prefix" and s.rule == "estimate"]
    assert tried == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 24, 20, 22, 21]
    assert not [s for s in result.steps if s.action == "remove"]  # every member is needed


class NoisyAdditiveSearch(AdditiveSearch):
    """Each node moves each pair by its own weight plus fixed per-pair noise (no cap): joint shares add, and their
    bootstrap intervals have width."""

    def __init__(self, weights: dict[str, float], noise: dict[str, float], n: int = 20):
        super().__init__(weights, n)
        rng = np.random.default_rng(1)
        self.per_pair = {k: w + noise[k] * rng.standard_normal(n) for k, w in weights.items()}

    def effects(self, sets):
        self.patched_sets += len(sets)
        self.patched = getattr(self, "patched", []) + [frozenset(c.id for c in s) for s in sets]
        return np.array([sum((self.per_pair[c.id] for c in s), np.zeros(len(self.gaps_))) * self.gaps_
                         for s in sets]).reshape(len(sets), -1)


def test_the_circuit_is_the_smallest_set_whose_ci_clears_the_target():
    """Against a brute force over every prefix with the bootstrap called directly: the point-estimate set is smaller
    than the set whose CI lower bound clears 0.8; the circuit is the latter, the former is reported beside it."""
    from refusal_eval.stats import share_intervals

    nodes = [Component("mlp_out", layer) for layer in range(6)]
    ids = [c.id for c in nodes]
    weights = dict(zip(ids, [0.5, 0.05, 0.12, 0.2, 0.1, 0.05], strict=True))
    noise = dict(zip(ids, [0.3, 0.02, 0.02, 0.02, 0.02, 0.02], strict=True))
    prior = dict(zip(ids, [0.6, 0.5, 0.4, 0.3, 0.2, 0.1], strict=True))
    search = NoisyAdditiveSearch(weights, noise)
    result = search_circuit(search, nodes, 0.8, prior, n_boot=400, seed=3)

    def interval(members):
        row = NoisyAdditiveSearch(weights, noise).effects([members])
        iv = share_intervals(row, search.gaps_, 0.95, 400, "BCa", 3)
        return iv.estimate[0], iv.low[0]

    point_k = min(k for k in range(1, 7) if interval(nodes[:k])[0] >= 0.8)
    ci_k = min(k for k in range(1, 7) if interval(nodes[:k])[1] >= 0.8)
    assert point_k < ci_k  # the case the rule is for
    assert result.rule == "ci_low" and result.clears_target and result.joint.ci_low >= 0.8
    chosen = [c for c in nodes if c.id in {n.id for n in result.nodes}]
    assert set(chosen) <= set(nodes[:ci_k])
    assert result.joint.ci_low == pytest.approx(interval(chosen)[1])
    for member in chosen:  # pruned: every member is needed by the rule
        assert interval([c for c in chosen if c != member])[1] < 0.8
    assert result.point_estimate is not None and result.point_estimate.joint.share >= 0.8
    assert result.point_estimate.size < result.size
    assert result.point_estimate.joint.ci_low < 0.8
    ci_steps = [s for s in result.steps if s.rule == "ci_low"]
    assert all(s.ci_low is not None for s in ci_steps) and any(s.size == ci_k for s in ci_steps)
    searched = search.patched[:-1]  # the last is the knock-out (the other direction; the stand-in ignores it)
    assert len(searched) == len(set(searched))  # no set is patched twice


def test_when_no_set_clears_the_target_the_point_estimate_set_is_the_circuit_and_says_so():
    nodes = [Component("mlp_out", layer) for layer in range(4)]
    ids = [c.id for c in nodes]
    weights = dict(zip(ids, [0.6, 0.25, 0.0, 0.0], strict=True))
    noise = dict(zip(ids, [0.6, 0.02, 0.02, 0.02], strict=True))
    prior = dict(zip(ids, [0.6, 0.5, 0.4, 0.3], strict=True))
    result = search_circuit(NoisyAdditiveSearch(weights, noise), nodes, 0.8, prior, n_boot=400, seed=3)
    assert result.found and result.rule == "estimate" and not result.clears_target
    assert result.joint.share >= 0.8 > result.joint.ci_low and result.point_estimate is None
    assert result.all_nodes.ci_low < 0.8


@pytest.fixture(scope="module")
def tiny_circuit():
    report = load_report(SHIPPED)
    return report, run_circuit(report, SHIPPED)


def test_tiny_refuser_circuit_is_small_recovers_the_gap_and_matches_a_naive_joint_patch(tiny_circuit):
    report, result = tiny_circuit
    denoise = next(c for c in result.circuits if c.direction == "denoise")
    assert denoise.found and denoise.joint.share >= 0.8 and denoise.fraction <= 0.10
    assert denoise.joint.ci_low <= denoise.joint.share <= denoise.joint.ci_high
    # the joint share, recomputed one pair at a time with plain hooks
    loaded = load_model(None)
    tok = loaded.tokenizer
    pairs = {p.id: p for p in load_pairs(shipped_dataset(), "eval")}
    ids = [(format_prompt(tok, pairs[i].harmful), format_prompt(tok, pairs[i].benign)) for i in report.used_pair_ids]
    ref = torch.tensor([t.id for t in report.metric.refusal_tokens])
    com = torch.tensor([t.id for t in report.metric.compliance_tokens])

    def score(logits):
        return refusal_score(logits, ref, com, report.metric.form)

    nodes = [Component(n.kind, n.layer, n.head, n.position) for n in denoise.nodes]
    head_dim = loaded.adapter.head_dim(loaded.model.config)
    effects = _naive_joint(loaded, ids, nodes, score, head_dim)
    gaps = np.array([_naive_run(loaded, h, score) - _naive_run(loaded, b, score) for h, b in ids])
    assert effects.sum() / gaps.sum() == pytest.approx(denoise.joint.share, abs=1e-4)
    noise = next(c for c in result.circuits if c.direction == "noise")
    assert noise.found and noise.knockout.share == pytest.approx(noise.joint.share)
    assert denoise.edges and all(e.ci_low <= e.share <= e.ci_high for e in denoise.edges)


def test_circuit_command_writes_json_markdown_with_mermaid_and_dot(tmp_path, capsys):
    shutil.copy(SHIPPED, tmp_path / "report.json")
    assert main(["circuit", str(tmp_path / "report.json"), "--directions", "denoise", "--max-edge-nodes", "3"]) == 0
    out = capsys.readouterr().out
    assert "patched together recover" in out and f"wrote {tmp_path / 'circuit.dot'}" in out
    data = json.loads((tmp_path / "circuit.json").read_text())
    assert [c["direction"] for c in data["circuits"]] == ["denoise"]
    md = (tmp_path / "circuit.md").read_text()
    assert "```mermaid\nflowchart BT" in md and "refusal score" in md
    for node in data["circuits"][0]["nodes"]:
        assert node["id"] in md
    dot = (tmp_path / "circuit.dot").read_text()
    assert dot.startswith("digraph") and dot.count("{") == dot.count("}") and "rankdir=BT" in dot


def test_circuit_command_refuses_bad_input_before_any_model_work(tmp_path, capsys):
    report = load_report(SHIPPED)
    undefined = report.model_copy(update={"shares_defined": False, "shares_reason": "the gap includes 0"})
    (tmp_path / "undefined.json").write_text(undefined.model_dump_json())
    assert main(["circuit", str(tmp_path / "undefined.json")]) == 2
    assert "shares are undefined" in capsys.readouterr().err
    shutil.copy(SHIPPED, tmp_path / "report.json")
    assert main(["circuit", str(tmp_path / "report.json"), "--target", "1.5"]) == 2
    assert "--target 1.5" in capsys.readouterr().err
    other = report.model_copy(deep=True)
    other.model.weights_sha256 = "0" * 64
    (tmp_path / "other.json").write_text(other.model_dump_json())
    assert main(["circuit", str(tmp_path / "other.json")]) == 2
    assert "does not have the weights" in capsys.readouterr().err


def test_node_family():
    nodes = circuit_nodes(3, 2, "last")
    assert len(nodes) == 3 * 2 + 3 and all(c.position == -1 for c in nodes)
    assert [c.kind for c in nodes[:3]] == ["head", "head", "mlp_out"]  # computation order


def test_run_with_circuit_writes_the_circuit_beside_the_report(tmp_path, capsys):
    args = ["run", "--out", str(tmp_path), "--max-pairs", "8", "--components", "head,mlp_out", "--positions", "all",
            "--tricky", "", "--n-boot", "200", "--n-permutations", "200", "--quiet", "--circuit"]
    assert main(args) == 0
    folder = tmp_path / "tiny-refuser"
    data = json.loads((folder / "circuit.json").read_text())
    assert data["report"] == str(folder / "report.json") and data["n_pairs"] == 8
    denoise = data["circuits"][0]
    assert denoise["ranking"] == "the audit report's single-component shares"
    assert denoise["found"] and denoise["joint"]["share"] >= 0.8
    assert "recover" in capsys.readouterr().out


def test_run_with_circuit_and_undefined_shares_writes_the_report_and_says_why_there_is_no_circuit(tmp_path, capsys):
    args = ["run", "--out", str(tmp_path), "--max-pairs", "4", "--components", "mlp_out", "--positions", "all",
            "--tricky", "", "--n-boot", "200", "--n-permutations", "200", "--quiet", "--circuit", "--min-gap", "1000"]
    assert main(args) == 0
    assert "no circuit for tiny-refuser: its shares are undefined" in capsys.readouterr().out
    assert (tmp_path / "tiny-refuser" / "report.json").is_file()
    assert not (tmp_path / "tiny-refuser" / "circuit.json").exists()
