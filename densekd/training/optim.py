"""A training phase's optimizer and learning-rate schedule, from its :class:`OptimSettings`."""
from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .._names import unknown_name_message

OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "step")


@dataclass
class OptimSettings:
    """What the loop needs to optimise: steps, optimizer, LR schedule, clipping, precision."""

    iterations: int = 300
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_iters: int = 50
    lr_schedule: str = "cosine"  # cosine | step
    lr_milestones: list = dataclasses.field(default_factory=list)  # step schedule, in iterations
    lr_gamma: float = 0.1
    clip_grad_norm: Optional[float] = 10.0
    amp: bool = False  # CUDA only
    max_nonfinite_steps: int = 5  # consecutive NaN/inf steps skipped before training stops (0: stop at the first)


def warmup_cosine(iterations: int, warmup_iters: int):
    """LR multiplier at step ``i``: linear 1/(w+1) -> 1 over ``warmup_iters``, then cosine 1 -> 0."""

    def factor(step: int) -> float:
        if step < warmup_iters:
            return (step + 1) / (warmup_iters + 1)
        progress = (step - warmup_iters) / max(1, iterations - warmup_iters)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_step(warmup_iters: int, milestones: Iterable[int], gamma: float):
    """LR multiplier at step ``i`` (steps done): linear 1/(w+1) -> 1 over ``warmup_iters``, times
    ``gamma`` for every milestone ``m <= i`` (as ``MultiStepLR``: from step ``m`` on)."""
    milestones = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        warm = (step + 1) / (warmup_iters + 1) if step < warmup_iters else 1.0
        return warm * gamma ** bisect_right(milestones, step)

    return factor


def build_lr_lambda(optim: OptimSettings) -> Callable[[int], float]:
    """The LR multiplier of ``optim.lr_schedule`` ("cosine" or "step"), for ``LambdaLR``."""
    if optim.lr_schedule == "cosine":
        return warmup_cosine(optim.iterations, optim.warmup_iters)
    if optim.lr_schedule == "step":
        return warmup_step(optim.warmup_iters, optim.lr_milestones, optim.lr_gamma)
    raise ValueError(unknown_name_message("lr_schedule", optim.lr_schedule, LR_SCHEDULES))


def build_optimizer(parameters: list[nn.Parameter], optim: OptimSettings) -> torch.optim.Optimizer:
    """AdamW or SGD (with ``optim.momentum``) over ``parameters``."""
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    raise ValueError(unknown_name_message("optimizer", optim.optimizer, OPTIMIZERS))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A Distiller's ``trainable_parameters()`` (student + connectors), else every parameter with grad."""
    if hasattr(model, "trainable_parameters"):
        return list(model.trainable_parameters())
    return [p for p in model.parameters() if p.requires_grad]
