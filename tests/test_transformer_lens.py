"""Our exact patching engine against an independent reference: TransformerLens's ``transformer_lens.patching``.

For a random-weight GPT-2 and a random-weight GQA Llama, the same weights are loaded into both libraries and
every denoising sweep TransformerLens offers for our component kinds is compared cell by cell, per pair:

- ``get_act_patch_resid_pre`` / ``get_act_patch_attn_out`` / ``get_act_patch_mlp_out``: layer x position,
- ``get_act_patch_attn_head_out_all_pos``: layer x head (``hook_z``, every position at once),
- ``get_act_patch_attn_head_out_by_pos``: layer x position x head,

plus the unpatched scores of both sides. TransformerLens position ``p`` of a length-``T`` prompt is our
offset ``p - T``; our ``head`` kind patches the input of the attention output projection, which is
TransformerLens's ``attn.hook_z`` (``[batch, pos, head, d_head]``) flattened head-major.

How the models are shared: TransformerLens 4.x wraps a Hugging Face module with ``TransformerBridge``
(``build_bridge_from_module``; no download, no tokenizer, no weight processing, so activations are the raw
HF ones). The bridge rewires the module it is given *in place* (its decoder layers become ``BlockBridge``
objects), so it gets a ``copy.deepcopy`` of the model our engine runs: identical weights, no
re-initialisation, and our hooks still sit on the untouched ``transformers`` modules. Token ids go in as
tensors, so the bridge adds no BOS token. All pairs have one token length, so TransformerLens runs them
as one clean and one corrupted batch; ``reduce="none"`` keeps one metric value per pair and
``baseline=True`` adds the unpatched corrupted run. Every hook used exists in the 4.3 bridge for both
families; no substitutes were needed.

Denoising here means: run the benign (corrupted) prompt, patch in the harmful (clean) activation, and
read the refusal score (``conftest.score_fn``) at the last position.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

pytest.importorskip("transformer_lens", reason="TransformerLens is a test-only dependency (the 'test' extra)")

from transformer_lens import patching  # noqa: E402
from transformer_lens.model_bridge.sources import build_bridge_from_module  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from refusal_eval.models.adapters import get_adapter  # noqa: E402
from refusal_eval.models.loading import LoadedModel  # noqa: E402
from refusal_eval.patching import Component, PatchEngine, build_pair_batch  # noqa: E402

from .conftest import random_pairs, score_fn  # noqa: E402

TOL = 1e-4
N_LAYERS, N_HEADS = 2, 4
SEQ_LEN, N_PAIRS = 6, 4
KINDS = ["resid_pre", "attn_out", "mlp_out", "head_all_pos", "head_by_pos"]


def _gpt2() -> torch.nn.Module:
    config = GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=N_LAYERS, n_head=N_HEADS, initializer_range=0.2,
    )
    return GPT2LMHeadModel(config)


def _llama() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )
    return LlamaForCausalLM(config)


FAMILIES = {"gpt2": (_gpt2, "GPT2LMHeadModel"), "llama": (_llama, "LlamaForCausalLM")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run much faster on one thread; restore the caller's setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Setup:
    """One random model in both libraries, one batch of equal-length pairs, and TransformerLens's sweeps."""

    def __init__(self, family: str) -> None:
        build, architecture = FAMILIES[family]
        torch.manual_seed(11)
        model = build().eval()
        bridged = copy.deepcopy(model)  # the bridge rewires its module in place; ours stays plain transformers
        self.bridge = build_bridge_from_module(bridged, architecture, hf_config=bridged.config).eval()
        self.loaded = LoadedModel(model, None, get_adapter(model), f"random-{family}", "random", "float32", "cpu")
        self.engine = PatchEngine(self.loaded, score_fn, max_rows=64)
        pairs = random_pairs(N_PAIRS, seed=4, min_len=SEQ_LEN, max_len=SEQ_LEN, prefix=1)
        self.batch = build_pair_batch(pairs, 0, [f"p{i}" for i in range(N_PAIRS)])
        assert self.batch.equal_lengths and self.batch.width == SEQ_LEN
        self.clean = torch.tensor([h for h, _ in pairs])  # harmful = clean (source of denoising patches)
        self.corrupted = torch.tensor([b for _, b in pairs])  # benign = corrupted (target)
        with torch.no_grad():
            clean_logits, self.clean_cache = self.bridge.run_with_cache(self.clean)
        self.tl_clean_scores = self.metric(clean_logits)
        self._sweeps: dict[str, patching.PatchingResult] = {}

    @staticmethod
    def metric(logits: torch.Tensor) -> torch.Tensor:
        """Per-pair refusal score at the last position ([batch]; used with reduce='none')."""
        return score_fn(logits[:, -1, :])

    def tl_sweep(self, kind: str) -> patching.PatchingResult:
        if kind not in self._sweeps:
            fn = {
                "resid_pre": patching.get_act_patch_resid_pre,
                "attn_out": patching.get_act_patch_attn_out,
                "mlp_out": patching.get_act_patch_mlp_out,
                "head_all_pos": patching.get_act_patch_attn_head_out_all_pos,
                "head_by_pos": patching.get_act_patch_attn_head_out_by_pos,
            }[kind]
            # TransformerLens shows a progress bar per sweep that cannot be switched off; silence it
            with torch.no_grad(), mock.patch.object(patching, "tqdm", lambda cells, **_: cells):
                self._sweeps[kind] = fn(
                    self.bridge, self.corrupted, self.clean_cache, self.metric, reduce="none", baseline=True
                )
        return self._sweeps[kind]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request) -> Setup:
    return Setup(request.param)


