"""What one forward pass of a detector exposes to distillation.

A family adapter fills the fields its architecture has and leaves the rest ``None``.
Shapes use N images, HWA anchors (or locations) summed over all FPN levels in
torchvision's order (level-major, then row, column, anchor), K foreground classes,
R sampled RoIs over the whole batch and P positive RoIs; Keypoint R-CNN adds K_kp keypoints
per instance and S, the side of its keypoint heatmaps (56 in torchvision).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

# The names terms are `on`: DenseOutputs' fields, grouped by the head that computes them.
FEATURES = "features"
DENSE_HEAD_OUTPUTS = frozenset({"cls_logits", "box_regression", "centerness"})
ANCHOR_HEAD_OUTPUTS = frozenset({"anchor_class_logits", "anchor_box_regression"})  # SSD / SSDlite
RPN_OUTPUTS = frozenset({"rpn_objectness", "rpn_box_regression"})
ROI_OUTPUTS = frozenset({"roi_class_logits", "roi_box_regression", "roi_features"})
MASK_OUTPUTS = frozenset({"mask_logits"})
KEYPOINT_OUTPUTS = frozenset({"keypoint_logits"})
# Post-processed detections (every family): they pair across families (densekd.detection.predictions).
DETECTIONS = "detections"
# Outputs indexed per anchor: they pair only when both models share anchors and strides.
PER_ANCHOR_OUTPUTS = DENSE_HEAD_OUTPUTS | ANCHOR_HEAD_OUTPUTS | RPN_OUTPUTS


@dataclass
class DenseOutputs:
    # Geometry of the batch the features were computed on.
    image_sizes: list[tuple[int, int]]
    """Resized (H, W) of every image before padding, in the frame of the features."""
    batch_shape: tuple[int, int]
    """Padded (H, W) of the batched tensor fed to the backbone."""

    features: dict[str, Tensor] = field(default_factory=dict)
    """FPN level name -> (N, C, H_l, W_l), in the backbone's own level order."""

    # Dense one-stage heads (RetinaNet, FCOS): sigmoid class scores, no background class.
    cls_logits: Optional[Tensor] = None
    """(N, HWA, K) class logits per anchor/location."""
    box_regression: Optional[Tensor] = None
    """(N, HWA, 4) box deltas per anchor/location, in the model's own box coding."""
    centerness: Optional[Tensor] = None
    """(N, HWA) FCOS centerness logits."""

    # SSD / SSDlite heads: a softmax over K + 1 classes per default box, background at index 0.
    # Named apart from cls_logits/box_regression: a different probability model (softmax, not
    # K sigmoids), so each output name has one set of valid losses (core.terms.LOSSES_BY_OUTPUT).
    anchor_class_logits: Optional[Tensor] = None
    """(N, HWA, K + 1) class logits per default box, background at index 0."""
    anchor_box_regression: Optional[Tensor] = None
    """(N, HWA, 4) box deltas per default box, in the model's own box coding (SSD: weights 10, 10, 5, 5)."""

    # Region proposal network (Faster/Mask R-CNN).
    rpn_objectness: Optional[Tensor] = None
    """(N, HWA) objectness logits per anchor."""
    rpn_box_regression: Optional[Tensor] = None
    """(N, HWA, 4) RPN box deltas per anchor."""

    anchors: Optional[list[Tensor]] = None
    """Per image (HWA, 4) anchors (xyxy, resized frame) of the dense head or RPN."""

    # Second stage (Faster/Mask R-CNN): softmax classes, background at index 0.
    roi_proposals: Optional[list[Tensor]] = None
    """Per image (R_i, 4) boxes the RoI head pooled (the student's sampled proposals)."""
    roi_class_logits: Optional[Tensor] = None
    """(R, K + 1) class logits of the box predictor."""
    roi_box_regression: Optional[Tensor] = None
    """(R, (K + 1) * 4) class-specific box deltas of the box predictor."""
    roi_features: Optional[Tensor] = None
    """(R, D) box-head embeddings, the input of the box predictor."""
    mask_proposals: Optional[list[Tensor]] = None
    """Per image (P_i, 4) positive RoIs the mask head pooled (training only)."""
    mask_logits: Optional[Tensor] = None
    """(P, K + 1, M, M) mask logits, one map per class."""
    keypoint_proposals: Optional[list[Tensor]] = None
    """Per image (P_i, 4) positive RoIs the keypoint head pooled (Keypoint R-CNN, training only)."""
    keypoint_logits: Optional[Tensor] = None
    """(P, K_kp, S, S) keypoint heatmap logits, one map per keypoint, each a spatial softmax over its S * S cells."""

    # The model's own eval-mode output (teacher side, for terms on "detections").
    detections: Optional[list[dict[str, Tensor]]] = None
    """Per image ``{"boxes": (D_i, 4) xyxy in the resized frame of the student's batch, "labels": (D_i,)
    int64, "scores": (D_i,)}`` after the model's own score threshold and NMS."""

    # Ground truth in the resized frame the features see (student side only).
    gt_boxes: Optional[list[Tensor]] = None
    """Per image (G_i, 4) xyxy boxes."""
    gt_labels: Optional[list[Tensor]] = None
    """Per image (G_i,) int64 labels in 1..K."""
    gt_keypoints: Optional[list[Tensor]] = None
    """Per image (G_i, K_kp, 3) keypoints (x, y, visibility; 0 = not labelled) of Keypoint R-CNN."""


@dataclass
class SegmentationOutputs:
    """What one forward pass of a torchvision segmentation model (FCN, DeepLabV3, LRASPP)
    exposes to distillation. K classes (all channels, background included where the dataset
    has one), (H, W) the input batch's size."""

    features: dict[str, Tensor] = field(default_factory=dict)
    """Backbone level name -> (N, C, H_l, W_l): {"aux", "out"} (FCN, DeepLabV3; "aux" only with
    an auxiliary head) or {"low", "high"} (LRASPP), in the backbone's order."""
    seg_logits: Optional[Tensor] = None
    """The classifier's logits: (N, K, h, w) at the head's own resolution (the default), or
    (N, K, H, W) upsampled to the input size (``logit_resolution="input"``)."""
    aux_logits: Optional[Tensor] = None
    """The auxiliary head's logits, at the same resolution as ``seg_logits`` (None without one)."""
    masks: Optional[Tensor] = None
    """(N, H, W) int64 ground-truth classes 0..K-1 or the ignore index (student side only)."""
