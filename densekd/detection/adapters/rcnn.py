"""Faster, Mask and Keypoint R-CNN: the RPN per anchor, the RoI heads per sampled proposal
(re-run on the student's proposals for the teacher, so RoI outputs pair one to one), the mask
and keypoint heads per positive RoI (re-run on the student's positive RoIs)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import keypoints_to_heatmap
from torchvision.models.detection.rpn import concat_box_prediction_layers

from ...core.outputs import DETECTIONS, FEATURES, KEYPOINT_OUTPUTS, MASK_OUTPUTS, ROI_OUTPUTS, RPN_OUTPUTS, DenseOutputs
from .base import DetectorAdapter, match_with


class RCNNAdapter(DetectorAdapter):
    """Faster, Mask and Keypoint R-CNN: RPN per anchor, RoI heads per sampled proposal, mask and
    keypoint heads per positive RoI."""

    matchable_box_outputs = frozenset({"rpn_box_regression", "roi_box_regression"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.has_mask = self.model.roi_heads.has_mask()
        self.has_keypoint = self.model.roi_heads.has_keypoint()
        provides = {FEATURES, DETECTIONS} | RPN_OUTPUTS | ROI_OUTPUTS
        provides |= MASK_OUTPUTS if self.has_mask else set()
        provides |= KEYPOINT_OUTPUTS if self.has_keypoint else set()
        self.provides = frozenset(provides)

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
        names += ["roi_heads.mask_predictor"] if self.has_mask else []
        return names + (["roi_heads.keypoint_predictor"] if self.has_keypoint else [])

    def tap_inputs(self) -> list[str]:
        names = ["roi_heads.box_roi_pool"] + (["roi_heads.mask_roi_pool"] if self.has_mask else [])
        return names + (["roi_heads.keypoint_roi_pool"] if self.has_keypoint else [])

    def missing_output_hint(self, output: str) -> str:
        if output in MASK_OUTPUTS:
            return " Mask terms need a MaskRCNN (roi_heads with a mask head) as the student and every teacher."
        if output in KEYPOINT_OUTPUTS:
            return (
                " Keypoint terms need a KeypointRCNN (roi_heads with keypoint_roi_pool, keypoint_head and "
                "keypoint_predictor) as the student and every teacher."
            )
        return ""

    def keypoint_layout(self) -> Optional[tuple]:
        """What must be equal for two models' keypoint heatmaps to pair: (K_kp, the keypoint RoI
        pool's output size); None without a keypoint head, K_kp None when the predictor does not say."""
        if not self.has_keypoint:
            return None
        heads = self.model.roi_heads
        return getattr(heads.keypoint_predictor, "out_channels", None), tuple(heads.keypoint_roi_pool.output_size)

    def _collect_heads(self, records: dict[str, Any], outputs: DenseOutputs) -> None:
        self._fill_rpn(records["rpn.head"], outputs)
        outputs.anchors = records["rpn.anchor_generator"]
        outputs.roi_proposals = list(records["roi_heads.box_roi_pool:inputs"][1])
        outputs.roi_features = records["roi_heads.box_head"]
        outputs.roi_class_logits, outputs.roi_box_regression = records["roi_heads.box_predictor"]
        if self.has_mask and "roi_heads.mask_roi_pool:inputs" in records:
            outputs.mask_proposals = list(records["roi_heads.mask_roi_pool:inputs"][1])
            outputs.mask_logits = records["roi_heads.mask_predictor"]
        if self.has_keypoint and "roi_heads.keypoint_roi_pool:inputs" in records:
            # training: the positive sampled RoIs (evaluation: the detections)
            outputs.keypoint_proposals = list(records["roi_heads.keypoint_roi_pool:inputs"][1])
            outputs.keypoint_logits = records["roi_heads.keypoint_predictor"]  # (P, K_kp, S, S)
            targets = records["transform"][1]
            if targets is not None:
                outputs.gt_keypoints = [t["keypoints"] for t in targets]  # per image (G_i, K_kp, 3), resized

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
        if needs & KEYPOINT_OUTPUTS and student.keypoint_proposals is not None:
            outputs.keypoint_proposals = student.keypoint_proposals
            pooled = roi_heads.keypoint_roi_pool(outputs.features, student.keypoint_proposals, images.image_sizes)
            outputs.keypoint_logits = roi_heads.keypoint_predictor(roi_heads.keypoint_head(pooled))  # (P, K_kp, S, S)

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

    def keypoint_visibility(
        self,
        proposals: list[Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        gt_keypoints: list[Tensor],
        heatmap_size: int,
    ) -> Tensor:
        """(P, K_kp) bool for per-image positive RoIs ``proposals`` (P_i, 4): whether the keypoint of
        each RoI's matched GT instance is labelled visible and falls inside the RoI, torchvision's
        ``valid`` (the keypoints its ``keypointrcnn_loss`` trains), from its own
        ``keypoints_to_heatmap`` on (G_i, K_kp, 3) keypoints and S = ``heatmap_size``."""
        matched_idxs, _ = self.assign_rois(proposals, gt_boxes, gt_labels)
        visible = []
        for rois, keypoints, idx in zip(proposals, gt_keypoints, matched_idxs):
            if rois.shape[0] == 0:
                visible.append(torch.zeros(0, keypoints.shape[1], dtype=torch.bool, device=rois.device))
                continue
            _, valid = keypoints_to_heatmap(keypoints[idx], rois, heatmap_size)  # (P_i, K_kp) int64
            visible.append(valid.bool())
        return torch.cat(visible)
