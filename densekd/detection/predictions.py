"""Prediction-level distillation: a teacher of any family passes its knowledge to a student of any
other family through its own post-processed detections (boxes, labels, scores), computed in eval
mode on the student's batch, in the student's geometry::

    Distiller(fcos_student, faster_rcnn_teacher, terms=[
        Term("pseudo_targets", on="detections", params={"score_threshold": 0.5}),
        Term("matched_giou", on="detections", params={"iou_threshold": 0.5}),
        Term("cwd", on="features", levels=["0", "1", "2"]),  # the FPN levels both models have
    ])

Two terms (losses in :mod:`densekd.losses.pseudo_targets` and :mod:`densekd.losses.matched_boxes`):

- ``pseudo_targets``: the teacher's detections scoring at least ``score_threshold`` become the
  targets of a second pass of the student family's own torchvision loss, scaled by their mean
  score. The pass reuses the head outputs the student computed in this step (no second forward):
  RetinaNet/FCOS/SSD's ``compute_loss`` on the recorded head outputs and anchors; for Faster/Mask/
  Keypoint R-CNN the RPN's ``compute_loss`` on its recorded objectness and deltas (anchors sampled
  anew by its own sampler) and ``fastrcnn_loss`` on the RoIs the RoI head sampled for the ground
  truth in this step, relabelled by the pseudo-targets (not resampled around them).
- ``matched_giou``: each decoded student box (per anchor or location of a dense head, through the
  adapter's box coder and the recorded anchors; per sampled RoI of an R-CNN head, at the class of
  each detection) against the detection it overlaps by IoU >= ``iou_threshold``, GIoU weighted by
  the detection's score. Dense heads match by their decoded boxes (a student trained from scratch
  gets this term only once its boxes overlap the teacher's; ``pseudo_targets`` trains its boxes
  through its own assignment from the first step), R-CNN heads by their proposals.

Both terms need one teacher that numbers the student's categories (labels 1..K on K + 1 class
channels in every family), checked at construction; detections whose label the student cannot
learn (an FCOS teacher's label 0, background to an R-CNN or SSD student) and boxes under
``MIN_DETECTION_SIDE`` pixels are dropped.

The extra cost is the teacher's own post-processing (its eval-mode heads and NMS; for an R-CNN
teacher its RPN and box head on its own test-time proposals) and, per term, a loss evaluation on
tensors the student already has: no student forward is repeated.

Family facts live in one table, ``_FAMILIES`` (teacher detections, the student's loss on given
targets, the student's decoded boxes), keyed by adapter class as label smoothing keys its table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss

from ..core.outputs import DenseOutputs
from ..core.terms import Term
from .adapters import DetectorAdapter, FCOSAdapter, RCNNAdapter, RetinaNetAdapter, SSDAdapter, decode_boxes
from .adapters.base import match_with

if TYPE_CHECKING:  # pairs.py imports this module
    from .pairs import StepContext

Detections = list[dict[str, Tensor]]
# Teacher detections narrower than this (pixels) are dropped: they are no targets a loss can use.
MIN_DETECTION_SIDE = 1.0


# --- teacher side: the model's own eval-mode detections ----------------------------------------
def _recorded_or_run(adapter: DetectorAdapter, features: list[Tensor], outputs: DenseOutputs, fields: dict) -> dict:
    """The dense head's outputs (torchvision's key -> densekd's field in ``fields``): those the
    adapter already computed for per-anchor terms this step, else one run of the head."""
    recorded = {key: getattr(outputs, field) for key, field in fields.items()}
    if "centerness" in adapter.provides:  # FCOS: its post-processing also reads the centerness
        recorded["bbox_ctrness"] = None if outputs.centerness is None else outputs.centerness[..., None]  # (N, HWA, 1)
    if any(value is None for value in recorded.values()):
        return adapter.model.head(features)  # each (N, HWA, ...)
    return recorded


def _one_stage_detections(adapter: DetectorAdapter, images: ImageList, outputs: DenseOutputs) -> Detections:
    """RetinaNet and FCOS, as their ``forward`` does in eval mode up to ``transform.postprocess``."""
    model = adapter.model
    features = list(outputs.features.values())
    head_outputs = _recorded_or_run(adapter, features, outputs, {"cls_logits": "cls_logits", "bbox_regression": "box_regression"})
    anchors = model.anchor_generator(images, features)
    locations = [f.shape[-2] * f.shape[-1] for f in features]
    per_location = head_outputs["cls_logits"].shape[1] // sum(locations)  # A (RetinaNet), 1 (FCOS)
    counts = [n * per_location for n in locations]
    split_outputs = {name: list(value.split(counts, dim=1)) for name, value in head_outputs.items()}
    split_anchors = [list(a.split(counts)) for a in anchors]
    return model.postprocess_detections(split_outputs, split_anchors, images.image_sizes)


def _ssd_detections(adapter: DetectorAdapter, images: ImageList, outputs: DenseOutputs) -> Detections:
    model = adapter.model
    features = list(outputs.features.values())
    anchors = model.anchor_generator(images, features)
    head_outputs = _recorded_or_run(
        adapter, features, outputs, {"cls_logits": "anchor_class_logits", "bbox_regression": "anchor_box_regression"}
    )
    return model.postprocess_detections(head_outputs, anchors, images.image_sizes)


def _rcnn_detections(adapter: DetectorAdapter, images: ImageList, outputs: DenseOutputs) -> Detections:
    """The RPN's test-time proposals through the box branch and ``postprocess_detections`` (the
    mask and keypoint branches, which do not change the boxes, are skipped)."""
    model, heads = adapter.model, adapter.model.roi_heads
    proposals, _ = model.rpn(images, outputs.features)  # the teacher is in eval mode: test-time top-n
    box_features = heads.box_head(heads.box_roi_pool(outputs.features, proposals, images.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals, images.image_sizes)
    return [{"boxes": b, "labels": l, "scores": s} for b, l, s in zip(boxes, labels, scores)]


# --- student side: the family's own loss on given targets, from this step's head outputs -------
def _retinanet_loss(adapter: DetectorAdapter, student: DenseOutputs, targets: Detections) -> dict[str, Tensor]:
    head_outputs = {"cls_logits": student.cls_logits, "bbox_regression": student.box_regression}
    return adapter.model.compute_loss(targets, head_outputs, student.anchors)


def _fcos_loss(adapter: DetectorAdapter, student: DenseOutputs, targets: Detections) -> dict[str, Tensor]:
    head_outputs = {
        "cls_logits": student.cls_logits,
        "bbox_regression": student.box_regression,
        "bbox_ctrness": student.centerness[..., None],  # (N, HWA) -> (N, HWA, 1), as the head returns it
    }
    locations = [f.shape[-2] * f.shape[-1] for f in student.features.values()]
    return adapter.model.compute_loss(targets, head_outputs, student.anchors, locations)


def _ssd_loss(adapter: DetectorAdapter, student: DenseOutputs, targets: Detections) -> dict[str, Tensor]:
    model = adapter.model
    matched = match_with(model.proposal_matcher, student.anchors, [t["boxes"] for t in targets])  # as SSD.forward
    head_outputs = {"bbox_regression": student.anchor_box_regression, "cls_logits": student.anchor_class_logits}
    return model.compute_loss(targets, head_outputs, student.anchors, matched)


def _rcnn_loss(adapter: DetectorAdapter, student: DenseOutputs, targets: Detections) -> dict[str, Tensor]:
    """The RPN's loss and ``fastrcnn_loss`` as ``RegionProposalNetwork.forward`` and ``RoIHeads.forward``
    compute them, on this step's RPN outputs and sampled RoIs, labelled by ``targets``."""
    rpn, heads = adapter.model.rpn, adapter.model.roi_heads
    anchor_labels, anchor_boxes = rpn.assign_targets_to_anchors(student.anchors, targets)
    anchor_targets = rpn.box_coder.encode(anchor_boxes, student.anchors)
    loss_objectness, loss_rpn_box_reg = rpn.compute_loss(
        student.rpn_objectness.reshape(-1, 1), student.rpn_box_regression.reshape(-1, 4), anchor_labels, anchor_targets
    )  # (N, HWA) and (N, HWA, 4) flattened as concat_box_prediction_layers flattens them
    boxes, labels = [t["boxes"] for t in targets], [t["labels"] for t in targets]
    matched_idxs, roi_labels = heads.assign_targets_to_proposals(student.roi_proposals, boxes, labels)
    matched_boxes = [
        b[idx.clamp(min=0)] if b.numel() else torch.zeros_like(p)  # background RoIs' targets are not used
        for b, idx, p in zip(boxes, matched_idxs, student.roi_proposals)
    ]
    roi_targets = heads.box_coder.encode(matched_boxes, student.roi_proposals)
    loss_classifier, loss_box_reg = fastrcnn_loss(
        student.roi_class_logits, student.roi_box_regression, roi_labels, roi_targets
    )
    return {
        "loss_objectness": loss_objectness,
        "loss_rpn_box_reg": loss_rpn_box_reg,
        "loss_classifier": loss_classifier,
        "loss_box_reg": loss_box_reg,
    }


