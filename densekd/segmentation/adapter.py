"""Segmentation adapter: which submodules of a torchvision segmentation model (FCN, DeepLabV3,
LRASPP; any backbone) to tap, and how to drive a frozen teacher's submodules.

The student runs its own, unmodified forward: its return value holds the final logits ("out",
and "aux" with an auxiliary head) and a :class:`~densekd.core.taps.Tap` on ``backbone`` records the
features. The teacher does not run its full forward: the adapter calls its backbone and only the
heads the distillation terms need (none for feature-only terms), upsampling their logits exactly
as torchvision's forward does.

The teacher sees exactly the student's input tensor. torchvision's segmentation models have no
internal transform: they take images already resized and normalized by the data pipeline, so
there is nothing to re-normalize or re-size, and teacher and student logits pair pixel by pixel.
"""
from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation._utils import _SimpleSegmentationModel
from torchvision.models.segmentation.lraspp import LRASPP

from ..core.outputs import SegmentationOutputs
from ..core.taps import unwrap_model

FEATURES = "features"
SEG_LOGITS = "seg_logits"
AUX_LOGITS = "aux_logits"
SEGMENTATION_LOGIT_OUTPUTS = frozenset({SEG_LOGITS, AUX_LOGITS})
SEGMENTATION_FAMILIES = (_SimpleSegmentationModel, LRASPP)  # FCN and DeepLabV3 are _SimpleSegmentationModels


def is_segmentation_model(model: nn.Module) -> bool:
    """True for torchvision's segmentation models (FCN, DeepLabV3, LRASPP), DDP-wrapped or not."""
    return isinstance(unwrap_model(model), SEGMENTATION_FAMILIES)


def upsampled(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, K, h, w) -> (N, K, H, W), torchvision's own upsampling of segmentation logits; a no-op
    when the sizes already agree."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationAdapter:
    """Tapping and teacher-driving of one torchvision segmentation model."""

    def __init__(self, model: nn.Module):
        inner = unwrap_model(model)
        if not is_segmentation_model(inner):
            raise TypeError(
                f"SegmentationAdapter cannot tap a {type(inner).__name__}; supported segmentation families: "
                "FCN, DeepLabV3 (torchvision _SimpleSegmentationModel) and LRASPP."
            )
        self.model = inner
        self.has_aux = getattr(inner, "aux_classifier", None) is not None
        provides = {FEATURES, SEG_LOGITS}
        self.provides = frozenset(provides | {AUX_LOGITS} if self.has_aux else provides)

    # --- model facts --------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """K, the output channels of the classifier (its last convolution: FCNHead and
        DeepLabHead end in one, LRASPPHead's low and high classifiers both have K)."""
        convolutions = [m for m in self.model.classifier.modules() if isinstance(m, nn.Conv2d)]
        if not convolutions:
            raise TypeError(f"{type(self.model).__name__}.classifier has no Conv2d; cannot tell its class count.")
        return convolutions[-1].out_channels

    @property
    def label_counts(self) -> set[int]:
        """Possible lengths of per-class weights: one per class channel (labels 0..K-1)."""
        return {self.num_classes}

    def missing_output_hint(self, output: str) -> str:
        if output == AUX_LOGITS:
            return (
                f" {type(self.model).__name__} has no auxiliary head: build it with aux_loss=True "
                "(torchvision's FCN/DeepLabV3 builders) or distill 'seg_logits' instead; LRASPP has none."
            )
        return ""

    # --- student side -----------------------------------------------------------------
    def tap_outputs(self) -> list[str]:
        return ["backbone"]

    def collect(self, records: dict[str, Any], result: dict[str, Tensor], masks: Optional[Tensor]) -> SegmentationOutputs:
        """The student's outputs from its tap records and its forward's return value."""
        return SegmentationOutputs(
            features=dict(records["backbone"]),
            seg_logits=result["out"],
            aux_logits=result.get("aux"),
            masks=masks,
        )

    # --- teacher side -----------------------------------------------------------------
    def features_of(self, images: Tensor) -> dict[str, Tensor]:
        """Backbone level name -> (N, C, H_l, W_l)."""
        return dict(self.model.backbone(images))

    def main_logits(self, features: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
        """(N, K, H, W): the classifier on the backbone's features, upsampled to ``size``
        (what the model's forward returns as "out")."""
        head_input = features if isinstance(self.model, LRASPP) else features["out"]
        return upsampled(self.model.classifier(head_input), size)

    def aux_logits(self, features: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
        """(N, K, H, W): the auxiliary classifier, upsampled to ``size`` (the forward's "aux")."""
        return upsampled(self.model.aux_classifier(features["aux"]), size)

    def run(self, images: Tensor, needs: set[str]) -> SegmentationOutputs:
        """Compute the outputs in ``needs`` on ``images`` (N, 3, H, W): the backbone always,
        each head only when a term needs its logits."""
        size = tuple(images.shape[-2:])
        outputs = SegmentationOutputs(features=self.features_of(images))
        if SEG_LOGITS in needs:
            outputs.seg_logits = self.main_logits(outputs.features, size)
        if AUX_LOGITS in needs:
            outputs.aux_logits = self.aux_logits(outputs.features, size)
        return outputs
