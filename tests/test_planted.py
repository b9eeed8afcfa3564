"""Planted refusal (issue 25): tiny organisms whose refusal lives, by construction, in known modules, and what the
audit finds in them. The criteria and thresholds were committed to BENCHMARKS.md ("Planted refusal") before any
organism was built; benchmarks/planted.py prints the full table.

What holds and is asserted: the base does not refuse; only the planted weights differ from the base; every organism
refuses; criterion 1 (the planted set patched together removes >= 0.8 of the gap, noising, every position) for all
four plants. What fails, and is asserted as the finding it is (BENCHMARKS.md): criterion 2 (rank 1) and, for two
plants, criterion 3, because in a 4-layer model the layer-0 components that read the harmful word are as necessary
as the plant they feed. Every component that outranks a plant is such an upstream feeder (or holds the plant):
nothing downstream of a plant, and nothing beside it, is ever ranked above it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refusal_eval import AuditConfig, audit
from refusal_eval.errors import ConfigError, DataError
from refusal_eval.patching.components import Component
from refusal_eval.planted import PLANTED_FILE, Planted, Site, auroc, joint_shares, load_planted, recovery

SCRIPT = Path(__file__).parents[1] / "scripts" / "plant_refusal.py"
KINDS = ["attn_out", "mlp_out", "head"]


def _script():
    spec = importlib.util.spec_from_file_location("plant_refusal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def organisms(tmp_path_factory) -> dict[str, Path]:
    """The tiny base and the four plants of scripts/plant_refusal.py, on one thread beside the other worker."""
    return _script().build_tiny(tmp_path_factory.mktemp("planted"), threads=1)


def _noising(model: Path, **extra):
    return audit(AuditConfig(model=str(model), direction="noise", positions=["all"], components=KINDS, tricky="",
                             n_boot=500, n_permutations=1000, **extra), progress=False)


@pytest.fixture(scope="module")
def reports(organisms) -> dict:
    return {name: _noising(path) for name, path in organisms.items()}


# -- the plant's description ----------------------------------------------------------------------------------------
def test_sites_name_components_and_modules():
    plant = Planted.of([Site.parse("mlp:2"), Site.parse("attn:1"), Site.parse("heads:3:2,0")], name="p")
    assert plant.components == ["blocks.2.hook_mlp_out", "blocks.1.hook_attn_out", "blocks.3.attn.hook_z[0]",
                                "blocks.3.attn.hook_z[2]"]
    assert plant.modules == ["model.layers.2.mlp", "model.layers.1.self_attn", "model.layers.3.self_attn.o_proj"]
    assert plant.sites == ["mlp:2", "attn:1", "heads:3:0,2"]
    assert Site.parse("attn:1").holds(Component("head", 1, 3))
    assert not Site.parse("mlp:1").holds(Component("head", 1, 0))
    assert Site.parse("heads:3:0,2").holds(Component("head", 3, 2))
    assert not Site.parse("heads:3:0,2").holds(Component("head", 3, 1))
    for bad in ("mlp", "mlp:x", "heads:2", "heads:2:1,1", "resid:3"):
        with pytest.raises(ConfigError, match="plant site"):
            Site.parse(bad)


def test_planted_json_round_trip_and_errors(tmp_path):
    plant = Planted.of([Site.parse("heads:2:0,2")], name="heads", base="b")
    plant.write(tmp_path)
    assert load_planted(tmp_path) == plant
    (tmp_path / PLANTED_FILE).write_text(json.dumps({**plant.model_dump(), "components": ["blocks.0.hook_mlp_out"]}))
    with pytest.raises(DataError, match="do not match 'sites'"):
        load_planted(tmp_path)
    (tmp_path / PLANTED_FILE).write_text(json.dumps({"components": [], "modules": []}))
    with pytest.raises(DataError, match=r"planted.json: field 'sites'"):
        load_planted(tmp_path)
    (tmp_path / PLANTED_FILE).write_text("{")
    with pytest.raises(DataError, match="not JSON"):
        load_planted(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_planted(tmp_path / "nowhere")


def test_auroc_is_the_share_of_pairs_ordered():
    assert auroc([3.0], [1.0, 2.0, 4.0]) == pytest.approx(2 / 3)
    assert auroc([1.0, 2.0], [1.0]) == pytest.approx(0.75)  # a tie counts one half
    assert auroc([], [1.0]) is None


# -- the organisms --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_only_the_planted_weights_differ_from_the_base(organisms):
    base = load_file(organisms["base"] / "model.safetensors")
    for name in ("mlp", "attn", "mlp+attn", "heads"):
        plant = load_planted(organisms[name])
        weights = load_file(organisms[name] / "model.safetensors")
        changed = {k for k in base if not torch.equal(base[k], weights[k])}
        allowed = {f"{p}.weight" for s in plant.site_list for p in s.projections}
        assert changed and changed <= allowed, (name, changed - allowed)
        for s in plant.site_list:
            if s.part == "heads":  # B @ A reads the planted heads' columns only
                key = f"model.layers.{s.layer}.self_attn.o_proj.weight"
                delta = (weights[key] - base[key]).abs().sum(dim=0).view(-1, 32).sum(dim=1)
                assert all((delta[h] > 0) == (h in s.heads) for h in range(len(delta))), delta


@pytest.mark.slow
def test_the_base_does_not_refuse_and_every_plant_does(reports):
    assert not reports["base"].behaviour.refuses and not reports["base"].shares_defined
    for name in ("mlp", "attn", "mlp+attn", "heads"):
        assert reports[name].behaviour.refuses and reports[name].shares_defined, name


@pytest.mark.slow
def test_criterion_1_the_planted_set_removes_the_gap(organisms, reports):
    for name in ("mlp", "attn", "mlp+attn", "heads"):
        plant = load_planted(organisms[name])
        joint = joint_shares(reports[name], name, {"planted": plant.components})["planted"][0]
        assert joint.share >= 0.8, (name, joint)  # threshold fixed before the run
        assert joint.ci_low > 0.5, (name, joint)


def _feeds_or_holds(c: Component, site: Site) -> bool:
    """``c`` reads the input before the site does (an earlier layer, or attention before a planted MLP of the same
    layer), lies inside it, or holds it (the attn_out of planted heads)."""
    if c.layer < site.layer or site.holds(c):
        return True
    same = c.layer == site.layer
    return same and ((site.part == "mlp" and c.kind in ("attn_out", "head"))
                     or (site.part == "heads" and c.kind == "attn_out"))


@pytest.mark.slow
def test_criterion_2_fails_only_to_upstream_feeders(organisms, reports):
    """The finding: no single plant ranks first (criterion 2 fails); what outranks each planted component is a
    component that reads the harmful word before the plant (layer 0 here) or holds it, never one after or beside."""
    ranks = {}
    for name in ("mlp", "attn", "mlp+attn", "heads"):
        plant = load_planted(organisms[name])
        result = recovery(reports[name], plant)
        assert result.recall == 1.0 and result.auroc > 0.8, (name, result)
        ranked = sorted((c for c in reports[name].components if c.position is None and c.share is not None
                         and c.trivial is None), key=lambda c: -c.share)
        for planted_id in plant.components:
            site = next(s for s in plant.site_list if planted_id in [x.id for x in s.components])
            above = [Component.parse(c.id) for c in ranked if c.share > result.shares[planted_id]]
            others = [c for c in above if not any(s.holds(c) for s in plant.site_list)]  # another planted site
            assert all(_feeds_or_holds(c, site) for c in others), (name, planted_id, [c.id for c in others])
        ranks[name] = result
    assert not ranks["mlp"].rank_one and ranks["mlp"].top == "blocks.0.hook_attn_out"


@pytest.mark.slow
def test_criterion_3_the_noising_circuit_holds_plants_or_their_feeders(organisms, reports):
    """The noising circuit (nodes all, target 0.8) reaches the target and is made of planted components and their
    upstream feeders only. For the MLP plant it is the plant alone (criterion 3 holds); for the attention plant
    it is layer 0's word readers (criterion 3 fails: BENCHMARKS.md)."""
    from refusal_eval.circuit import run_circuit

    for name in ("mlp", "attn"):
        plant = load_planted(organisms[name])
        circuit = run_circuit(reports[name], name, directions=("noise",), family="all", max_edge_nodes=0).circuits[0]
        assert circuit.found and circuit.joint.share >= 0.8, (name, circuit.joint)
        nodes = [Component(n.kind, n.layer, n.head, n.position) for n in circuit.nodes]
        assert all(any(_feeds_or_holds(c, s) for s in plant.site_list) for c in nodes), (name, nodes)
        if name == "mlp":
            assert [c.id for c in nodes] == ["blocks.2.hook_mlp_out"]


