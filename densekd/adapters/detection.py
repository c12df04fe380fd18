"""Family adapters: which submodules of a torchvision detector to tap, and how to turn
what they return into :class:`~densekd.outputs.DenseOutputs`.

The student runs its own, unmodified forward (so torchvision computes its usual losses)
while a :class:`~densekd.taps.Tap` records the attach points listed here. The teacher
does not run its full forward: the adapter drives its submodules directly on the
student's batch, computing only what the distillation terms need (the backbone alone
when only feature terms are used) and running the RoI heads on the student's proposals
so that RoI outputs pair one to one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou

from ..outputs import DenseOutputs
from ..taps import unwrap_model
from ..weighting import label_channel_layout

FEATURES = "features"
DENSE_HEAD_OUTPUTS = frozenset({"cls_logits", "box_regression", "centerness"})
RPN_OUTPUTS = frozenset({"rpn_objectness", "rpn_box_regression"})
ROI_OUTPUTS = frozenset({"roi_class_logits", "roi_box_regression", "roi_features"})
MASK_OUTPUTS = frozenset({"mask_logits"})
# Outputs indexed per anchor: they pair only when both models share anchors and strides.
PER_ANCHOR_OUTPUTS = DENSE_HEAD_OUTPUTS | RPN_OUTPUTS


def decode_boxes(box_coder: Any, deltas: Tensor, anchors: Tensor) -> Tensor:
    """Decode (M, 4) deltas against (M, 4) anchors with torchvision's own coder."""
    if isinstance(box_coder, BoxLinearCoder):
        return box_coder.decode(deltas, anchors)
    return box_coder.decode_single(deltas, anchors)


