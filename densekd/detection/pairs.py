"""Turn one step's recorded outputs into the tensor pairs each loss compares.

A :class:`StepContext` holds the student's and the teachers' outputs for one batch and
computes, once per step and only on demand, what several terms share: RoI labels and
regression targets, anchor matches, foreground masks per feature level, fused
multi-teacher logits. :func:`term_loss` then calls one term's loss on its pair.
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core.feature_pairs import PairingContext, feature_term_loss, fuse_teacher_logits, term_temperature
from ..core.outputs import DenseOutputs
from ..core.terms import Term
from .adapters import DetectorAdapter, decode_boxes, encode_boxes
from .predictions import detection_term_loss

# Decoded teacher boxes narrower than this (pixels) are left out of GIoU terms.
MIN_BOX_SIDE = 1.0


def _level_masks(boxes: list[Tensor], box_weights: list[Tensor], batch_shape: tuple[int, int], level_shape) -> Tensor:
    """(N, 1, H_l, W_l) foreground map: each cell holds the largest weight of the GT boxes
    covering its centre (0 for background), boxes given in the padded batch frame."""
    height, width = level_shape
    device = boxes[0].device if boxes else torch.device("cpu")
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (batch_shape[0] / height)
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (batch_shape[1] / width)
    masks = []
    for image_boxes, weights in zip(boxes, box_weights):
        if image_boxes.numel() == 0:
            masks.append(torch.zeros(height, width, device=device))
            continue
        x1, y1, x2, y2 = image_boxes.unbind(-1)  # each (G,)
        inside_y = (ys[None, :] >= y1[:, None]) & (ys[None, :] <= y2[:, None])  # (G, H)
        inside_x = (xs[None, :] >= x1[:, None]) & (xs[None, :] <= x2[:, None])  # (G, W)
        inside = inside_y[:, :, None] & inside_x[:, None, :]  # (G, H, W)
        weighted = inside.float() * weights[:, None, None]
        masks.append(weighted.amax(dim=0))
    return torch.stack(masks)[:, None]  # (N, H, W) -> (N, 1, H, W)


class StepContext(PairingContext):
    """Everything one training step knows, with shared derived tensors cached."""

    def __init__(
        self,
        student: DenseOutputs,
        teachers: list[DenseOutputs],
        teacher_weights: list[float],
        student_adapter: DetectorAdapter,
        connectors: nn.ModuleDict,
        level_pairs: dict[str, list[list[tuple[str, str]]]],
        iteration: int,
    ):
        super().__init__(student, teachers, teacher_weights, connectors, level_pairs, iteration)
        self.adapter = student_adapter

    # --- shared, computed once per step ------------------------------------------------
    @cached_property
    def roi_assignment(self) -> tuple[Tensor, Tensor]:
        """(R,) label of every sampled RoI (0 = background) and (R, 4) its matched GT box."""
        return self._assign(self.student.roi_proposals)

    @cached_property
    def mask_labels(self) -> Tensor:
        """(P,) label of every positive RoI the mask head saw."""
        return self._assign(self.student.mask_proposals)[0]

    @cached_property
    def keypoint_labels(self) -> Tensor:
        """(P,) label of every positive RoI the keypoint head saw."""
        return self._assign(self.student.keypoint_proposals)[0]

    @cached_property
    def keypoint_visibility(self) -> Tensor:
        """(P, K_kp) bool: the matched GT keypoint of each positive RoI is visible and inside it."""
        s = self.student
        size = s.keypoint_logits.shape[-1]  # S of the (P, K_kp, S, S) heatmaps
        return self.adapter.keypoint_visibility(s.keypoint_proposals, s.gt_boxes, s.gt_labels, s.gt_keypoints, size)

    def _assign(self, proposals: list[Tensor]) -> tuple[Tensor, Tensor]:
        matched_idxs, labels = self.adapter.assign_rois(proposals, self.student.gt_boxes, self.student.gt_labels)
        matched_boxes = [
            gt[idx.clamp(min=0)] if gt.numel() else torch.zeros_like(p)
            for gt, idx, p in zip(self.student.gt_boxes, matched_idxs, proposals)
        ]
        return torch.cat(labels), torch.cat(matched_boxes)

    @cached_property
    def dense_teacher_scores(self) -> Tensor:
        """(N, HWA, C) the teachers' class probabilities per anchor (one-stage heads): sigmoids of
        ``cls_logits`` (RetinaNet, FCOS), or the softmax of ``anchor_class_logits`` with background
        channel 0 set to 0 (SSD), so that the top class is a foreground class in both layouts."""
        if "anchor_class_logits" in self.adapter.provides:
            probabilities = torch.softmax(self.fused_teacher("anchor_class_logits", 1.0, sigmoid=False), dim=-1)
            return torch.cat([torch.zeros_like(probabilities[..., :1]), probabilities[..., 1:]], dim=-1)
        return torch.sigmoid(self.fused_teacher("cls_logits", 1.0, sigmoid=True))

    @cached_property
    def dense_teacher_confidence(self) -> Tensor:
        """(N, HWA) the teachers' top foreground class probability per anchor (one-stage heads)."""
        return self.dense_teacher_scores.amax(dim=-1)

    @cached_property
    def anchor_labels(self) -> Tensor:
        """(N * HWA,) label of every default box of an SSD head (0 = background), as SSD's matcher
        assigns them in its loss (deterministic; the hard-negative mining that follows is not used)."""
        matches = self.anchor_matches("anchor_class_logits").split([len(a) for a in self.student.anchors])
        labels = [
            torch.where(m >= 0, gt[m.clamp(min=0)], 0) if gt.numel() else torch.zeros_like(m)
            for gt, m in zip(self.student.gt_labels, matches)
        ]
        return torch.cat(labels)

    def per_label(self, values: Tensor, fill: float = 1.0) -> Tensor:
        """(C,) per-class values indexed by label, laid out like the student's class channels
        (:meth:`~densekd.detection.adapters.DetectorAdapter.per_label`): every term reads the
        same value for the same label, whether it indexes channels, RoIs or GT boxes."""
        return self.adapter.per_label(values, fill)

    def top_class_weights(self, class_weights: Tensor) -> Tensor:
        """(N, HWA) class weight of the teachers' top (foreground) class at every anchor (one-stage heads)."""
        scores = self.dense_teacher_scores  # (N, HWA, C)
        return self.per_label(class_weights).to(scores.device)[scores.argmax(dim=-1)]

    def anchor_matches(self, output_name: str) -> Tensor:
        """(N * HWA,) matched GT index per anchor of the student (negative: unmatched)."""
        key = f"_matches_{output_name}"
        if key not in self.__dict__:
            matches = self.adapter.match_anchors(output_name, self.student.anchors, self.student.gt_boxes)
            self.__dict__[key] = torch.cat(matches)
        return self.__dict__[key]

    def foreground(self, level_shape: tuple[int, int], class_weights: Optional[Tensor]) -> Tensor:
        """(N, 1, H, W) GT-box map for one feature level, weighted per box by its label's class weight."""
        key = (tuple(level_shape), None if class_weights is None else id(class_weights))
        cache = self.__dict__.setdefault("_foreground", {})
        if key not in cache:
            weights = [
                torch.ones_like(labels, dtype=torch.float32)
                if class_weights is None
                else self.per_label(class_weights).to(labels.device)[labels]
                for labels in self.student.gt_labels
            ]
            cache[key] = _level_masks(self.student.gt_boxes, weights, self.student.batch_shape, level_shape)
        return cache[key]

    def fused_teacher(self, output_name: str, temperature, sigmoid: bool) -> Tensor:
        values = [getattr(t, output_name) for t in self.teachers]
        return fuse_teacher_logits(values, self.teacher_weights, temperature, sigmoid)

    def averaged_teacher(self, output_name: str) -> Tensor:
        """Teachers' weighted mean of a regression output (box deltas)."""
        values = [getattr(t, output_name) for t in self.teachers]
        if len(values) == 1:
            return values[0]
        return sum(w * v for w, v in zip(self.teacher_weights, values))


