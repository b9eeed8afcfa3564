"""Sharded audits with ``torch.distributed``: ``torchrun --nproc-per-node N -m refusal_eval run ...``.

Every process runs the whole audit pipeline (its inputs, replies, scores and statistics are deterministic, so all
processes hold the same values), except the patching itself: :class:`~refusal_eval.patching.exact.PatchEngine`
plans its batched forwards exactly as one process would, each process runs every ``world``-th of them, and the
patched scores are gathered into every process before anything reads them. The report is therefore the one a
single process writes (same batching, hence the same floating-point results), and only process 0 prints and writes.

Backends: ``gloo`` on CPU, ``nccl`` on CUDA (each process on the GPU of its ``LOCAL_RANK``). torchrun sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address; a plain run (no ``WORLD_SIZE`` or 1) is not
distributed and touches nothing here.
"""

from __future__ import annotations

import os
from typing import Any

from refusal_eval.errors import ConfigError


def launched_world_size() -> int:
    """Processes torchrun started (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init(device: str) -> None:
    """Join the process group torchrun describes (``gloo`` for ``cpu``, ``nccl`` for ``cuda``)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def gather(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order (the value alone when not distributed)."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return [value]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, value)
    return out


def agree_min(value: int) -> int:
    """The smallest ``value`` over the processes (e.g. rows per forward sized from each one's free memory), so
    that every process plans the same batches."""
    return min(gather(value))


def check_options(args) -> None:
    """Options a sharded run cannot honour, refused before any work (exit 2)."""
    if getattr(args, "resume", False):
        raise ConfigError("--resume is not available under torchrun: run the sharded audit again, or resume it in "
                          "one process (refusal-eval run --resume ...)")
    if getattr(args, "circuit", False):
        raise ConfigError("--circuit is not available under torchrun: run `refusal-eval circuit REPORT.json` "
                          "after the sharded audit")
