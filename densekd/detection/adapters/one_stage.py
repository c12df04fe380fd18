"""RetinaNet and FCOS: one dense head over the FPN levels, sigmoid class scores (no
background channel), anchors or locations per level."""
from __future__ import annotations

from typing import Any

from torch import Tensor
from torchvision.models.detection.image_list import ImageList

from ...core.outputs import DENSE_HEAD_OUTPUTS, DETECTIONS, FEATURES, DenseOutputs
from .base import DetectorAdapter, match_with


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
    provides = frozenset({FEATURES, DETECTIONS, "cls_logits", "box_regression"})
    matchable_box_outputs = frozenset({"box_regression"})

    def match_anchors(self, output_name: str, anchors: list[Tensor], gt_boxes: list[Tensor]) -> list[Tensor]:
        if output_name == "box_regression":
            return match_with(self.model.proposal_matcher, anchors, gt_boxes)
        return super().match_anchors(output_name, anchors, gt_boxes)


class FCOSAdapter(_OneStageAdapter):
    provides = frozenset({FEATURES, DETECTIONS, "cls_logits", "box_regression", "centerness"})

    def _fill_head(self, head_outputs: dict[str, Tensor], outputs: DenseOutputs) -> None:
        super()._fill_head(head_outputs, outputs)
        outputs.centerness = head_outputs["bbox_ctrness"].squeeze(-1)  # (N, HWA, 1) -> (N, HWA)