# --- one function per kind of output --------------------------------------------------
def _sigmoid_logits(term: Term, ctx: StepContext) -> Tensor:
    base_t = term_temperature(term, ctx)
    class_t = term.class_temperatures(base_t)
    student = getattr(ctx.student, term.on)
    if term.on == "mask_logits":
        return _mask_logits(term, ctx, base_t, class_t)
    temperature: Tensor | float = base_t
    if class_t is not None and term.on == "cls_logits":
        temperature = ctx.per_label(class_t, base_t).to(student.device)  # (C,)
    teacher = ctx.fused_teacher(term.on, temperature, sigmoid=True)
    if term.confidence_weighting:
        confidence = torch.sigmoid(teacher) if term.on == "rpn_objectness" else ctx.dense_teacher_confidence
        weights = confidence[..., None] if term.on == "cls_logits" else confidence  # (N, HWA, 1) or (N, HWA)
    else:
        weights = torch.ones_like(student[..., :1] if term.on == "cls_logits" else student)
    if term.class_weights is not None and term.on == "cls_logits":
        weights = weights * ctx.per_label(term.class_weights).to(student.device)  # (N, HWA, 1) * (C,)
    elif term.class_weights is not None:  # centerness: weight of the teacher's top class
        weights = weights * ctx.top_class_weights(term.class_weights)
    if term.raise_only_classes is not None:
        raise_only = ctx.per_label(term.raise_only_classes.float(), fill=0.0).to(student.device).bool()  # (C,)
        lowers = teacher < student.detach()  # (N, HWA, C): this element would push the student's score down
        weights = weights * ~(raise_only & lowers)  # (N, HWA, C)
    return term.loss_fn(student, teacher, temperature=temperature, weights=weights, **term.params)


