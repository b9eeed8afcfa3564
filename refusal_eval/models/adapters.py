"""Architecture adapters: where embeddings, layers, attention, heads and MLPs live in a HF model.

We hook the original ``transformers`` modules (no weight conversion). Every component is reached
through one of four hook points per layer, named as in TransformerLens so results cross-reference:

- ``blocks.{L}.hook_resid_pre``  the residual stream entering layer L (input of the decoder layer)
- ``blocks.{L}.hook_attn_out``   the attention block's output added to the residual stream
- ``blocks.{L}.hook_mlp_out``    the MLP block's output added to the residual stream
- ``blocks.{L}.attn.hook_z``     per-head attention output, the input of the output projection
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from refusal_eval.errors import ModelError


@dataclass(frozen=True)
class Adapter:
    """Locates hookable modules of one architecture family."""

    family: str
    layers: Callable[[nn.Module], nn.ModuleList]
    attn: Callable[[nn.Module], nn.Module]  # layer -> attention module whose output[0] is attn_out
    o_proj: Callable[[nn.Module], nn.Module]  # layer -> output projection (its input is hook_z)
    mlp: Callable[[nn.Module], nn.Module]  # layer -> MLP module whose output is mlp_out
    final_norm: Callable[[nn.Module], nn.Module]

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))


def _llama_like(family: str) -> Adapter:
    return Adapter(
        family=family,
        layers=lambda m: m.model.layers,
        attn=lambda layer: layer.self_attn,
        o_proj=lambda layer: layer.self_attn.o_proj,
        mlp=lambda layer: layer.mlp,
        final_norm=lambda m: m.model.norm,
    )


# model_type (config.model_type) -> adapter. Llama-family layout first; other families in later work.
_ADAPTERS: dict[str, Adapter] = {name: _llama_like(name) for name in ("llama", "mistral")}


def supported_architectures() -> list[str]:
    """Model types (``config.model_type``) an adapter exists for."""
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module) -> Adapter:
    """Return the adapter for a loaded HF causal LM, or raise a ModelError listing what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise ModelError(
            f"no adapter for architecture '{model_type}'. Supported: {', '.join(supported_architectures())}. "
            "An adapter is a few lines in refusal_eval/models/adapters.py naming the layer list, attention, "
            "output projection, MLP and final norm modules."
        )
    return _ADAPTERS[model_type]
