"""A model spread over devices by a device map (accelerate), half its layers offloaded to disk, audits exactly as
on one device: hooks, cached inputs, prefix reuse and layer skip across the device boundary."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from refusal_eval import AuditConfig, audit
from refusal_eval.cli import main
from refusal_eval.errors import ModelError
from refusal_eval.models.loading import input_device, load_model

# the shipped tiny refuser's 4 layers: two on the CPU, two offloaded to disk (accelerate onloads them per forward)
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
         "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}
OPTIONS = dict(max_pairs=8, positions=["all", "each"], n_boot=200, n_permutations=200, batch_rows=32)


@pytest.fixture(scope="module")
def split_map(tmp_path_factory):
    path = tmp_path_factory.mktemp("map") / "device_map.json"
    path.write_text(json.dumps(SPLIT))
    return str(path)


def test_the_map_really_offloads_and_the_weights_hash_is_unchanged(split_map):
    whole, split = load_model(), load_model(device_map=split_map)
    devices = {p.device.type for p in split.model.model.layers[3].parameters()}
    assert devices == {"meta"}, devices  # on disk: accelerate holds a placeholder here
    assert input_device(split.model) == torch.device("cpu") and split.device == "cpu"
    assert split.weights_sha256() == whole.weights_sha256()


@pytest.mark.slow
def test_audit_across_the_device_boundary_equals_the_one_device_audit(split_map, monkeypatch):
    audit_module = sys.modules["refusal_eval.pipeline.audit"]  # where audit() calls load_model
    one = audit(AuditConfig(**OPTIONS), progress=False)
    placed = []

    def load_and_record(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        placed.append({p.device.type for p in loaded.model.model.layers[3].parameters()})
        return loaded

    monkeypatch.setattr(audit_module, "load_model", load_and_record)
    split = audit(AuditConfig(device_map=split_map, **OPTIONS), progress=False)
    assert placed == [{"meta"}]  # the audit really ran with layer 3 offloaded
    assert split.model.weights_sha256 == one.model.weights_sha256
    assert split.engine.layer_skip and split.engine.prefix_reuse  # the shortcuts stayed on across the boundary
    assert len(split.components) == len(one.components) > 100
    # the adaptive search runs without its attribution step across devices, so its cells are batched differently:
    # the same cells, numbers equal within float rounding
    assert split.search.n_attribution_flagged is None and one.search.n_attribution_flagged is not None
    for a, b in zip(one.components, split.components, strict=True):
        assert (a.id, a.significant) == (b.id, b.significant)
        assert (a.share, a.ci_low, a.ci_high) == pytest.approx((b.share, b.ci_low, b.ci_high), abs=1e-6)
    assert split.gap == one.gap and split.behaviour == one.behaviour
    # the refusal direction runs on one device: across the boundary the report says why it is not computed
    assert "--device-map" in split.refusal_direction.reason and split.refusal_direction.vector is None


def test_bad_device_maps_are_refused_before_loading(tmp_path, capsys):
    bad = tmp_path / "map.json"
    bad.write_text('["model.layers.0"]')
    with pytest.raises(ModelError, match="must map module names to devices"):
        load_model(device_map=str(bad))
    assert main(["run", "--device-map", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "neither 'auto' nor an existing JSON file" in capsys.readouterr().err
    with pytest.raises(ModelError, match="--adapter with --device-map"):
        load_model(device_map="auto", adapter=str(tmp_path))
