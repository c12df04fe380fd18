"""Non-finite training steps: which loss entries (or the gradient) went NaN or infinite, how
many steps were skipped, and when to give up.

What :func:`~densekd.training.loop.run_training` does with a step whose loss dict or gradient norm is
not finite: it skips the update. No optimizer step; the running statistics of the modules being
trained (BatchNorm) are put back as they were before the step, so a NaN batch leaves no trace
in the model. The iteration counter, the LR schedule, the data position and integer counters (a
Distiller's iteration, BatchNorm's ``num_batches_tracked``) advance as for any step: the run
keeps its configured length, weight and LR schedules stay aligned with the iteration, and a
resumed run still ends bitwise where an uninterrupted one ends. Up to
``optim.max_nonfinite_steps`` consecutive steps are skipped; the next one stops training with
:class:`NonFiniteTrainingError`, after a checkpoint of the last good weights.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "GRADIENT",
    "BufferSnapshot",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "agree_across_ranks",
    "gradient_norm",
    "nonfinite_entries",
]

#: the entry reported when every loss is finite but the gradient norm is not
GRADIENT = "grad_norm"


class NonFiniteTrainingError(FloatingPointError):
    """Too many consecutive non-finite steps; a checkpoint of the last good weights is on disk."""

    def __init__(self, message: str, checkpoint: Path, iteration: int, entries: dict[str, int]) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.iteration = iteration
        self.entries = entries  # entry -> steps of the final streak on which it was not finite


def gradient_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients together (0 without any), as ``clip_grad_norm_`` computes it."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in parameters if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def nonfinite_entries(loss_dict: dict[str, torch.Tensor], loss: torch.Tensor, grad_norm: torch.Tensor) -> dict[str, float]:
    """``{}`` for a good step, else entry name -> value: the loss-dict entries that are not
    finite, ``{"loss": value}`` when only their sum overflowed, or ``{GRADIENT: norm}`` when
    every loss is finite but the gradient norm is not."""
    checks = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(()).to(loss.device)])
    if bool(torch.isfinite(checks).all()):  # one device sync for the usual, good step
        return {}
    bad = {
        name: float(value.detach().float().sum())
        for name, value in loss_dict.items()
        if not bool(torch.isfinite(value.detach()).all())
    }
    if bad:
        return bad
    total = float(loss.detach())
    if not math.isfinite(total):
        return {"loss": total}
    return {GRADIENT: float(grad_norm.detach())}


def agree_across_ranks(entries: dict[str, float], device: torch.device) -> dict[str, float]:
    """Every rank's non-finite entries, merged, on every rank, so that all ranks skip the same
    steps (a collective under torch.distributed; called after backward, on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return entries
    flag = torch.tensor([1.0 if entries else 0.0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return {}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, entries)
    merged: dict[str, float] = {}
    for rank_entries in gathered:
        for name, value in rank_entries.items():
            merged.setdefault(name, value)
    if len(merged) > 1:  # the averaged gradient is non-finite because some rank's loss was
        merged.pop(GRADIENT, None)
    return merged


class BufferSnapshot:
    """The floating-point buffers that a training forward changes (BatchNorm running
    statistics of the modules in training mode), copied before each step and put back when the
    step is skipped. Integer buffers are counters and advance; the buffers of modules in eval
    mode (a Distiller's teachers, which it updates itself for EMA or snapshot teachers) are left
    alone. Build it after ``model.train()``."""

    def __init__(self, model: nn.Module) -> None:
        found: dict[int, torch.Tensor] = {}
        for module in model.modules():
            if module.training:
                found.update({id(b): b for b in module.buffers(recurse=False) if b.is_floating_point()})
        self.buffers = list(found.values())
        self.saved = [torch.empty_like(b) for b in self.buffers]

    def take(self) -> None:
        for saved, buffer in zip(self.saved, self.buffers):
            saved.copy_(buffer)

    def restore(self) -> None:
        for saved, buffer in zip(self.saved, self.buffers):
            buffer.copy_(saved)


def _describe(entries: dict[str, float]) -> str:
    if set(entries) == {GRADIENT}:
        return f"every loss is finite but the gradient norm is {entries[GRADIENT]}"
    return "non-finite " + ", ".join(f"{name}={value}" for name, value in entries.items())


class NonFiniteGuard:
    """Counts skipped steps (in total, per entry, and in the current streak) and decides when
    to stop: after more than ``max_consecutive`` skipped steps in a row (0: at the first)."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.total = 0
        self.by_entry: dict[str, int] = {}
        self.consecutive = 0
        self.streak_start = 0  # iteration of the streak's first skipped step
        self.streak: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_entry": dict(self.by_entry), "consecutive": self.consecutive,
                "streak_start": self.streak_start, "streak": dict(self.streak)}  # fmt: skip

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """``None`` (a checkpoint written before skips were counted) means nothing skipped."""
        state = state or {}
        self.total = int(state.get("total", 0))
        self.by_entry = {str(k): int(v) for k, v in state.get("by_entry", {}).items()}
        self.consecutive = int(state.get("consecutive", 0))
        self.streak_start = int(state.get("streak_start", 0))
        self.streak = {str(k): int(v) for k, v in state.get("streak", {}).items()}

    def good_step(self) -> None:
        self.consecutive, self.streak = 0, {}

    def skipped_step(self, iteration: int, entries: dict[str, float]) -> None:
        """``iteration``: the 1-based number of the skipped step."""
        if self.consecutive == 0:
            self.streak_start = iteration
        self.consecutive += 1
        self.total += 1
        for name in entries:
            self.by_entry[name] = self.by_entry.get(name, 0) + 1
            self.streak[name] = self.streak.get(name, 0) + 1

    @property
    def should_stop(self) -> bool:
        return self.consecutive > self.max_consecutive

    def summary(self) -> dict[str, Any]:
        return {"skipped_steps": self.total, "skipped_by_entry": dict(self.by_entry)}

    def skip_line(self, iteration: int, iterations: int, entries: dict[str, float]) -> str:
        return (
            f"  it {iteration:>5d}/{iterations}  skipped the step: {_describe(entries)} "
            f"({self.consecutive} in a row, {self.total} in total; more than {self.max_consecutive} "
            "in a row stop training)"
        )

    def skip_record(self, iteration: int, entries: dict[str, float]) -> dict[str, Any]:
        """A JSONL record; values as strings ("nan", "inf"), which JSON cannot hold as numbers."""
        return {
            "iteration": iteration,
            "event": "skipped_nonfinite_step",
            "nonfinite": {name: repr(value) for name, value in entries.items()},
            "consecutive": self.consecutive,
            "skipped_steps": self.total,
        }

    def stop_error(self, name: str, iteration: int, iterations: int, checkpoint: Path) -> NonFiniteTrainingError:
        streak = ", ".join(
            ("the gradient norm (every loss finite)" if entry == GRADIENT else entry) + f" on {count} step(s)"
            for entry, count in self.streak.items()
        )
        first = self.streak_start
        steps = f"iteration {first}" if first == iteration else f"iterations {first}-{iteration}"
        message = (
            f"{name}: stopped at iteration {iteration}/{iterations} after {self.consecutive} consecutive steps with "
            f"non-finite values ({steps}; non-finite: {streak}), more than optim.max_nonfinite_steps="
            f"{self.max_consecutive}. The weights of the last good step are saved in {checkpoint}. Fix: lower optim.lr "
            "or the kd term weights, clip gradients (optim.clip_grad_norm), or check the training data around these "
            "iterations; then start over, or resume (e.g. --resume) after changing only the kd weights or "
            "optim.max_nonfinite_steps (other optim changes refuse to resume)."
        )
        return NonFiniteTrainingError(message, checkpoint, iteration, dict(self.streak))
