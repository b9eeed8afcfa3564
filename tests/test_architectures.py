"""The patching identities on tiny random-weight models of every supported HF decoder family."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import transformers as tf

from refusal_eval.errors import ModelError
from refusal_eval.models import adapters as adapters_module
from refusal_eval.models.adapters import Adapter, get_adapter, projection_weight, register_adapter
from refusal_eval.models.loading import LoadedModel
from refusal_eval.patching import Component, PatchEngine, build_pair_batch, enumerate_components

from .conftest import random_pairs, score_fn

KINDS = ["embed", "resid_pre", "attn_out", "mlp_out", "head", "resid_post"]
LAYERS, HEADS, KV = 2, 4, 2
# initializer_range 0.2 (HF default 0.02) so that random models give clearly different scores per pair.
COMMON = dict(
    vocab_size=101,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    max_position_embeddings=64,
    initializer_range=0.2,
)
LLAMA_LIKE = dict(COMMON, hidden_size=32, intermediate_size=64, num_key_value_heads=KV)
# Gemma 2/3 add post-norms to the residual: their attn_out is a norm output, not the o_proj output.
POST_NORM = {"gemma2", "gemma3_text"}

# family id -> (causal LM class, config, GQA tested). Small sliding windows exercise local attention.
FAMILIES = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**LLAMA_LIKE), True),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**LLAMA_LIKE, sliding_window=4), True),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**LLAMA_LIKE), True),
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**LLAMA_LIKE, head_dim=16), True),
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**LLAMA_LIKE, head_dim=16), True),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**LLAMA_LIKE, head_dim=8, sliding_window=4), True),
    "gemma3_text": (
        tf.Gemma3ForCausalLM,
        tf.Gemma3TextConfig(
            **LLAMA_LIKE, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
        ),
        True,
    ),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**LLAMA_LIKE, pad_token_id=0, bos_token_id=1, eos_token_id=2), True),
    "gpt2": (
        tf.GPT2LMHeadModel,
        tf.GPT2Config(
            vocab_size=101,
            n_embd=32,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=64,
            n_inner=64,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
        ),
        False,
    ),
    "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**COMMON, hidden_size=32, intermediate_size=64), False),
    "gpt_neox_sequential": (
        tf.GPTNeoXForCausalLM,
        tf.GPTNeoXConfig(**COMMON, hidden_size=32, intermediate_size=64, use_parallel_residual=False),
        False,
    ),
    "opt": (
        tf.OPTForCausalLM,
        tf.OPTConfig(**COMMON, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, pad_token_id=0, init_std=0.2),
        False,
    ),
    # OPT-350m layout: post-LN layers, no final norm, project_in/project_out around the decoder.
    "opt_post_ln": (
        tf.OPTForCausalLM,
        tf.OPTConfig(
            **COMMON,
            hidden_size=32,
            ffn_dim=64,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
            pad_token_id=0,
            init_std=0.2,
        ),
        False,
    ),
}


def build(family: str) -> LoadedModel:
    cls, config, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # visible biases and norm weights, so a missed term cannot hide behind a zero init
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return LoadedModel(model, None, get_adapter(model), family, "random", "float32", "cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two OpenMP threads made
    each forward ~100x slower (0.9 ms -> 100 ms); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request) -> LoadedModel:
    return build(request.param)


@pytest.fixture(scope="module")
def pairs():
    return random_pairs(4, seed=2, min_len=4, max_len=8)


@pytest.fixture(scope="module")
def batch(pairs):
    return build_pair_batch(pairs, 0, [f"p{i}" for i in range(len(pairs))])


def effects(engine, batch, components, direction="denoise"):
    base_h, base_b = engine.baseline(batch)
    patched = engine.patch(batch, components, direction)
    return (patched - base_b) if direction == "denoise" else (base_h - patched), base_h - base_b


def test_registry_covers_the_families():
    wanted = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt"}
    assert wanted <= set(adapters_module.supported_architectures())
    for family, (_, config, gqa) in FAMILIES.items():
        assert config.model_type in wanted, family
        assert gqa == (getattr(config, "num_key_value_heads", HEADS) == KV < HEADS), family


def test_unpatched_scores_equal_plain_transformers(loaded, pairs):
    engine = PatchEngine(loaded, score_fn)
    for h, _ in pairs:
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([h])).logits[0, -1]
        ids = torch.tensor([h])
        torch.testing.assert_close(engine.scores(ids, torch.ones_like(ids))[0], score_fn(logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_full_replacements_recover_the_other_run(loaded, batch, direction):
    engine = PatchEngine(loaded, score_fn, max_rows=64)
    comps = [Component("resid_pre", 0), Component("resid_post", LAYERS - 1, position=-1)]
    eff, gap = effects(engine, batch, comps, direction)
    assert gap.abs().min() > 1e-4  # the pairs do differ in score
    torch.testing.assert_close(eff[0], gap, atol=1e-4, rtol=0)
    torch.testing.assert_close(eff[1], gap, atol=1e-4, rtol=0)


def test_self_patching_changes_nothing(loaded, pairs):
    same = build_pair_batch([(h, h) for h, _ in pairs], 0, [str(i) for i in range(len(pairs))])
    engine = PatchEngine(loaded, score_fn, max_rows=64)
    eff, gap = effects(engine, same, enumerate_components(KINDS, LAYERS, HEADS, same.width))
    assert gap.abs().max() == 0
    assert eff.abs().max() < 1e-6


def test_results_do_not_depend_on_batching(loaded, batch):
    assert batch.harmful_mask.sum(1).unique().numel() > 1  # padding is exercised
    comps = enumerate_components(KINDS, LAYERS, HEADS, batch.width)
    wide = PatchEngine(loaded, score_fn, max_rows=10_000).patch(batch, comps)
    narrow = PatchEngine(loaded, score_fn, max_rows=1).patch(batch, comps)
    torch.testing.assert_close(wide, narrow, atol=1e-5, rtol=0)
    assert wide.isfinite().all()


def test_heads_through_output_projection_reproduce_attention_output(loaded, pairs):
    """Sum over heads of z_h @ W_O[:, h].T, plus the bias once, equals the attention block's output.

    For Gemma 2/3 the residual receives post_attention_layernorm(attention), so there the per-head sum is
    checked against the o_proj output (what the norm is applied to) instead of the attn_out hook.
    """
    model, adapter = loaded.model, loaded.adapter
    config = model.config
    n_heads, head_dim = adapter.n_heads(config), adapter.head_dim(config)
    engine = PatchEngine(loaded, score_fn)
    ids = torch.tensor([pairs[0][0]])
    for layer in range(LAYERS):
        o_proj = adapter.o_proj(adapter.layers(model)[layer])
        seen = {}
        handle = o_proj.register_forward_hook(lambda _m, _a, out, seen=seen: seen.update(out=out.detach().clone()))
        try:
            cache = engine.cache(ids, torch.ones_like(ids), [("head", layer), ("attn_out", layer)])
        finally:
            handle.remove()
        z = cache[("head", layer)]
        assert z.shape[-1] == n_heads * head_dim
        weight, bias = projection_weight(o_proj)
        with torch.no_grad():
            total = sum(
                z[..., h * head_dim : (h + 1) * head_dim] @ weight[:, h * head_dim : (h + 1) * head_dim].T
                for h in range(n_heads)
            )
        if bias is not None:
            total = total + bias
        reference = seen["out"] if config.model_type in POST_NORM else cache[("attn_out", layer)]
        torch.testing.assert_close(total, reference, atol=1e-5, rtol=0)
        if config.model_type not in POST_NORM:
            torch.testing.assert_close(cache[("attn_out", layer)], seen["out"], atol=0, rtol=0)


def test_post_ln_opt_has_no_final_norm():
    loaded = build("opt_post_ln")
    with pytest.raises(ModelError, match="post-LN"):
        loaded.adapter.final_norm(loaded.model)
    assert build("opt").adapter.final_norm(build("opt").model) is not None


def test_unknown_model_type_lists_supported_ones():
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA_LIKE))
    model.config.model_type = "no_such_arch"
    with pytest.raises(ModelError) as err:
        get_adapter(model)
    message = str(err.value)
    assert "no_such_arch" in message and "refusal_eval.adapters" in message and "register_adapter" in message
    for name in ("llama", "gemma3_text", "gpt2", "gpt_neox", "opt", "phi3"):
        assert name in message


def renamed_llama_adapter() -> Adapter:
    """What a plugin's entry point loads to (a zero-argument callable returning an Adapter)."""
    return Adapter(
        family="renamed_llama",
        layers=lambda m: m.model.layers,
        attn_out=lambda layer: layer.self_attn,
        mlp_out=lambda layer: layer.mlp,
        o_proj=lambda layer: layer.self_attn.o_proj,
        final_norm=lambda m: m.model.norm,
    )