def encode_boxes(box_coder: Any, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
    """Encode (M, 4) matched ground-truth boxes against (M, 4) anchors."""
    if isinstance(box_coder, BoxLinearCoder):
        return box_coder.encode(anchors, gt_boxes)  # BoxLinearCoder takes (anchors, targets)
    return box_coder.encode_single(gt_boxes, anchors)


class DetectorAdapter(ABC):
    """Base class: the shared part of tapping and teacher-driving a torchvision detector."""

    #: every output name this family can produce
    provides: frozenset[str] = frozenset({FEATURES})
    #: box outputs whose anchors/RoIs can be matched to ground truth (teacher-bounded terms)
    matchable_box_outputs: frozenset[str] = frozenset()

    def __init__(self, model: nn.Module):
        self.model = unwrap_model(model)

    # --- what to tap on the student ---------------------------------------------------
    def tap_outputs(self) -> list[str]:
        return ["transform", "backbone"]

    def tap_inputs(self) -> list[str]:
        return []

    # --- model facts --------------------------------------------------------------------
    @property
    @abstractmethod
    def num_classes(self) -> int:
        """K, the number of foreground classes."""

    @property
    @abstractmethod
    def class_channels(self) -> int:
        """C, the class channels of the head; torchvision puts label k on channel k."""

    @property
    def label_counts(self) -> set[int]:
        """Possible K (labels 1..K) for this head; see :func:`densekd.weighting.label_channel_layout`."""
        return {self.num_classes}

    @abstractmethod
    def class_weights_convention(self) -> str:
        """How many per-class values this head takes, and for which labels (for error messages)."""

    def per_label(self, values: Tensor, fill: float = 1.0) -> Tensor:
        """Per-class values ``(K,)`` or ``(C,)`` as ``(C,)`` indexed by label, the layout of the
        class channels: ``per_label(w)[labels]`` is each label's value, ``fill`` where a channel
        has no label (background, or channel 0 of a head trained on labels 1..K)."""
        return label_channel_layout(values, self.class_channels, fill)

    @property
    def image_mean_std(self) -> tuple[list[float], list[float]]:
        return list(self.model.transform.image_mean), list(self.model.transform.image_std)

    def anchor_signature(self) -> Optional[tuple]:
        """What must be equal for per-anchor outputs of two models to pair (None: no anchors)."""
        return None

    def missing_output_hint(self, output: str) -> str:
        """How to get ``output`` from a model of this family that lacks it ('' when no advice)."""
        return ""

    def features_of(self, images_tensor: Tensor) -> "dict[str, Tensor]":
        features = self.model.backbone(images_tensor)
        if isinstance(features, Tensor):  # torchvision's convention for single-level backbones
            features = {"0": features}
        return features

    # --- student side -----------------------------------------------------------------
    def collect(self, records: dict[str, Any]) -> DenseOutputs:
        """Turn one forward's tap records into outputs (student side, GT included)."""
        images, targets = records["transform"]
        features = records["backbone"]
        if isinstance(features, Tensor):
            features = {"0": features}
        outputs = _empty_outputs(images)
        outputs.features = dict(features)
        if targets is not None:
            outputs.gt_boxes = [t["boxes"] for t in targets]
            outputs.gt_labels = [t["labels"] for t in targets]
        self._collect_heads(records, outputs)
        return outputs

    def _collect_heads(self, records: dict[str, Any], outputs: DenseOutputs) -> None:
        pass

    # --- teacher side -----------------------------------------------------------------
    def run(self, images: ImageList, needs: set[str], student: DenseOutputs) -> DenseOutputs:
        """Compute the outputs in ``needs`` on a batch that is already transformed.

        ``student`` supplies the RoIs for two-stage heads (already in this model's frame).
        """
        outputs = _empty_outputs(images)
        outputs.features = self.features_of(images.tensors)
        self._run_heads(images, needs, student, outputs)
        return outputs

    def _run_heads(self, images: ImageList, needs: set[str], student: DenseOutputs, outputs: DenseOutputs) -> None:
        pass

    # --- ground-truth matching for box terms -------------------------------------------
    def box_coder_for(self, output_name: str) -> Any:
        raise ValueError(f"{type(self.model).__name__} has no box coder for {output_name!r}.")

    def match_anchors(self, output_name: str, anchors: list[Tensor], gt_boxes: list[Tensor]) -> list[Tensor]:
        """Per image (HWA,) index of the matched GT box, negative where unmatched."""
        raise ValueError(
            f"{type(self.model).__name__} cannot match {output_name!r} anchors to ground truth "
            "outside its loss function; use 'delta_l1', 'delta_l2' or 'giou' for this output."
        )


def _empty_outputs(images: ImageList) -> DenseOutputs:
    return DenseOutputs(
        image_sizes=[tuple(s) for s in images.image_sizes],
        batch_shape=tuple(images.tensors.shape[-2:]),
    )


def _match_with(matcher: Any, anchors: list[Tensor], gt_boxes: list[Tensor]) -> list[Tensor]:
    matched = []
    for anchors_per_image, boxes in zip(anchors, gt_boxes):
        if boxes.numel() == 0:
            matched.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64, device=boxes.device))
        else:
            matched.append(matcher(box_iou(boxes, anchors_per_image)))
    return matched


