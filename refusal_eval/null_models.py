"""Random-weight chat models for false-positive checks: no refusal circuit exists in them, so an audit that
reports one is wrong.

Each model has the shipped tiny-refuser's tokenizer and chat template (so prompts are formatted exactly as for a
real chat model) and freshly initialised weights of a small config of one architecture. Used by
``benchmarks/null_models.py`` (the false-positive table in BENCHMARKS.md) and by the tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

from refusal_eval.models.loading import shipped_model_path

ARCHITECTURES = ("llama", "qwen2", "gpt_neox")


def _config(architecture: str, vocab: int, layers: int, hidden: int, init_range: float | None):
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    if init_range is not None:
        common["initializer_range"] = init_range
    if architecture == "llama":
        return LlamaConfig(intermediate_size=2 * hidden, num_key_value_heads=2, **common)
    if architecture == "qwen2":
        return Qwen2Config(intermediate_size=2 * hidden, num_key_value_heads=2, **common)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(intermediate_size=2 * hidden, **common)
    raise ValueError(f"unknown architecture '{architecture}'; choose from {', '.join(ARCHITECTURES)}")


def save_random_chat_model(folder: str | Path, architecture: str = "llama", seed: int = 0, layers: int = 4,
                           hidden: int = 128, init_range: float | None = None) -> Path:
    """Write a random-weight model of ``architecture`` with the tiny-refuser's tokenizer to ``folder``
    (``init_range``: the weights' initializer_range; None = the architecture's default, 0.02)."""
    folder = Path(folder)
    source = shipped_model_path()
    vocab = AutoConfig.from_pretrained(source).vocab_size
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(architecture, vocab, layers, hidden, init_range)).eval()
    model.save_pretrained(folder)
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, folder / f.name)
    return folder
