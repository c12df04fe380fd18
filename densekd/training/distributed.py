"""Data-parallel training under ``torchrun``: the process group, ranks, the DDP wrapper and
what the ranks must agree on (stopping, RNG states, BatchNorm statistics)."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoints import rng_state


def init_distributed() -> tuple[int, int]:
    """``(rank, world_size)``. Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set)
    initialise the default process group -- NCCL with one GPU per local rank when CUDA is
    available, else gloo on CPU -- once; otherwise a no-op returning ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("Launched by torchrun, but this torch build has no torch.distributed.")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", init_method="env://")
    else:
        dist.init_process_group("gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True outside distributed training and on rank 0 inside it."""
    return not is_distributed() or dist.get_rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gathered_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective under DDP)."""
    state = rng_state()
    if not is_distributed():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def rank_and_world_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when a process group runs, else ``model`` itself."""
    if not is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # A Distiller's connectors get no gradient while its kd warm-up lasts.
        find_unused_parameters=getattr(model, "warmup_iters", 0) > 0,
    )


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (a collective under DDP)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def share_rank0_buffers(model: nn.Module) -> None:
    """DDP syncs buffers (BatchNorm statistics) at the start of a forward; after the last one
    each rank holds its own. Give every rank rank 0's, the ones in the checkpoint."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