def test_entry_point_plugin_is_found(monkeypatch):
    real = importlib.metadata.entry_points
    plugin = importlib.metadata.EntryPoint(
        name="renamed_llama", value=f"{__name__}:renamed_llama_adapter", group="refusal_eval.adapters"
    )

    def fake(**kwargs):
        return [plugin] if kwargs.get("group") == "refusal_eval.adapters" else real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA_LIKE)).eval()
    model.config.model_type = "renamed_llama"
    assert "renamed_llama" in adapters_module.supported_architectures()
    adapter = get_adapter(model)
    assert adapter.family == "renamed_llama"
    loaded = LoadedModel(model, None, adapter, "renamed", "random", "float32", "cpu")
    pairs = random_pairs(2, seed=4)
    batch = build_pair_batch(pairs, 0, ["a", "b"])
    eff, gap = effects(PatchEngine(loaded, score_fn), batch, [Component("resid_pre", 0)])
    torch.testing.assert_close(eff[0], gap, atol=1e-4, rtol=0)


def test_broken_plugin_is_a_model_error(monkeypatch):
    plugin = importlib.metadata.EntryPoint(name="broken", value="builtins:len", group="refusal_eval.adapters")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [plugin])
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA_LIKE))
    model.config.model_type = "broken"
    with pytest.raises(ModelError, match="broken"):
        get_adapter(model)


