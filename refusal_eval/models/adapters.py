"""Architecture adapters: where the layers, attention, heads and MLPs of a HF decoder live.

We hook the original ``transformers`` modules (no weight conversion). Every component is reached through
one of five hook points per layer, named as in TransformerLens so results cross-reference:

- ``blocks.{L}.hook_resid_pre``   the residual stream entering layer L (input of the decoder layer)
- ``blocks.{L}.hook_attn_out``    what the attention block adds to the residual stream
- ``blocks.{L}.hook_mlp_out``     what the MLP block adds to the residual stream
- ``blocks.{L}.attn.hook_z``      per-head attention outputs, concatenated: the input of the output projection
- ``blocks.{L}.hook_resid_post``  the residual stream leaving layer L (output of the decoder layer)

An :class:`Adapter` names, for one architecture family, the module behind each point. The decoder layer
of every built-in family computes (dropout is the identity in eval mode)::

    resid_post = resid_pre + attn_out + mlp_out

where ``attn_out`` is the output (``output[0]`` for a tuple) of ``adapter.attn_out(layer)`` and ``mlp_out``
the output of ``adapter.mlp_out(layer)``; sequential blocks feed ``resid_pre + attn_out`` to the MLP,
GPT-NeoX's parallel residual feeds ``resid_pre`` to both. Post-LN OPT (``do_layer_norm_before=False``,
OPT-350m) normalises after each addition, so there ``attn_out``/``mlp_out`` are what is added *before* the
layer norm. OPT's ``fc2`` sees tokens flattened to ``[batch * seq, d_model]``.

Built-in model types: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, gpt2, gpt_neox, opt.

Adding an architecture
----------------------
Either call :func:`register_adapter` before loading the model, or ship the adapter in your own package and
declare it in the entry-point group ``refusal_eval.adapters``; the entry point's name is the model type
(``config.model_type``) and it must load to an :class:`Adapter` or to a zero-argument callable returning
one. In the plugin's ``pyproject.toml``::

    [project.entry-points."refusal_eval.adapters"]
    my_model_type = "my_package.adapters:my_adapter"

Adapters registered with :func:`register_adapter` take precedence over entry points, which are only
consulted for model types without a registered adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from torch import nn
from transformers.pytorch_utils import Conv1D

from refusal_eval.errors import ModelError

ENTRY_POINT_GROUP = "refusal_eval.adapters"


@dataclass(frozen=True)
class Adapter:
    """Locates the hookable modules of one architecture family.

    ``layers(model)``: the decoder layers; ``resid_pre``/``resid_post`` are their input/output.
    ``attn_out(layer)``: module whose output (or ``output[0]``) is exactly what attention adds to the residual.
    ``mlp_out(layer)``: module whose output is exactly what the MLP adds to the residual.
    ``o_proj(layer)``: attention output projection; its *input* is the concatenation of per-head outputs
    (``hook_z``, width ``n_heads * head_dim``, head-major).
    ``final_norm(model)``: the norm applied to the last layer's output before the unembedding.
    ``unsupported``: ``(kind, reason)`` pairs for kinds this family cannot patch exactly; asking for one
    raises a ModelError with the reason.
    """

    family: str
    layers: Callable[[nn.Module], nn.ModuleList]
    attn_out: Callable[[nn.Module], nn.Module]
    mlp_out: Callable[[nn.Module], nn.Module]
    o_proj: Callable[[nn.Module], nn.Module]
    final_norm: Callable[[nn.Module], nn.Module]
    unsupported: tuple[tuple[str, str], ...] = ()

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def n_heads(self, config) -> int:
        """Number of query heads (``hook_z`` holds this many slices)."""
        return int(config.num_attention_heads)

    def head_dim(self, config) -> int:
        """Width of one head's slice of ``hook_z``: ``config.head_dim`` where set (Gemma, Qwen3), else d/heads."""
        explicit = getattr(config, "head_dim", None)
        return int(explicit) if explicit else int(config.hidden_size) // self.n_heads(config)

    def require(self, kind: str) -> None:
        """Raise a ModelError if this family cannot patch ``kind`` exactly."""
        reason = dict(self.unsupported).get(kind)
        if reason is not None:
            raise ModelError(f"{self.family}: cannot patch '{kind}' exactly: {reason}")


def projection_weight(module: nn.Module) -> tuple:
    """(weight [out, in], bias or None) of a Linear or GPT-2 Conv1D, so ``y = x @ weight.T + bias``."""
    if isinstance(module, Conv1D):
        return module.weight.T, module.bias
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    raise ModelError(f"output projection {type(module).__name__} is neither nn.Linear nor Conv1D")


def projection_in_features(module: nn.Module) -> int:
    """Input width of a Linear or Conv1D (the width of ``hook_z``)."""
    return int(projection_weight(module)[0].shape[1])


def _llama_like(family: str) -> Adapter:
    """Llama, Mistral, Qwen2/3, Gemma 1, Phi-3: ``x + self_attn(norm(x))``, then ``+ mlp(norm(.))``."""
    return Adapter(
        family=family,
        layers=lambda m: m.model.layers,
        attn_out=lambda layer: layer.self_attn,
        mlp_out=lambda layer: layer.mlp,
        o_proj=lambda layer: layer.self_attn.o_proj,
        final_norm=lambda m: m.model.norm,
    )


