"""Faster R-CNN and Mask R-CNN: the RPN per anchor, the RoI heads per sampled proposal
(re-run on the student's proposals for the teacher, so RoI outputs pair one to one)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from ...core.outputs import FEATURES, MASK_OUTPUTS, ROI_OUTPUTS, RPN_OUTPUTS, DenseOutputs
from .base import DetectorAdapter, match_with


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
            return match_with(self.model.rpn.proposal_matcher, anchors, gt_boxes)
        return super().match_anchors(output_name, anchors, gt_boxes)

    def assign_rois(self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]):
        """Per image matched GT index and label (0 = background) of every RoI, as the RoI head
        assigns them (deterministic given the proposals, unlike the sampling that chose them)."""
        return self.model.roi_heads.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
