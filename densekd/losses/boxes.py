"""Distillation losses on box regression: encoded deltas and decoded boxes.

Every function returns an unweighted scalar; teacher tensors are detached inside.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._reduce import _check_same_shape, _weighted_mean

DELTA_KINDS = ("l1", "l2", "smooth_l1")


def _check_boxes(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    _check_same_shape(student, teacher, what)
    if student.dim() < 1 or student.shape[-1] != 4:
        raise ValueError(f"{what} must have shape (..., 4), got {tuple(student.shape)}")


def delta_regression_kd(
    student_deltas: torch.Tensor,
    teacher_deltas: torch.Tensor,
    kind: str = "l1",
    beta: float = 1.0 / 9.0,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Imitate the teacher's encoded box deltas (teacher outputs as regression targets).

    Chen, Choi, Yu, Han & Chandraker, 2017, "Learning Efficient Object Detection Models with
    Knowledge Distillation" (NeurIPS) discuss the teacher's regression output as a target and
    bound it instead, because the teacher's boxes can point the wrong way (see
    ``teacher_bounded_regression``). This is the plain, unbounded imitation: per box, the L1 /
    squared L2 / smooth L1 distance summed over the 4 coordinates, then the (weighted) mean over
    boxes.

    Args:
        student_deltas: (..., 4), e.g. RoI deltas of the matched class (R, 4) or dense (N, HWA, 4).
        teacher_deltas: (..., 4), same shape.
        kind: "l1", "l2" (squared error) or "smooth_l1".
        beta: smooth L1 transition point (torchvision's RoI heads use 1/9); only for "smooth_l1".
        weights: shape ``deltas.shape[:-1]`` (one weight per box), or None.
    """
    if kind not in DELTA_KINDS:
        raise ValueError(
            f"unknown kind {kind!r} for delta_regression_kd; valid kinds: {', '.join(DELTA_KINDS)}"
        )
    _check_boxes(student_deltas, teacher_deltas, "deltas")
    teacher_deltas = teacher_deltas.detach()
    if kind == "l1":
        per_coord = (student_deltas - teacher_deltas).abs()
    elif kind == "l2":
        per_coord = (student_deltas - teacher_deltas).pow(2)
    else:
        per_coord = F.smooth_l1_loss(student_deltas, teacher_deltas, reduction="none", beta=beta)
    return _weighted_mean(per_coord.sum(dim=-1), weights)  # (..., 4) -> (...,)


def delta_l1_kd(student_deltas, teacher_deltas, weights=None):
    """``delta_regression_kd`` with ``kind="l1"``: deltas (..., 4), weights (...) or None."""
    return delta_regression_kd(student_deltas, teacher_deltas, kind="l1", weights=weights)


def delta_l2_kd(student_deltas, teacher_deltas, weights=None):
    """``delta_regression_kd`` with ``kind="l2"``: deltas (..., 4), weights (...) or None."""
    return delta_regression_kd(student_deltas, teacher_deltas, kind="l2", weights=weights)


def delta_smooth_l1_kd(student_deltas, teacher_deltas, beta=1.0 / 9.0, weights=None):
    """``delta_regression_kd`` with ``kind="smooth_l1"``: deltas (..., 4), weights (...) or None."""
    return delta_regression_kd(student_deltas, teacher_deltas, kind="smooth_l1", beta=beta, weights=weights)