def _gemma2_like(family: str) -> Adapter:
    """Gemma 2/3 ("sandwich" norms): the residual gets ``post_attention_layernorm(attn)`` and
    ``post_feedforward_layernorm(mlp)``, so those norms' outputs are attn_out/mlp_out."""
    return Adapter(
        family=family,
        layers=lambda m: m.model.layers,
        attn_out=lambda layer: layer.post_attention_layernorm,
        mlp_out=lambda layer: layer.post_feedforward_layernorm,
        o_proj=lambda layer: layer.self_attn.o_proj,
        final_norm=lambda m: m.model.norm,
    )


def _gpt2() -> Adapter:
    """GPT-2: ``x + attn(ln_1(x))`` (attn ends with c_proj and resid_dropout), then ``+ mlp(ln_2(.))``."""
    return Adapter(
        family="gpt2",
        layers=lambda m: m.transformer.h,
        attn_out=lambda layer: layer.attn,
        mlp_out=lambda layer: layer.mlp,
        o_proj=lambda layer: layer.attn.c_proj,
        final_norm=lambda m: m.transformer.ln_f,
    )


def _gpt_neox() -> Adapter:
    """GPT-NeoX/Pythia: parallel ``x + attention(ln1(x)) + mlp(ln2(x))`` or sequential; the dropouts
    after attention and MLP sit outside these modules and are the identity in eval mode."""
    return Adapter(
        family="gpt_neox",
        layers=lambda m: m.gpt_neox.layers,
        attn_out=lambda layer: layer.attention,
        mlp_out=lambda layer: layer.mlp,
        o_proj=lambda layer: layer.attention.dense,
        final_norm=lambda m: m.gpt_neox.final_layer_norm,
    )


def _opt_final_norm(model: nn.Module) -> nn.Module:
    norm = model.model.decoder.final_layer_norm
    if norm is None:
        raise ModelError(
            "this OPT model is post-LN (do_layer_norm_before=False): it has no final norm; each layer's output "
            "is already normalised and goes through project_out (if any) to the unembedding"
        )
    return norm


def _opt() -> Adapter:
    """OPT: no MLP module; the MLP's contribution is ``fc2``'s output (tokens flattened to [B*T, d])."""
    return Adapter(
        family="opt",
        layers=lambda m: m.model.decoder.layers,
        attn_out=lambda layer: layer.self_attn,
        mlp_out=lambda layer: layer.fc2,
        o_proj=lambda layer: layer.self_attn.out_proj,
        final_norm=_opt_final_norm,
    )


_BUILTIN: dict[str, Adapter] = {
    **{name: _llama_like(name) for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")},
    **{name: _gemma2_like(name) for name in ("gemma2", "gemma3_text")},
    "gpt2": _gpt2(),
    "gpt_neox": _gpt_neox(),
    "opt": _opt(),
}

# model_type (config.model_type) -> adapter: the built-ins plus whatever register_adapter added.
_ADAPTERS: dict[str, Adapter] = dict(_BUILTIN)


def register_adapter(model_type: str, adapter: Adapter) -> None:
    """Register (or replace) the adapter used for models whose ``config.model_type`` is ``model_type``."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter needs an Adapter, not {type(adapter).__name__}")
    _ADAPTERS[model_type] = adapter


def _entry_points() -> dict:
    """Entry points of the ``refusal_eval.adapters`` group by name (looked up on each call, not loaded)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(ep) -> Adapter:
    try:
        obj = ep.load()
        adapter = obj if isinstance(obj, Adapter) else obj() if callable(obj) else obj
    except Exception as exc:  # a broken plugin must not look like an unsupported architecture
        raise ModelError(f"adapter plugin '{ep.name}' ({ep.value}) in group {ENTRY_POINT_GROUP} failed: {exc}") from exc
    if not isinstance(adapter, Adapter):
        raise ModelError(
            f"adapter plugin '{ep.name}' ({ep.value}) gave {type(adapter).__name__}; it must load to an Adapter "
            "or a zero-argument callable returning one"
        )
    return adapter


def supported_architectures() -> list[str]:
    """Model types (``config.model_type``) an adapter exists for, built-in, registered or plugged in."""
    return sorted(set(_ADAPTERS) | set(_entry_points()))


def _check_layout(adapter: Adapter, model: nn.Module, model_type: str) -> None:
    """Fail early, with a clear message, when an adapter does not fit the model it is given."""
    try:
        layer = adapter.layers(model)[0]
        for locate in (adapter.attn_out, adapter.mlp_out):
            locate(layer)
        width = projection_in_features(adapter.o_proj(layer))
    except (AttributeError, IndexError, TypeError) as exc:
        raise ModelError(
            f"adapter '{adapter.family}' does not match the structure of this '{model_type}' model: {exc}"
        ) from exc
    expected = adapter.n_heads(model.config) * adapter.head_dim(model.config)
    if width != expected:
        raise ModelError(
            f"adapter '{adapter.family}': the output projection takes {width} features but n_heads * head_dim "
            f"= {expected}; per-head slices would be wrong"
        )


def get_adapter(model: nn.Module) -> Adapter:
    """Return the adapter for a loaded HF causal LM, or raise a ModelError listing what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        plugin = _entry_points().get(model_type)
        if plugin is None:
            raise ModelError(
                f"no adapter for architecture '{model_type}'. Supported: {', '.join(supported_architectures())}. "
                "To add one, build an Adapter (refusal_eval.models.adapters) naming the decoder layers, the modules "
                "whose outputs are added to the residual stream (attn_out, mlp_out), the attention output "
                "projection and the final norm; then call register_adapter(model_type, adapter) or declare it in "
                f"the '{ENTRY_POINT_GROUP}' entry-point group of your package (name = model_type)."
            )
        adapter = _load_entry_point(plugin)
    _check_layout(adapter, model, model_type)
    return adapter