# --- student side: decoded box predictions -----------------------------------------------------
def _dense_boxes(output_name: str):
    """Per image (HWA, 4) boxes decoded from ``output_name`` with the adapter's box coder; they match by themselves."""

    def boxes(adapter: DetectorAdapter, student: DenseOutputs, detections: Detections):
        deltas = getattr(student, output_name)  # (N, HWA, 4)
        anchors = torch.cat(student.anchors)  # (N * HWA, 4)
        decoded = decode_boxes(adapter.box_coder_for(output_name), deltas.reshape(-1, 4), anchors)  # (N * HWA, 4)
        return list(decoded.reshape(deltas.shape).unbind(0)), None  # per image (HWA, 4)

    return boxes


def _roi_boxes(adapter: DetectorAdapter, student: DenseOutputs, detections: Detections):
    """Per image (R_i, D_i, 4): each sampled RoI's box at the class of each detection; they match by
    their proposals (the student's first-stage boxes)."""
    coder = adapter.box_coder_for("roi_box_regression")
    deltas = student.roi_box_regression  # (R, (K + 1) * 4)
    per_image = deltas.reshape(deltas.shape[0], -1, 4).split([len(p) for p in student.roi_proposals])  # (R_i, K + 1, 4)
    boxes = []
    for image_deltas, proposals, image_detections in zip(per_image, student.roi_proposals, detections):
        at_labels = image_deltas[:, image_detections["labels"]]  # (R_i, D_i, 4)
        references = proposals[:, None].expand_as(at_labels)  # (R_i, D_i, 4)
        decoded = decode_boxes(coder, at_labels.reshape(-1, 4), references.reshape(-1, 4))
        boxes.append(decoded.reshape(at_labels.shape))
    return boxes, list(student.roi_proposals)