SHIPPED = sorted((Path(__file__).parents[1] / "examples" / "planted").glob("*/planted.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_a_committed_plant_trains_only_its_modules(path):
    """Each committed SmolLM2 plant: planted.json is valid, the adapter holds LoRA weights for exactly the planted
    sites' projections, a heads plant reads only its heads' columns, and the card names the plant."""
    plant = load_planted(path)
    folder = path.parent
    weights = load_file(folder / "adapter_model.safetensors")
    wrapped = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in weights}
    assert wrapped == {p for s in plant.site_list for p in s.projections}
    config = json.loads((folder / "adapter_config.json").read_text())
    for s in plant.site_list:
        if s.part == "heads":
            a = weights[f"base_model.model.{s.projections[0]}.lora_A.weight"].float()
            used = a.abs().sum(dim=0).view(-1, 64).sum(dim=1) > 0  # SmolLM2's head_dim
            assert [h for h, u in enumerate(used.tolist()) if u] == list(s.heads)
    assert config["peft_type"] == "LORA"
    card = (folder / "README.md").read_text()
    assert all(f"`{m}`" in card for m in plant.modules) and plant.name in card



@pytest.mark.slow
def test_recovery_equals_a_naive_count(organisms, reports):
    """recovery()'s rank, AUROC, precision and recall against a plain loop over the report's rows."""
    for name in ("mlp", "heads"):
        plant, report = load_planted(organisms[name]), reports[name]
        result = recovery(report, plant)
        rows = [c for c in report.components if c.position is None and c.trivial is None and c.share is not None
                and c.kind in KINDS]
        inside = [c for c in rows if c.id not in plant.components
                  and any(s.holds(Component.parse(c.id)) for s in plant.site_list)]
        holds = [c for c in rows if c.kind == "attn_out" and any(s.part == "heads" and s.layer == c.layer
                                                                 for s in plant.site_list)]
        ranked = [c for c in rows if c not in inside]
        pos = [c.share for c in ranked if c.id in plant.components]
        neg = [c.share for c in ranked if c.id not in plant.components and c not in holds]
        wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
        assert result.auroc == pytest.approx(wins / (len(pos) * len(neg)))
        for planted_id, rank in result.planted_ranks.items():
            share = next(c.share for c in ranked if c.id == planted_id)
            assert rank == 1 + sum(c.share > share for c in ranked)
        named = [c.id for c in ranked if c.significant and c not in holds]
        hits = [i for i in named if i in plant.components]
        assert sorted(result.named) == sorted(named)
        assert result.precision == pytest.approx(len(hits) / len(named))
        assert result.recall == pytest.approx(len(hits) / len(plant.components))