class _OneStageAdapter(DetectorAdapter):
    """RetinaNet and FCOS: ``head(features)`` returns a dict of (N, HWA, ...) tensors."""

    def tap_outputs(self) -> list[str]:
        return super().tap_outputs() + ["head", "anchor_generator"]

    @property
    def num_classes(self) -> int:
        """Sigmoid class channels of the head."""
        return self.model.head.classification_head.num_classes

    @property
    def class_channels(self) -> int:
        return self.num_classes

    @property
    def label_counts(self) -> set[int]:
        # torchvision's one-stage losses put label k on channel k, so a head trained on labels
        # 1..K has K + 1 channels (channel 0 unused); one trained on 0..K-1 has K.
        return {self.num_classes, self.num_classes - 1}

    def class_weights_convention(self) -> str:
        c = self.class_channels
        return (
            f"the student's {type(self.model).__name__} head has {c} class channels with label k on channel k: "
            f"give {c} weights for labels 0..{c - 1}, or {c - 1} for labels 1..{c - 1} (channel 0 unused; "
            "densekd's datasets and build_detector number labels 1..K)"
        )

    def anchor_signature(self) -> tuple:
        generator = self.model.anchor_generator
        return (type(generator).__name__, tuple(generator.sizes), tuple(generator.aspect_ratios))

    def _collect_heads(self, records: dict[str, Any], outputs: DenseOutputs) -> None:
        self._fill_head(records["head"], outputs)
        outputs.anchors = records["anchor_generator"]

    def _run_heads(self, images: ImageList, needs: set[str], student: DenseOutputs, outputs: DenseOutputs) -> None:
        if needs & DENSE_HEAD_OUTPUTS:
            self._fill_head(self.model.head(list(outputs.features.values())), outputs)

    def _fill_head(self, head_outputs: dict[str, Tensor], outputs: DenseOutputs) -> None:
        outputs.cls_logits = head_outputs["cls_logits"]
        outputs.box_regression = head_outputs["bbox_regression"]

    def box_coder_for(self, output_name: str) -> Any:
        if output_name == "box_regression":
            return self.model.box_coder
        return super().box_coder_for(output_name)


class RetinaNetAdapter(_OneStageAdapter):
    provides = frozenset({FEATURES, "cls_logits", "box_regression"})
    matchable_box_outputs = frozenset({"box_regression"})

    def match_anchors(self, output_name: str, anchors: list[Tensor], gt_boxes: list[Tensor]) -> list[Tensor]:
        if output_name == "box_regression":
            return _match_with(self.model.proposal_matcher, anchors, gt_boxes)
        return super().match_anchors(output_name, anchors, gt_boxes)


class FCOSAdapter(_OneStageAdapter):
    provides = frozenset({FEATURES, "cls_logits", "box_regression", "centerness"})

    def _fill_head(self, head_outputs: dict[str, Tensor], outputs: DenseOutputs) -> None:
        super()._fill_head(head_outputs, outputs)
        outputs.centerness = head_outputs["bbox_ctrness"].squeeze(-1)  # (N, HWA, 1) -> (N, HWA)