@dataclass(frozen=True)
class _Family:
    detect: Callable[[DetectorAdapter, ImageList, DenseOutputs], Detections]
    loss_on: Callable[[DetectorAdapter, DenseOutputs, Detections], dict[str, Tensor]]
    boxes: Callable[[DetectorAdapter, DenseOutputs, Detections], tuple[list[Tensor], Optional[list[Tensor]]]]


_FAMILIES: dict[type, _Family] = {
    RCNNAdapter: _Family(_rcnn_detections, _rcnn_loss, _roi_boxes),
    RetinaNetAdapter: _Family(_one_stage_detections, _retinanet_loss, _dense_boxes("box_regression")),
    FCOSAdapter: _Family(_one_stage_detections, _fcos_loss, _dense_boxes("box_regression")),
    SSDAdapter: _Family(_ssd_detections, _ssd_loss, _dense_boxes("anchor_box_regression")),
}


def _family(adapter: DetectorAdapter) -> Optional[_Family]:
    return next((family for kind, family in _FAMILIES.items() if isinstance(adapter, kind)), None)


# --- construction-time checks ---------------------------------------------------------------------
def _label_range(adapter: DetectorAdapter) -> tuple[int, int]:
    """The labels the model can predict: 1..C-1 with background on channel 0 (R-CNN, SSD), 0..C-1 for
    one-stage sigmoid heads (label k on channel k)."""
    return adapter.class_channels - adapter.num_classes, adapter.class_channels - 1


def detections_refusal(student: DetectorAdapter, teachers: Sequence[DetectorAdapter]) -> Optional[str]:
    """Why terms on "detections" cannot pair these models (None: they can)."""
    unsupported = [type(a.model).__name__ for a in (student, *teachers) if _family(a) is None]
    if unsupported:
        return f"detection terms are not available for {', '.join(unsupported)}"
    if len(teachers) != 1:
        return (
            f"detection terms take one teacher, got {len(teachers)}: several teachers' detections are no one "
            "set of targets (distill them one at a time, or use per-output terms, which fuse teachers)"
        )
    low, high = _label_range(student)
    for index, teacher in enumerate(teachers):
        if teacher.class_channels != student.class_channels:
            t_low, t_high = _label_range(teacher)
            return (
                f"the teacher's detections become the student's labels, so both must number the same categories, "
                f"but teacher {index} ({type(teacher.model).__name__}) predicts labels {t_low}..{t_high} "
                f"({teacher.class_channels} class channels) and the student ({type(student.model).__name__}) "
                f"labels {low}..{high} ({student.class_channels}). Build both for the same categories in the same "
                "order (densekd numbers them 1..K, with K + 1 class channels in every family)"
            )
    return None