def _mask_logits(term: Term, ctx: StepContext, base_t: float, class_t: Optional[Tensor]) -> Tensor:
    if ctx.student.mask_logits is None:
        raise RuntimeError("mask_logits were not recorded: mask terms need a Mask R-CNN student in training mode.")
    labels = ctx.mask_labels  # (P,)
    rows = torch.arange(labels.numel(), device=labels.device)
    student = ctx.student.mask_logits[rows, labels]  # (P, K + 1, M, M) -> (P, M, M) at each RoI's label
    temperature: Tensor | float = base_t
    if class_t is not None:
        temperature = ctx.per_label(class_t, base_t).to(labels.device)[labels][:, None, None]  # (P, 1, 1)
    teacher = fuse_teacher_logits(
        [t.mask_logits[rows, labels] for t in ctx.teachers], ctx.teacher_weights, temperature, sigmoid=True
    )
    weights = torch.ones_like(student)
    if term.class_weights is not None:
        weights = weights * ctx.per_label(term.class_weights).to(student.device)[labels][:, None, None]
    return term.loss_fn(student, teacher, temperature=temperature, weights=weights, **term.params)


def _keypoint_logits(term: Term, ctx: StepContext) -> Tensor:
    """Heatmaps of the positive RoIs, (P, K_kp, S, S), against the teachers' keypoint heads run on
    the same RoIs; class weights and temperatures by each RoI's label, GT visibility always given."""
    student = ctx.student.keypoint_logits
    if student is None:
        raise RuntimeError("keypoint_logits were not recorded: keypoint terms need a Keypoint R-CNN student in training mode.")
    base_t = term_temperature(term, ctx)
    class_t = term.class_temperatures(base_t)
    temperature: Tensor | float = base_t
    fuse_t: Tensor | float = base_t
    if class_t is not None:
        temperature = ctx.per_label(class_t, base_t).to(student.device)[ctx.keypoint_labels]  # (P,)
        fuse_t = temperature[:, None, None]  # (P, 1, 1) over (P, K_kp, S * S)
    # The spatial softmax runs over each map's S * S cells: fuse teachers on (P, K_kp, S * S).
    teacher = fuse_teacher_logits(
        [t.keypoint_logits.flatten(2) for t in ctx.teachers], ctx.teacher_weights, fuse_t, sigmoid=False
    ).reshape(student.shape)
    weights = None
    if term.class_weights is not None:
        weights = ctx.per_label(term.class_weights).to(student.device)[ctx.keypoint_labels][:, None]  # (P, 1)
    visible = ctx.keypoint_visibility  # (P, K_kp), read by the loss only with visible_only
    return term.loss_fn(student, teacher, temperature=temperature, visible=visible, weights=weights, **term.params)


