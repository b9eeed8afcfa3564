"""Model loading and architecture adapters (the only model-touching code outside patching/)."""

from refusal_eval.models.adapters import Adapter, get_adapter, register_adapter, supported_architectures
from refusal_eval.models.loading import LoadedModel, load_model, shipped_model_path

__all__ = [
    "Adapter",
    "LoadedModel",
    "get_adapter",
    "load_model",
    "register_adapter",
    "shipped_model_path",
    "supported_architectures",
]
