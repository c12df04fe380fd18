"""Pseudo-target distillation: the teacher's confident detections as targets of the student's own
detection loss, so that a teacher of any family can teach a student of any other family.

The loss takes the student's loss as a function of targets: whatever detector computes it (a
torchvision family's own ``compute_loss``, or any other), no detection loss is rewritten here.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

Targets = list[dict[str, Tensor]]


def pseudo_target_kd(
    student_loss: Callable[[Targets], Mapping[str, Tensor]],
    teacher_detections: Sequence[Mapping[str, Tensor]],
    score_threshold: float = 0.5,
) -> Tensor:
    """The student's own detection loss with the teacher's detections scoring at least
    ``score_threshold`` as targets, scaled by the mean score of those detections::

        loss = mean_{d: s_d >= threshold} s_d * sum_k L_k(student; {(b_d, c_d): s_d >= threshold})

    where ``L_k`` are the entries of the student's loss dict (e.g. FCOS's classification, box
    regression and centerness losses) and the mean runs over the kept detections of all images
    (0 when none is kept: the loss is then 0, its graph kept).

    Soft Teacher (Xu et al. 2021, "End-to-End Semi-Supervised Object Detection with Soft Teacher",
    ICCV, https://arxiv.org/abs/2106.09018) trains a student on a teacher's thresholded detections
    and weights each pseudo box's classification loss by the teacher's score.

    Notes:
        Where this departs from Soft Teacher: per-box weights do not fit through an unmodified
        detection loss, whose targets all count alike (torchvision's losses normalize by the number
        of foreground anchors or sampled RoIs of the whole batch). The score enters twice instead:
        the threshold selects the boxes, and the mean score of the kept boxes scales the whole
        pass, so a batch of confident detections teaches more than a batch of doubtful ones; within
        a batch, boxes above the threshold count alike. Soft Teacher also weights background by the
        teacher's background score and selects regression targets by box jittering; here every kept
        box is a classification and a regression target, as a ground-truth box is.

        The targets are the teacher's detections only. Ground truth, where there is any, trains the
        student through its own loss beside this one; where the teacher misses an object, this pass
        teaches background there, as distilling the teacher's view means.

    Args:
        student_loss: maps targets, per image ``{"boxes": (G_i, 4), "labels": (G_i,) int64}`` in the
            frame of the student's predictions, to the student's loss dict.
        teacher_detections: per image ``{"boxes": (D_i, 4), "labels": (D_i,), "scores": (D_i,)}``,
            in the same frame and the student's label numbering.
        score_threshold: detections scoring below it are not used.
    """
    targets: Targets = []
    kept_scores = []
    for detections in teacher_detections:
        keep = detections["scores"].detach() >= score_threshold  # (D_i,)
        targets.append({"boxes": detections["boxes"].detach()[keep], "labels": detections["labels"][keep]})
        kept_scores.append(detections["scores"].detach()[keep])
    scores = torch.cat(kept_scores) if kept_scores else torch.zeros(0)
    scale = scores.mean() if scores.numel() else scores.new_zeros(())
    losses = student_loss(targets)
    return scale * sum(losses.values())


class PseudoTargetKD(nn.Module):
    """``pseudo_target_kd`` with a stored score threshold."""

    def __init__(self, score_threshold: float = 0.5):
        super().__init__()
        self.score_threshold = score_threshold

    def forward(self, student_loss, teacher_detections):
        return pseudo_target_kd(student_loss, teacher_detections, self.score_threshold)