class RCNNAdapter(DetectorAdapter):
    """Faster R-CNN and Mask R-CNN: RPN per anchor, RoI heads per sampled proposal."""

    matchable_box_outputs = frozenset({"rpn_box_regression", "roi_box_regression"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.has_mask = self.model.roi_heads.has_mask()
        provides = {FEATURES} | RPN_OUTPUTS | ROI_OUTPUTS
        self.provides = frozenset(provides | MASK_OUTPUTS if self.has_mask else provides)

    @property
    def num_classes(self) -> int:
        return self.class_channels - 1  # minus background

    @property
    def class_channels(self) -> int:
        return self.model.roi_heads.box_predictor.cls_score.out_features

    def class_weights_convention(self) -> str:
        c = self.class_channels
        return (
            f"the student's {type(self.model).__name__} RoI head has {c} class channels with background on "
            f"channel 0: give {c - 1} weights, one per label 1..{c - 1}"
        )

    def anchor_signature(self) -> tuple:
        generator = self.model.rpn.anchor_generator
        return (type(generator).__name__, tuple(generator.sizes), tuple(generator.aspect_ratios))

    def tap_outputs(self) -> list[str]:
        names = super().tap_outputs() + [
            "rpn.head",
            "rpn.anchor_generator",
            "roi_heads.box_head",
            "roi_heads.box_predictor",
        ]
        return names + (["roi_heads.mask_predictor"] if self.has_mask else [])

    def tap_inputs(self) -> list[str]:
        return ["roi_heads.box_roi_pool"] + (["roi_heads.mask_roi_pool"] if self.has_mask else [])

    def _collect_heads(self, records: dict[str, Any], outputs: DenseOutputs) -> None:
        self._fill_rpn(records["rpn.head"], outputs)
        outputs.anchors = records["rpn.anchor_generator"]
        outputs.roi_proposals = list(records["roi_heads.box_roi_pool:inputs"][1])
        outputs.roi_features = records["roi_heads.box_head"]
        outputs.roi_class_logits, outputs.roi_box_regression = records["roi_heads.box_predictor"]
        if self.has_mask and "roi_heads.mask_roi_pool:inputs" in records:
            outputs.mask_proposals = list(records["roi_heads.mask_roi_pool:inputs"][1])
            outputs.mask_logits = records["roi_heads.mask_predictor"]

    def _fill_rpn(self, head_outputs: tuple[list[Tensor], list[Tensor]], outputs: DenseOutputs) -> None:
        objectness, deltas = head_outputs  # per level (N, A, H, W) and (N, A * 4, H, W)
        num_images = objectness[0].shape[0]
        # torchvision's own flattening, so anchors line up: -> (N * HWA, 1), (N * HWA, 4)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        outputs.rpn_objectness = objectness.reshape(num_images, -1)  # (N, HWA)
        outputs.rpn_box_regression = deltas.reshape(num_images, -1, 4)  # (N, HWA, 4)

    def _run_heads(self, images: ImageList, needs: set[str], student: DenseOutputs, outputs: DenseOutputs) -> None:
        if needs & RPN_OUTPUTS:
            self._fill_rpn(self.model.rpn.head(list(outputs.features.values())), outputs)
        roi_heads = self.model.roi_heads
        if needs & ROI_OUTPUTS:
            outputs.roi_proposals = student.roi_proposals
            pooled = roi_heads.box_roi_pool(outputs.features, student.roi_proposals, images.image_sizes)
            outputs.roi_features = roi_heads.box_head(pooled)
            outputs.roi_class_logits, outputs.roi_box_regression = roi_heads.box_predictor(outputs.roi_features)
        if needs & MASK_OUTPUTS and student.mask_proposals is not None:
            outputs.mask_proposals = student.mask_proposals
            pooled = roi_heads.mask_roi_pool(outputs.features, student.mask_proposals, images.image_sizes)
            outputs.mask_logits = roi_heads.mask_predictor(roi_heads.mask_head(pooled))

    def box_coder_for(self, output_name: str) -> Any:
        if output_name == "rpn_box_regression":
            return self.model.rpn.box_coder
        if output_name == "roi_box_regression":
            return self.model.roi_heads.box_coder
        return super().box_coder_for(output_name)

    def match_anchors(self, output_name: str, anchors: list[Tensor], gt_boxes: list[Tensor]) -> list[Tensor]:
        if output_name == "rpn_box_regression":
            return _match_with(self.model.rpn.proposal_matcher, anchors, gt_boxes)
        return super().match_anchors(output_name, anchors, gt_boxes)

    def assign_rois(self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]):
        """Per image matched GT index and label (0 = background) of every RoI, as the RoI head
        assigns them (deterministic given the proposals, unlike the sampling that chose them)."""
        return self.model.roi_heads.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)


_ADAPTERS: dict[type, type] = {GeneralizedRCNN: RCNNAdapter, RetinaNet: RetinaNetAdapter, FCOS: FCOSAdapter}


def adapter_for(model: nn.Module) -> DetectorAdapter:
    """The adapter of a torchvision detector (FasterRCNN, MaskRCNN, RetinaNet, FCOS)."""
    inner = unwrap_model(model)
    for model_type, adapter_type in _ADAPTERS.items():
        if isinstance(inner, model_type):
            return adapter_type(inner)
    supported = ", ".join(t.__name__ for t in _ADAPTERS)
    raise TypeError(
        f"densekd cannot tap a {type(inner).__name__}; supported detector families: {supported} "
        "(FasterRCNN and MaskRCNN are GeneralizedRCNN models)."
    )
