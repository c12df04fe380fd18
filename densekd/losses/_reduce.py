"""Reduction and input checks shared by every loss in ``densekd.losses``."""

from typing import Optional

import torch


def _weighted_mean(loss: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalized weighted mean ``sum(w * l) / sum(w)`` of an unreduced loss.

    Args:
        loss: per-element (or per-sample) loss, any shape.
        weights: non-negative, broadcastable to ``loss.shape``; ``None`` gives the plain mean.
            Treated as constants (detached): they are often derived from the teacher.

    Dividing by ``sum(w)`` makes the result independent of the weights' overall scale, so class
    weights with mean 1 and teacher-confidence weights are both scale-neutral. Empty losses and
    all-zero weights give a zero that keeps the graph instead of NaN.
    """
    if loss.numel() == 0:
        return loss.sum() * 0.0
    if weights is None:
        return loss.mean()
    w = torch.broadcast_to(torch.as_tensor(weights, device=loss.device).detach().to(loss.dtype), loss.shape)
    # The smallest normal float keeps an all-zero weight sum at 0 / tiny = 0, without biasing real sums.
    return (w * loss).sum() / w.sum().clamp_min(torch.finfo(loss.dtype).tiny)


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str = "tensors") -> None:
    """Raise ValueError naming both shapes when student and teacher shapes differ."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} must have the same shape, got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}; project the student first (e.g. a 1x1 conv connector)"
        )