def ours(setup: Setup, kind: str) -> torch.Tensor:
    """Our patched scores laid out like TransformerLens's values: [*axes, pair]."""
    layers, positions, heads = range(N_LAYERS), range(SEQ_LEN), range(N_HEADS)
    if kind == "head_all_pos":
        comps = [Component("head", layer, head=h) for layer in layers for h in heads]
        shape = (N_LAYERS, N_HEADS)
    elif kind == "head_by_pos":
        comps = [Component("head", layer, head=h, position=p - SEQ_LEN)
                 for layer in layers for p in positions for h in heads]
        shape = (N_LAYERS, SEQ_LEN, N_HEADS)
    else:
        comps = [Component(kind, layer, position=p - SEQ_LEN) for layer in layers for p in positions]
        shape = (N_LAYERS, SEQ_LEN)
    return setup.engine.patch(setup.batch, comps, "denoise").view(*shape, N_PAIRS)


def _report(setup: Setup, kind: str, diff: float) -> None:
    family = setup.loaded.model.config.model_type
    print(f"max abs diff vs TransformerLens {family} {kind}: {diff:.2e}")
    assert diff < TOL, (family, kind, diff)


def test_same_weights_in_both_libraries(setup):
    """The bridge wraps a copy with identical parameters (not a re-initialised model)."""
    original = setup.loaded.model.state_dict()
    wrapped = {k.replace("._original_component", ""): v for k, v in setup.bridge.original_model.state_dict().items()}
    assert original, "no parameters"
    for name, tensor in original.items():
        assert torch.equal(wrapped[name], tensor), name


def test_unpatched_scores_match(setup):
    harmful, benign = setup.engine.baseline(setup.batch)
    tl_benign = setup.tl_sweep("resid_pre").baseline
    diff = max(float((harmful - setup.tl_clean_scores).abs().max()), float((benign - tl_benign).abs().max()))
    # a meaningful comparison: the two sides of the pairs really score differently
    assert float((harmful - benign).abs().max()) > 1e-2
    _report(setup, "unpatched", diff)


@pytest.mark.parametrize("kind", KINDS)
def test_denoising_matches_transformer_lens(setup, kind):
    result = setup.tl_sweep(kind)
    expected = result.values
    got = ours(setup, kind)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    # the patches do something (hooks fired in both libraries), so agreement is not agreement on "no effect"
    assert float(result.effect().abs().max()) > 1e-2
    _report(setup, kind, float((got - expected).abs().max()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_depth_two_score_matches_transformer_lens(family):
    """A depth-2 opening tree (one branch): TransformerLens runs prompt + branch token and reads the tree score from
    the last two positions; its sweeps at the prompt positions (ours never patch the branch column) agree with ours."""
    from refusal_eval.metrics import Branch, TokenSets, tree_score

    branch = 7
    tree = TokenSets([1, 2], [3], "test", branches=[Branch(branch, [11, 12], [13, 14])], depth=2)

    def metric(logits):
        return tree_score(logits[:, -2:, :], tree)

    build, architecture = FAMILIES[family]
    torch.manual_seed(12)
    model = build().eval()
    bridge = build_bridge_from_module(copy.deepcopy(model), architecture, hf_config=model.config).eval()
    loaded = LoadedModel(model, None, get_adapter(model), f"random-{family}", "random", "float32", "cpu")
    engine = PatchEngine(loaded, lambda logits: tree_score(logits, tree), max_rows=64, tail=[branch])
    pairs = random_pairs(N_PAIRS, seed=5, min_len=SEQ_LEN, max_len=SEQ_LEN, prefix=1)
    batch = build_pair_batch(pairs, 0, [f"p{i}" for i in range(N_PAIRS)], tail=[branch])
    clean = torch.tensor([h + [branch] for h, _ in pairs])
    corrupted = torch.tensor([b + [branch] for _, b in pairs])
    layers, positions = range(N_LAYERS), range(SEQ_LEN)
    with torch.no_grad():
        clean_logits, cache = bridge.run_with_cache(clean)
    harmful, benign = engine.baseline(batch)
    assert float((harmful - benign).abs().max()) > 1e-2
    assert float((harmful - metric(clean_logits)).abs().max()) < TOL
    sweeps = {"resid_pre": patching.get_act_patch_resid_pre, "attn_out": patching.get_act_patch_attn_out,
              "mlp_out": patching.get_act_patch_mlp_out}
    for kind, fn in sweeps.items():
        with torch.no_grad(), mock.patch.object(patching, "tqdm", lambda cells, **_: cells):
            result = fn(bridge, corrupted, cache, metric, reduce="none", baseline=True)
        assert float((result.baseline - benign).abs().max()) < TOL
        comps = [Component(kind, layer, position=p - SEQ_LEN) for layer in layers for p in positions]
        got = engine.patch(batch, comps, "denoise").view(N_LAYERS, SEQ_LEN, N_PAIRS)
        expected = result.values[:, :SEQ_LEN]  # TransformerLens also patches the branch column: left out
        assert float(result.effect()[:, :SEQ_LEN].abs().max()) > 1e-2
        diff = float((got - expected).abs().max())
        print(f"max abs diff vs TransformerLens {family} {kind} (depth 2): {diff:.2e}")
        assert diff < TOL, (family, kind, diff)
