"""One optimisation step, and how its batch reaches the model's device."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from .nonfinite import gradient_norm, nonfinite_entries


def training_step(
    model: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    parameters: list[nn.Parameter],
    clip_grad_norm: Optional[float],
    autocast: Callable[[], Any] = contextlib.nullcontext,
    agree: Callable[[dict[str, float]], dict[str, float]] = lambda entries: entries,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """Forward (under ``autocast``), backward, clip, then the optimizer step unless a loss entry
    or the gradient norm is not finite; the scheduler steps either way (see
    :mod:`densekd.training.nonfinite`). ``agree`` merges the ranks' verdicts under DDP. Returns
    ``(loss_dict, loss, nonfinite)``: ``nonfinite`` is empty for a step that was taken, else
    names the entries (or :data:`~densekd.training.nonfinite.GRADIENT`) that were not finite."""
    with autocast():
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # on every rank, finite or not: DDP all-reduces gradients inside backward
    if clip_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
    else:
        grad_norm = gradient_norm(parameters)
    nonfinite = agree(nonfinite_entries(loss_dict, loss, grad_norm))
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the LR schedule follows the iteration, stepped or not
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()
    else:
        optimizer.step()
        scheduler.step()
    return loss_dict, loss, nonfinite


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors, possibly inside lists, tuples and dicts (a detection batch's images and
    targets, a segmentation batch's stacked tensors), moved to ``device``; the rest as is."""
    if device.type == "cpu":
        return batch
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def loader_seed(sampler: Any, epoch: int) -> int:
    """Seed of the loader's own generator (worker seeds), so the loader never draws from the
    global torch RNG: a resumed run must see the global RNG exactly as the checkpoint left it."""
    return (int(getattr(sampler, "seed", 0)) * 1_000_003 + epoch) % (2**63)
