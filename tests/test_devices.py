"""The engine and attribution on every device present: CPU always, CUDA where there is one (``pytest -m gpu``).

Each device's numbers must equal the CPU's: the same random model, the same pairs, exact patching of
every kind and attribution estimates of the same cells."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from refusal_eval.patching import Component, PatchEngine, build_pair_batch
from refusal_eval.patching.attribution import attribute

from .conftest import random_llama, random_pairs, score_fn

COMPONENTS = [Component("resid_pre", 1), Component("attn_out", 0, position=-1), Component("mlp_out", 2),
              Component("head", 1, head=3), Component("head", 0, head=1, position=-2), Component("embed", 0)]

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]),
]


@pytest.fixture(scope="module")
def on_cpu():
    loaded = random_llama(seed=3)
    batch = build_pair_batch(random_pairs(6, seed=5), 0, [f"p{i}" for i in range(6)])
    engine = PatchEngine(loaded, score_fn, max_rows=64)
    return batch, engine.patch(batch, COMPONENTS, "denoise"), attribute(engine, batch, COMPONENTS)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_and_attribution_on_a_device_equal_the_cpu(device, on_cpu):
    batch, exact_cpu, attr_cpu = on_cpu
    loaded = random_llama(seed=3)
    loaded.model.to(device)
    loaded = dataclasses.replace(loaded, device=device)
    engine = PatchEngine(loaded, score_fn, max_rows=64)
    exact = engine.patch(batch, COMPONENTS, "denoise")
    estimated = attribute(engine, batch, COMPONENTS)
    assert exact.device.type == "cpu" and estimated.device.type == "cpu"  # results always come back to the CPU
    torch.testing.assert_close(exact, exact_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(estimated, attr_cpu, atol=1e-4, rtol=1e-4)