def teacher_bounded_regression(
    student_deltas: torch.Tensor,
    teacher_deltas: torch.Tensor,
    target_deltas: torch.Tensor,
    margin: float = 0.0,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Teacher bounded regression loss.

    Chen, Choi, Yu, Han & Chandraker, 2017, "Learning Efficient Object Detection Models with
    Knowledge Distillation" (NeurIPS): per box
    ``||R_s - y||^2 if ||R_s - y||^2 + m > ||R_t - y||^2 else 0``: the student is only pushed
    towards the ground truth while it is not better than the teacher by the margin ``m``.

    Note: this is NOT zero when student == teacher (for margin > 0); it is then the student's own
    squared L2 regression error. That is the paper's definition: the teacher is an upper bound on
    the student's error, not a target. With margin == 0 the strict inequality makes it 0 there.

    Args:
        student_deltas: (..., 4) encoded deltas, e.g. (R, 4) for positive RoIs.
        teacher_deltas: (..., 4).
        target_deltas: (..., 4) ground-truth deltas ``y``.
        margin: ``m`` >= 0.
        weights: shape ``deltas.shape[:-1]``, or None.
    """
    _check_boxes(student_deltas, teacher_deltas, "deltas")
    _check_same_shape(student_deltas, target_deltas, "deltas (student vs target)")
    target_deltas = target_deltas.detach()
    student_error = (student_deltas - target_deltas).pow(2).sum(dim=-1)  # (...,)
    teacher_error = (teacher_deltas.detach() - target_deltas).pow(2).sum(dim=-1)  # (...,)
    # Only boxes where the student is not better than the teacher (by the margin) get a gradient.
    active = student_error + margin > teacher_error
    bounded = torch.where(active, student_error, torch.zeros_like(student_error))
    return _weighted_mean(bounded, weights)


def giou_kd(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Generalized IoU loss between decoded student and teacher boxes.

    Rezatofighi, Tsoi, Gwak, Sadeghian, Reid & Savarese, 2019, "Generalized Intersection over
    Union: A Metric and A Loss for Bounding Box Regression" (CVPR), with the teacher's boxes as
    targets; computed as ``torchvision.ops.generalized_box_iou_loss`` per box pair (same values
    and gradients, without its device sync; see ``_generalized_box_iou_loss``).

    Note: torchvision adds eps=1e-7 to the union, so identical boxes give about eps / area, not an
    exact 0.

    Args:
        student_boxes: (..., 4) decoded (x1, y1, x2, y2) boxes.
        teacher_boxes: (..., 4), paired 1:1 with the student's.
        weights: shape ``boxes.shape[:-1]``, or None.
    """
    _check_boxes(student_boxes, teacher_boxes, "boxes")
    per_box = _generalized_box_iou_loss(student_boxes, teacher_boxes.detach())  # (...,)
    return _weighted_mean(per_box, weights)


def _generalized_box_iou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``torchvision.ops.generalized_box_iou_loss(boxes1, boxes2, reduction="none")``, (..., 4)
    -> (...), without its boolean-mask indexing (a device sync and a gather/scatter per
    coordinate on every call). The intersection is the product of the overlaps' sides clamped
    at 0 by relu, which gives torchvision's values and gradients exactly: relu passes no
    gradient at 0, as the strict mask ``side > 0`` does not.
    """
    boxes1 = boxes1 if boxes1.is_floating_point() else boxes1.float()
    boxes2 = boxes2 if boxes2.is_floating_point() else boxes2.float()
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    intersection = (torch.min(x2, x2g) - torch.max(x1, x1g)).relu() * (torch.min(y2, y2g) - torch.max(y1, y1g)).relu()
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection
    iou = intersection / (union + eps)
    # smallest enclosing box
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - ((enclosing - union) / (enclosing + eps)))


# --------------------------------------------------------------------------- module shells


class DeltaRegressionKD(nn.Module):
    """``delta_regression_kd`` with stored kind and beta."""

    def __init__(self, kind: str = "l1", beta: float = 1.0 / 9.0):
        super().__init__()
        if kind not in DELTA_KINDS:
            raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(DELTA_KINDS)}")
        self.kind, self.beta = kind, beta

    def forward(self, student_deltas, teacher_deltas, weights=None):
        return delta_regression_kd(student_deltas, teacher_deltas, self.kind, self.beta, weights)


class TeacherBoundedRegression(nn.Module):
    """``teacher_bounded_regression`` with a stored margin."""

    def __init__(self, margin: float = 0.0):
        super().__init__()
        self.margin = margin

    def forward(self, student_deltas, teacher_deltas, target_deltas, weights=None):
        return teacher_bounded_regression(student_deltas, teacher_deltas, target_deltas, self.margin, weights)


class GIoUKD(nn.Module):
    """``giou_kd`` as a module."""

    def forward(self, student_boxes, teacher_boxes, weights=None):
        return giou_kd(student_boxes, teacher_boxes, weights)
