"""Shared fixtures: random-weight tiny Llama models and token-level pair batches (no downloads)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from refusal_eval.metrics import refusal_score
from refusal_eval.models.adapters import get_adapter
from refusal_eval.models.loading import LoadedModel
from refusal_eval.patching import PatchEngine, build_pair_batch

# Tiny models run fastest on one thread, and a second thread only contends with other work on 2-core CI. Every
# child process a test starts (the CLI, the README's commands) inherits one thread too: beside the other xdist
# worker, a child's two OpenMP threads made a tiny model's forwards many times slower (the README examples took
# minutes instead of seconds). Tests that need another count set it themselves (test_distributed, test_reliability).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

REFUSAL_IDS = torch.tensor([1, 2])
COMPLIANCE_IDS = torch.tensor([3, 4])


# The files that take minutes (measured with --durations on 2 cores), run first: with `--dist loadfile` a worker takes
# whole files in collection order, and a long file collected last (test_real_model.py) kept one worker busy for
# minutes after the other had finished. Only the order changes; every test still runs.
LONG_FILES = ("test_readme.py", "test_real_model.py", "test_reliability.py", "test_planted.py", "test_distributed.py",
              "test_controls.py", "test_false_positives.py", "test_resume.py", "test_organisms.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order inside each file, and among the other files, is kept


@pytest.fixture(autouse=True)
def one_thread_after_each_test():
    """Back to one thread, and to torch's default (non-deterministic) algorithms, after every test: the in-process
    trainers (scripts/plant_refusal.py, train_tiny_refuser.py) set 2 threads and deterministic algorithms globally,
    and a later test in the same xdist worker would otherwise run on 2 threads beside the other worker (slow, and a
    multi-threaded backward sums in a varying order)."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    if torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)


def default_signals() -> None:
    """``preexec_fn`` for a child that a test signals: SIGINT and SIGTERM at their default dispositions, whatever
    the shell that started pytest set (a background job or ``nohup`` ignores SIGINT, and children inherit that)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def score_fn(logits: torch.Tensor) -> torch.Tensor:
    return refusal_score(logits, REFUSAL_IDS, COMPLIANCE_IDS)


def random_llama(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2) -> LoadedModel:
    """A random-weight Llama (GQA) wrapped as a LoadedModel; tokenizer-free (token ids are built directly)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, None, get_adapter(model), "random-llama", "random", "float32", "cpu")


def random_pairs(n: int = 6, seed: int = 1, min_len: int = 5, max_len: int = 11, prefix: int = 2):
    """Token-id pairs of varied length; each pair differs in one token after a shared prefix."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        harmful = torch.randint(5, 97, (length,), generator=gen).tolist()
        benign = list(harmful)
        k = int(torch.randint(prefix, length - 1, (1,), generator=gen))
        benign[k] = 5 + (harmful[k] - 5 + 7) % 92
        pairs.append((harmful, benign))
    return pairs


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return random_llama()


@pytest.fixture(scope="module")
def pairs():
    return random_pairs()


@pytest.fixture(scope="module")
def batch(pairs):
    return build_pair_batch(pairs, 0, [f"p{i}" for i in range(len(pairs))])


@pytest.fixture(scope="module")
def engine(llama) -> PatchEngine:
    return PatchEngine(llama, score_fn, max_rows=64)
