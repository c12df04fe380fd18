"""SSD and SSDlite: one head over the backbone's feature maps, a softmax over K + 1 classes
per default box (background at index 0), default boxes from a ``DefaultBoxGenerator``.

torchvision's ``SSD.forward`` runs ``backbone`` (an OrderedDict of maps "0", "1", ...; for
SSDlite on MobileNetV3 the C4 expansion, C5 and four extra blocks at strides 16 ... 512),
then ``head(list(features))`` -> ``{"bbox_regression": (N, HWA, 4), "cls_logits": (N, HWA, K + 1)}``
concatenated over the maps, and ``anchor_generator(images, features)`` -> per image (HWA, 4).
Its matcher (``SSDMatcher``) and hard-negative mining live in ``compute_loss``; only the
matcher is reused here, for teacher-bounded box terms and per-anchor labels.

The head's outputs are recorded as ``anchor_class_logits`` and ``anchor_box_regression``, not
``cls_logits``/``box_regression``: those names mean K independent sigmoids (RetinaNet, FCOS),
and a name that meant a sigmoid on one family and a softmax on another would let
``binary_kd`` through :data:`~densekd.core.terms.LOSSES_BY_OUTPUT` on an SSD (or ``kl`` on a
RetinaNet) and pair a sigmoid teacher with a softmax student. With their own names the table
stays the whole truth: softmax losses (``kl``, ``focal_kl``, ``margin``, ``dkd``) on SSD logits,
box losses on SSD deltas, and such terms pair only with another SSD-family model with the same
default boxes and feature grids.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor
from torchvision.models.detection.image_list import ImageList

from ...core.outputs import ANCHOR_HEAD_OUTPUTS, DETECTIONS, FEATURES, DenseOutputs
from .base import DetectorAdapter, match_with


class SSDAdapter(DetectorAdapter):
    """torchvision's ``SSD`` (``ssd300_vgg16``, ``ssdlite320_mobilenet_v3_large`` and densekd's
    SSDlite builders): per-anchor softmax logits (N, HWA, K + 1) and box deltas (N, HWA, 4)."""

    provides = frozenset({FEATURES, DETECTIONS}) | ANCHOR_HEAD_OUTPUTS
    matchable_box_outputs = frozenset({"anchor_box_regression"})
    #: SSD's maps are named by position ("0".."5"), not by FPN level: feature terms pair them with
    #: another model's maps by stride (:meth:`densekd.detection.distiller.Distiller._pair_levels`).
    pairs_levels_by_stride = True

    def tap_outputs(self) -> list[str]:
        return super().tap_outputs() + ["head", "anchor_generator"]

    # --- model facts --------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.class_channels - 1  # minus background

    @property
    def class_channels(self) -> int:
        """K + 1: torchvision's SSD ``num_classes`` counts the background (channel 0)."""
        return self.model.head.classification_head.num_columns

    def class_weights_convention(self) -> str:
        c = self.class_channels
        return (
            f"the student's SSD head has {c} class channels (a softmax per default box) with background on "
            f"channel 0: give {c - 1} weights, one per label 1..{c - 1}"
        )

    def anchor_signature(self) -> tuple:
        generator = self.model.anchor_generator
        steps = None if generator.steps is None else tuple(generator.steps)
        ratios = tuple(tuple(r) for r in generator.aspect_ratios)
        return (type(generator).__name__, ratios, tuple(generator.scales), steps, generator.clip)

    def missing_output_hint(self, output: str) -> str:
        return (
            " SSD's head is a softmax over K + 1 classes per default box: its per-anchor terms are "
            "on='anchor_class_logits' (kl, focal_kl, margin, dkd) and on='anchor_box_regression' (box losses), "
            "and pair only with an SSD teacher with the same default boxes and feature grids."
        )

    # --- student side -----------------------------------------------------------------
    def _collect_heads(self, records: dict[str, Any], outputs: DenseOutputs) -> None:
        self._fill_head(records["head"], outputs)
        outputs.anchors = records["anchor_generator"]  # per image (HWA, 4), xyxy in the resized frame

    # --- teacher side -----------------------------------------------------------------
    def _run_heads(self, images: ImageList, needs: set[str], student: DenseOutputs, outputs: DenseOutputs) -> None:
        if needs & ANCHOR_HEAD_OUTPUTS:
            self._fill_head(self.model.head(list(outputs.features.values())), outputs)

    def _fill_head(self, head_outputs: dict[str, Tensor], outputs: DenseOutputs) -> None:
        outputs.anchor_class_logits = head_outputs["cls_logits"]  # (N, HWA, K + 1)
        outputs.anchor_box_regression = head_outputs["bbox_regression"]  # (N, HWA, 4)

    # --- ground-truth matching ---------------------------------------------------------
    def box_coder_for(self, output_name: str) -> Any:
        if output_name == "anchor_box_regression":
            return self.model.box_coder
        return super().box_coder_for(output_name)

    def match_anchors(self, output_name: str, anchors: list[Tensor], gt_boxes: list[Tensor]) -> list[Tensor]:
        """SSD's own matcher (best anchor per GT box, then IoU >= its threshold), for both head outputs."""
        if output_name in ANCHOR_HEAD_OUTPUTS:
            return match_with(self.model.proposal_matcher, anchors, gt_boxes)
        return super().match_anchors(output_name, anchors, gt_boxes)