def _softmax_logits(term: Term, ctx: StepContext) -> Tensor:
    """Softmax class logits, background at 0: one row per sampled RoI (``roi_class_logits`` (R, K + 1))
    or per default box (``anchor_class_logits`` (N, HWA, K + 1) -> (N * HWA, K + 1)), each row's label
    (0 = background) from the RoI head's or SSD's matcher's assignment."""
    base_t = term_temperature(term, ctx)
    class_t = term.class_temperatures(base_t)
    labels = ctx.roi_assignment[0] if term.on == "roi_class_logits" else ctx.anchor_labels  # (M,)
    student = getattr(ctx.student, term.on).flatten(0, -2)  # (M, K + 1)
    temperature: Tensor | float = base_t
    if class_t is not None:  # background rows keep the base temperature
        temperature = ctx.per_label(class_t, base_t).to(student.device)[labels]  # (M,)
    teacher = fuse_teacher_logits(
        [getattr(t, term.on).flatten(0, -2) for t in ctx.teachers],  # each (M, K + 1)
        ctx.teacher_weights,
        temperature if class_t is None else temperature[:, None],
        sigmoid=False,
    )
    weights = torch.ones(labels.shape, device=student.device)
    if term.class_weights is not None:
        weights = weights * ctx.per_label(term.class_weights).to(student.device)[labels]
    if term.confidence_weighting:
        weights = weights * torch.softmax(teacher, dim=-1).amax(dim=-1)
    kwargs = dict(term.params, weights=weights)
    if "temperature" in term._loss_arguments():
        kwargs["temperature"] = temperature
    if term.loss == "dkd":
        kwargs["target"] = labels
    return term.loss_fn(student, teacher, **kwargs)


def _boxes(term: Term, ctx: StepContext) -> Tensor:
    pairs = _roi_box_pairs if term.on == "roi_box_regression" else _anchor_box_pairs
    student, teacher, references, weights, targets = pairs(term, ctx)
    if term.loss == "giou":
        coder = ctx.adapter.box_coder_for(term.on)
        student_boxes = decode_boxes(coder, student, references)
        teacher_boxes = decode_boxes(coder, teacher, references)
        # A teacher box under a pixel wide (FCOS predicts ltrb >= 0, often ~0 early on) defines
        # no overlap worth imitating, and GIoU of two identical empty boxes is 1, not 0.
        sides = teacher_boxes[:, 2:] - teacher_boxes[:, :2]  # (M, 2) widths and heights
        has_extent = (sides >= MIN_BOX_SIDE).all(dim=1)
        return term.loss_fn(student_boxes, teacher_boxes, weights=weights * has_extent, **term.params)
    if term.loss == "teacher_bounded":
        return term.loss_fn(student, teacher, targets, weights=weights, **term.params)
    return term.loss_fn(student, teacher, weights=weights, **term.params)


def _roi_box_pairs(term: Term, ctx: StepContext):
    """Class-specific deltas of the foreground RoIs, each taken at its matched GT label:
    (student (F, 4), teacher (F, 4), proposals (F, 4), weights (F,), GT deltas (F, 4) or None)."""
    labels, matched_boxes = ctx.roi_assignment
    foreground = torch.where(labels > 0)[0]
    fg_labels = labels[foreground]
    # (R, (K + 1) * 4) -> (R, K + 1, 4) -> (F, 4) at each RoI's label
    student = ctx.student.roi_box_regression
    student = student.reshape(student.shape[0], -1, 4)[foreground, fg_labels]
    teacher = ctx.averaged_teacher("roi_box_regression")
    teacher = teacher.reshape(teacher.shape[0], -1, 4)[foreground, fg_labels]
    proposals = torch.cat(ctx.student.roi_proposals)[foreground]
    weights = torch.ones(foreground.shape, device=student.device)
    if term.class_weights is not None:
        weights = weights * ctx.per_label(term.class_weights).to(student.device)[fg_labels]
    if term.confidence_weighting:
        teacher_logits = ctx.fused_teacher("roi_class_logits", 1.0, sigmoid=False)[foreground]
        weights = weights * torch.softmax(teacher_logits, dim=-1).gather(1, fg_labels[:, None]).squeeze(1)
    targets = None
    if term.loss == "teacher_bounded":
        targets = encode_boxes(ctx.adapter.box_coder_for(term.on), matched_boxes[foreground], proposals)
    return student, teacher, proposals, weights, targets


