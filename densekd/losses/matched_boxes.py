"""Localization distillation on matched boxes: each student box against the teacher detection it
overlaps most, so that a teacher of any family (its post-processed detections) can teach a student
of any other family where to put its boxes.

Every function returns an unweighted scalar; teacher tensors are detached inside.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou_loss

from ._reduce import _weighted_mean

PerImage = Union[Tensor, Sequence[Tensor]]


def _per_image(values: Optional[PerImage]) -> Optional[list[Tensor]]:
    """A tensor is one image; a sequence holds one tensor per image."""
    if values is None or isinstance(values, Tensor):
        return None if values is None else [values]
    return list(values)


def matched_giou_kd(
    student_boxes: PerImage,
    teacher_boxes: PerImage,
    teacher_scores: PerImage,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
    match_boxes: Optional[PerImage] = None,
    weights: Optional[PerImage] = None,
) -> Tensor:
    """GIoU loss between each student box and the teacher detection it matches, weighted by that
    detection's score.

    Per image, teacher detections scoring at least ``score_threshold`` stand in for ground truth and
    each student prediction m is matched as R-CNN and RetinaNet match anchors to ground truth: to the
    detection d(m) of highest IoU with its match box, if that IoU is at least ``iou_threshold``. Over
    the matched predictions of all images::

        loss = sum_m w_m * (1 - GIoU(b_m, t_d(m))) / sum_m w_m,     w_m = s_d(m) * weights_d(m)

    with s the teacher's scores. ``1 - GIoU`` is ``torchvision.ops.generalized_box_iou_loss``
    (Rezatofighi et al. 2019, "Generalized Intersection over Union: A Metric and A Loss for Bounding
    Box Regression", CVPR, https://arxiv.org/abs/1902.09630).

    Notes:
        Localization distillation proper, LD (Zheng et al. 2022, "Localization Distillation for
        Dense Object Detection", CVPR, https://arxiv.org/abs/2102.12252), distills the probability
        distribution a GFocal-style head predicts over each box edge (KL at a temperature) in a
        main and a "valuable localization" region. torchvision's heads regress one value per edge,
        so there is no distribution to distill without changing the head, and a cross-family
        teacher has no per-location outputs that line up with the student's. This term keeps LD's
        aim (the student learns the teacher's localization around the teacher's objects) with the
        teacher's final, post-NMS boxes as GIoU targets instead; the region is the set of
        predictions that overlap a teacher detection, weighted by its score rather than selected
        by LD's IoU-to-anchor rule.

        Matching is by IoU of the match boxes (the student's own boxes by default), computed
        without gradient; an object matched by many predictions weighs more, as in the student's
        own losses over positives. Identical boxes give about eps / area, not an exact 0
        (torchvision adds eps = 1e-7 to the union).

    Args:
        student_boxes: per image (M_i, 4) decoded (x1, y1, x2, y2) predictions, or (M_i, D_i, 4)
            where entry [m, d] is the box prediction m gives for the class of detection d
            (class-specific regression, e.g. an R-CNN RoI head). A tensor is one image.
        teacher_boxes: per image (D_i, 4) detections, same frame.
        teacher_scores: per image (D_i,) detection scores in [0, 1].
        iou_threshold: the smallest IoU at which a prediction matches a detection.
        score_threshold: detections scoring below it are left out.
        match_boxes: per image (M_i, 4) boxes that decide the match (default: ``student_boxes``,
            which must then be (M_i, 4)); an R-CNN head matches by its proposals.
        weights: per image (D_i,) extra weight of each detection (e.g. class weights by its
            label), or None.
    """
    students, teachers, scores = _per_image(student_boxes), _per_image(teacher_boxes), _per_image(teacher_scores)
    matchers, extra = _per_image(match_boxes), _per_image(weights)
    if not len(students) == len(teachers) == len(scores):
        raise ValueError(
            f"matched_giou_kd needs as many images of student boxes, teacher boxes and teacher scores, got "
            f"{len(students)}, {len(teachers)} and {len(scores)}"
        )
    losses, box_weights = [], []
    for index, (student, teacher, score) in enumerate(zip(students, teachers, scores)):
        match = student if matchers is None else matchers[index]
        if match.dim() != 2 or match.shape[-1] != 4:
            raise ValueError(
                f"image {index}: boxes to match must be (M, 4), got {tuple(match.shape)}; give match_boxes= "
                "with class-specific (M, D, 4) student boxes"
            )
        keep = score.detach() >= score_threshold  # (D,)
        teacher, score = teacher.detach()[keep], score.detach()[keep]
        detection_weight = score if extra is None else score * extra[index].detach()[keep]
        if student.dim() == 3:
            student = student[:, keep]  # (M, D, 4) -> (M, D_kept, 4)
        if teacher.shape[0] == 0 or student.shape[0] == 0:
            continue
        best_iou, best = box_iou(match.detach(), teacher).max(dim=1)  # (M, D) -> (M,), (M,)
        rows = torch.where(best_iou >= iou_threshold)[0]  # matched predictions
        columns = best[rows]
        matched = student[rows] if student.dim() == 2 else student[rows, columns]  # (P, 4)
        losses.append(generalized_box_iou_loss(matched, teacher[columns], reduction="none"))  # (P,)
        box_weights.append(detection_weight[columns])
    if not losses:  # nothing matched: a zero that keeps the graph
        return sum((s.sum() for s in students), torch.zeros(())) * 0.0
    return _weighted_mean(torch.cat(losses), torch.cat(box_weights))


class MatchedGIoUKD(nn.Module):
    """``matched_giou_kd`` with stored thresholds."""

    def __init__(self, iou_threshold: float = 0.5, score_threshold: float = 0.5):
        super().__init__()
        self.iou_threshold, self.score_threshold = iou_threshold, score_threshold

    def forward(self, student_boxes, teacher_boxes, teacher_scores, match_boxes=None, weights=None):
        return matched_giou_kd(
            student_boxes, teacher_boxes, teacher_scores, self.iou_threshold, self.score_threshold, match_boxes, weights
        )