def detection_term_refusal(term: Term, student: DetectorAdapter, teachers: Sequence[DetectorAdapter]) -> Optional[str]:
    """Why ``term`` (on "detections") cannot be used with these models (None: it can)."""
    refusal = detections_refusal(student, teachers)
    if refusal is None and term.loss == "pseudo_targets" and term.class_weights is not None:
        refusal = (
            "pseudo_targets trains through the student's own torchvision loss, which weighs every target "
            "alike, so class_weights cannot apply; use them on 'matched_giou' or per-output terms"
        )
    return refusal


# --- the teacher's detections for a step -----------------------------------------------------------
def teacher_detections(
    adapter: DetectorAdapter, images: ImageList, outputs: DenseOutputs, image_sizes: Sequence[tuple[int, int]]
) -> Detections:
    """The teacher's eval-mode detections on ``images`` (a batch already transformed, whose
    ``features`` are in ``outputs``), moved from ``images.image_sizes`` to ``image_sizes`` (the
    student's resized sizes: the same under ``teacher_geometry="student"``); detections under
    ``MIN_DETECTION_SIDE`` pixels wide or high are dropped."""
    detections = []
    found = _family(adapter).detect(adapter, images, outputs)
    for image, (th, tw), (sh, sw) in zip(found, images.image_sizes, image_sizes):
        boxes = image["boxes"]
        if (th, tw) != (sh, sw):
            boxes = boxes * boxes.new_tensor([sw / tw, sh / th, sw / tw, sh / th])
        keep = ((boxes[:, 2:] - boxes[:, :2]) >= MIN_DETECTION_SIDE).all(dim=1)
        detections.append({"boxes": boxes[keep], "labels": image["labels"][keep], "scores": image["scores"][keep]})
    return detections


def _student_labels_only(detections: Detections, student: DetectorAdapter) -> Detections:
    """Detections whose label the student can learn (an FCOS teacher's label 0 is background to an
    R-CNN or SSD student)."""
    low, high = _label_range(student)
    kept = []
    for image in detections:
        keep = (image["labels"] >= low) & (image["labels"] <= high)
        kept.append({name: value[keep] for name, value in image.items()})
    return kept


# --- the terms ----------------------------------------------------------------------------------
def _pseudo_targets(term: Term, ctx: "StepContext", family: _Family, detections: Detections) -> Tensor:
    def student_loss(targets: Detections) -> dict[str, Tensor]:
        return family.loss_on(ctx.adapter, ctx.student, targets)

    return term.loss_fn(student_loss, detections, **term.params)


def _matched_giou(term: Term, ctx: "StepContext", family: _Family, detections: Detections) -> Tensor:
    student_boxes, match_boxes = family.boxes(ctx.adapter, ctx.student, detections)
    weights = None
    if term.class_weights is not None:
        per_label = ctx.per_label(term.class_weights)  # (C,)
        weights = [per_label.to(d["labels"].device)[d["labels"]] for d in detections]  # per image (D_i,)
    teacher_boxes, teacher_scores = [d["boxes"] for d in detections], [d["scores"] for d in detections]
    return term.loss_fn(
        student_boxes, teacher_boxes, teacher_scores, match_boxes=match_boxes, weights=weights, **term.params
    )


_BY_LOSS: dict[str, Callable[[Term, "StepContext", _Family, Detections], Tensor]] = {
    "pseudo_targets": _pseudo_targets,
    "matched_giou": _matched_giou,
}


def detection_term_loss(term: Term, ctx: "StepContext") -> Tensor:
    """The unweighted value of a term on "detections" (one teacher, checked at construction)."""
    detections = ctx.teachers[0].detections
    if detections is None:
        raise RuntimeError(
            f"Term {term.name!r} needs the teacher's detections, which this step did not compute (a teacher-output "
            "cache does not hold them): distill online."
        )
    return _BY_LOSS[term.loss](term, ctx, _family(ctx.adapter), _student_labels_only(detections, ctx.adapter))