def test_register_adapter_and_layout_check(monkeypatch):
    monkeypatch.setattr(adapters_module, "_ADAPTERS", dict(adapters_module._ADAPTERS))
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=101, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    model.config.model_type = "my_gpt"
    register_adapter("my_gpt", adapters_module._BUILTIN["gpt2"])
    assert get_adapter(model).family == "gpt2"
    register_adapter("my_gpt", renamed_llama_adapter())  # a Llama layout on a GPT-2 model
    with pytest.raises(ModelError, match="does not match"):
        get_adapter(model)
    with pytest.raises(TypeError):
        register_adapter("my_gpt", object())


def test_unsupported_kind_raises_model_error(monkeypatch):
    loaded = build("llama")
    limited = Adapter(**{**loaded.adapter.__dict__, "unsupported": (("mlp_out", "no separable MLP"),)})
    loaded = LoadedModel(loaded.model, None, limited, "limited", "random", "float32", "cpu")
    batch = build_pair_batch(random_pairs(2, seed=4), 0, ["a", "b"])
    engine = PatchEngine(loaded, score_fn)
    engine.patch(batch, [Component("attn_out", 0)])
    with pytest.raises(ModelError, match="no separable MLP"):
        engine.patch(batch, [Component("mlp_out", 0)])


def test_layer_output_is_input_plus_attn_out_plus_mlp_out(loaded, pairs):
    """resid_post = resid_pre + attn_out + mlp_out: the hooked modules are exactly what enters the residual.

    Holds for sequential and parallel (GPT-NeoX) blocks alike; post-LN OPT normalises after each addition.
    """
    engine = PatchEngine(loaded, score_fn)
    ids = torch.tensor([pairs[1][0]])
    points = [(kind, layer) for layer in range(LAYERS) for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    cache = engine.cache(ids, torch.ones_like(ids), points)
    for layer in range(LAYERS):
        pre, post = cache[("resid_pre", layer)], cache[("resid_post", layer)]
        attn, mlp = cache[("attn_out", layer)], cache[("mlp_out", layer)].view(pre.shape)  # OPT fc2 is [B*T, d]
        if loaded.name == "opt_post_ln":
            block = loaded.adapter.layers(loaded.model)[layer]
            with torch.no_grad():
                expected = block.final_layer_norm(block.self_attn_layer_norm(pre + attn) + mlp)
        else:
            expected = pre + attn + mlp
        torch.testing.assert_close(post, expected, atol=1e-5, rtol=0)


def replays_layers(config) -> bool:
    """Families whose tail is final norm + unembedding; Gemma 2/3 soft-cap the logits and post-LN OPT has
    no final norm, so their self-checks send them to full forwards."""
    return not getattr(config, "final_logit_softcapping", None) and getattr(config, "do_layer_norm_before", True)


def test_layer_skip_equals_full_forwards(loaded, batch):
    """Replaying layers from the recorded clean inputs gives the full forward's numbers (or is not used)."""
    comps = enumerate_components(KINDS, LAYERS, HEADS, batch.width)
    fast = PatchEngine(loaded, score_fn, max_rows=17)
    full = PatchEngine(loaded, score_fn, max_rows=17, layer_skip=False)
    torch.testing.assert_close(fast.patch(batch, comps), full.patch(batch, comps), atol=1e-5, rtol=0)
    config = loaded.model.config
    expected = replays_layers(config)
    assert fast._layer_skip is expected, config.model_type


def test_prefix_reuse_equals_full_forwards(loaded):
    """Every family that replays layers also reuses the clean keys/values of the columns before a patch
    (padded and unpadded batches), with the numbers of full forwards."""
    for pairs in (random_pairs(6, seed=1, prefix=3), random_pairs(4, seed=2, min_len=9, max_len=9, prefix=4)):
        batch = build_pair_batch(pairs, 0, [f"p{i}" for i in range(len(pairs))])
        comps = enumerate_components(KINDS, LAYERS, HEADS, batch.width)
        fast = PatchEngine(loaded, score_fn, max_rows=17)
        full = PatchEngine(loaded, score_fn, max_rows=17, layer_skip=False, prefix_reuse=False)
        torch.testing.assert_close(fast.patch(batch, comps), full.patch(batch, comps), atol=1e-5, rtol=0)
        if fast._layer_skip:
            assert fast.work["token_layers"] < 0.7 * full.work["token_layers"], loaded.name


def test_attribution_source_replay_equals_full_source_forward(loaded):
    """Attribution's source side, rebuilt from the target's keys/values before the first difference plus a
    replay of the later columns, gives the numbers of a full source forward (or is not used)."""
    from refusal_eval.patching.attribution import attribute

    batch = build_pair_batch(random_pairs(4, seed=2, min_len=9, max_len=9, prefix=4), 0, list("abcd"))
    comps = enumerate_components([k for k in KINDS if k != "embed"], LAYERS, HEADS, batch.width)
    fast = PatchEngine(loaded, score_fn)
    full = PatchEngine(loaded, score_fn, prefix_reuse=False)
    torch.testing.assert_close(attribute(fast, batch, comps), attribute(full, batch, comps), atol=1e-4, rtol=1e-4)
    config = loaded.model.config
    expected = replays_layers(config)
    assert fast._attribution_prefix is expected, config.model_type


def test_two_branch_tree_equals_one_forward_per_branch(loaded, pairs):
    """An opening tree with two branches reads both second-token distributions from one forward (each branch
    column attends to the prompt and itself): equal to a plain forward of prompt + branch token per branch, in every
    family; a sliding window narrower than the prompt is refused, never silently ignored."""
    from refusal_eval.metrics import Branch, TokenSets, tree_score

    tail = [7, 9]
    tree = TokenSets([1, 2], [3, 4], "test", branches=[Branch(7, [11], [12]), Branch(9, [13], [14, 15])], depth=2)
    engine = PatchEngine(loaded, lambda logits: tree_score(logits, tree), max_rows=64, tail=tail)
    batch = build_pair_batch(pairs, 0, [f"p{i}" for i in range(len(pairs))], tail=tail)
    window = getattr(loaded.model.config, "sliding_window", None)
    if window and batch.width > window:
        with pytest.raises(ModelError, match="sliding-window"):
            engine.baseline(batch)
        return
    harmful, _ = engine.baseline(batch)
    for i, (prompt, _) in enumerate(pairs):
        with torch.no_grad():
            runs = [loaded.model(input_ids=torch.tensor([prompt + [t]])).logits[0] for t in tail]
        logits = torch.stack([runs[0][-2], runs[0][-1], runs[1][-1]])
        assert abs(float(harmful[i]) - float(tree_score(logits[None], tree)[0])) < 1e-4, i
    comps = enumerate_components(KINDS, LAYERS, HEADS, batch.width - len(tail))
    slow = PatchEngine(loaded, engine.score_fn, max_rows=64, tail=tail, layer_skip=False, prefix_reuse=False)
    torch.testing.assert_close(engine.patch(batch, comps, "noise"), slow.patch(batch, comps, "noise"),
                               atol=1e-4, rtol=0)