def _anchor_box_pairs(term: Term, ctx: StepContext):
    """Per-anchor deltas flattened over the batch, (N, HWA, 4) -> (N * HWA, 4):
    (student, teacher, anchors, weights (N * HWA,), GT deltas or None)."""
    student = getattr(ctx.student, term.on).reshape(-1, 4)
    teacher = ctx.averaged_teacher(term.on).reshape(-1, 4)
    anchors = torch.cat(ctx.student.anchors)  # (N * HWA, 4)
    weights = torch.ones(student.shape[0], device=student.device)
    targets = None
    if term.loss == "teacher_bounded":
        # Defined on positive anchors only (Chen et al. 2017), against their matched GT box.
        matches = ctx.anchor_matches(term.on)
        weights = (matches >= 0).to(weights.dtype)
        matched_gt = [
            boxes[m.clamp(min=0)] if boxes.numel() else torch.zeros_like(a)
            for boxes, m, a in zip(ctx.student.gt_boxes, matches.split([len(a) for a in ctx.student.anchors]), ctx.student.anchors)
        ]
        targets = encode_boxes(ctx.adapter.box_coder_for(term.on), torch.cat(matched_gt), anchors)
    elif term.confidence_weighting:
        if term.on == "rpn_box_regression":
            weights = torch.sigmoid(ctx.fused_teacher("rpn_objectness", 1.0, sigmoid=True)).reshape(-1)
        else:
            weights = ctx.dense_teacher_confidence.reshape(-1)
    if term.class_weights is not None:
        weights = weights * ctx.top_class_weights(term.class_weights).reshape(-1)
    return student, teacher, anchors, weights, targets


def _roi_features(term: Term, ctx: StepContext) -> Tensor:
    return sum(
        w * term.loss_fn(ctx.student.roi_features, t.roi_features, **term.params)
        for w, t in zip(ctx.teacher_weights, ctx.teachers)
    )


_BY_OUTPUT: dict[str, Callable[[Term, StepContext], Tensor]] = {
    "features": feature_term_loss,
    "cls_logits": _sigmoid_logits,
    "centerness": _sigmoid_logits,
    "rpn_objectness": _sigmoid_logits,
    "mask_logits": _sigmoid_logits,
    "keypoint_logits": _keypoint_logits,
    "roi_class_logits": _softmax_logits,
    "anchor_class_logits": _softmax_logits,
    "anchor_box_regression": _boxes,
    "box_regression": _boxes,
    "rpn_box_regression": _boxes,
    "roi_box_regression": _boxes,
    "roi_features": _roi_features,
    "detections": detection_term_loss,
}


def term_loss(term: Term, ctx: StepContext) -> Tensor:
    """The unweighted value of one term on this step's outputs."""
    return _BY_OUTPUT[term.on](term, ctx)


def teacher_needs(term: Term) -> set[str]:
    """Outputs a teacher must compute for this term: its own output plus the scores that
    weight it (they come out of the same head call, so they cost nothing extra)."""
    needs = {term.on}
    if term.on in {"box_regression", "centerness"}:
        needs.add("cls_logits")
    elif term.on == "rpn_box_regression":
        needs.add("rpn_objectness")
    elif term.on == "anchor_box_regression":
        needs.add("anchor_class_logits")
    elif term.on == "roi_box_regression":
        needs.add("roi_class_logits")
    return needs
