"""What every detector adapter shares: the tap points and teacher-driving contract of
:class:`DetectorAdapter`, and box coding with torchvision's own coders."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from ...core.outputs import ANCHOR_HEAD_OUTPUTS, FEATURES, DenseOutputs
from ...core.taps import unwrap_model
from ...core.weighting import label_channel_layout


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
    #: True where feature maps are named by position, not FPN level (SSD), so that feature terms
    #: pair them with another model's maps by stride rather than by name
    pairs_levels_by_stride: bool = False

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
        """Possible K (labels 1..K) for this head; see :func:`densekd.core.weighting.label_channel_layout`."""
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
        if output in ANCHOR_HEAD_OUTPUTS:
            return (
                f" {output!r} is an SSD head's (a softmax over K + 1 per default box): it pairs only between "
                f"SSD-family models, not with a {type(self.model).__name__}."
            )
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
        outputs = empty_outputs(images)
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
        outputs = empty_outputs(images)
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


def empty_outputs(images: ImageList) -> DenseOutputs:
    return DenseOutputs(
        image_sizes=[tuple(s) for s in images.image_sizes],
        batch_shape=tuple(images.tensors.shape[-2:]),
    )


def match_with(matcher: Any, anchors: list[Tensor], gt_boxes: list[Tensor]) -> list[Tensor]:
    matched = []
    for anchors_per_image, boxes in zip(anchors, gt_boxes):
        if boxes.numel() == 0:
            matched.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64, device=boxes.device))
        else:
            matched.append(matcher(box_iou(boxes, anchors_per_image)))
    return matched
