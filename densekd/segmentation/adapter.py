"""Segmentation adapter: which submodules of a torchvision segmentation model (FCN, DeepLabV3,
LRASPP; any backbone) to tap, and how to drive a frozen teacher's submodules.

The student runs its own, unmodified forward. torchvision's forward (``_SimpleSegmentationModel``,
``LRASPP``) runs ``classifier`` (and ``aux_classifier``) on the backbone's features, then
upsamples their logits to the input size (bilinear) as "out" (and "aux"). The logits the
distillation terms compare come from one of two places (``logit_resolution``):

* "head": a :class:`~densekd.core.taps.Tap` on ``classifier`` and ``aux_classifier`` records their
  outputs before that upsampling, (N, K, h, w) at the head's stride (FCN/DeepLabV3: the "out" and
  "aux" levels' strides; LRASPP: its "low" level's);
* "input": the forward's return value, (N, K, H, W) at the input size.

A Tap on ``backbone`` records the features either way. The teacher does not run its full
forward: the adapter calls its backbone and only the heads the distillation terms need (none
for feature-only terms), upsampling their logits exactly as torchvision's forward does in
"input" mode and not at all in "head" mode.

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
# Where logit terms compare: the classifiers' own outputs, or torchvision's upsampled ones.
LOGIT_RESOLUTIONS = ("head", "input")


def is_segmentation_model(model: nn.Module) -> bool:
    """True for torchvision's segmentation models (FCN, DeepLabV3, LRASPP), DDP-wrapped or not."""
    return isinstance(unwrap_model(model), SEGMENTATION_FAMILIES)


def upsampled(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, K, h, w) -> (N, K, H, W), torchvision's own upsampling of segmentation logits; a no-op
    when the sizes already agree."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def check_logit_resolution(logit_resolution: str) -> str:
    if logit_resolution not in LOGIT_RESOLUTIONS:
        raise ValueError(
            f"logit_resolution must be 'head' or 'input', got {logit_resolution!r}: 'head' compares the "
            "classifiers' logits before torchvision upsamples them, 'input' the upsampled (N, K, H, W) logits."
        )
    return logit_resolution


class SegmentationAdapter:
    """Tapping and teacher-driving of one torchvision segmentation model.

    Args:
        model: FCN, DeepLabV3 or LRASPP (any backbone), DDP-wrapped or not.
        logit_resolution: "head" (the classifiers' outputs, (N, K, h, w)) or "input" (the
            forward's upsampled "out"/"aux", (N, K, H, W)); see the module docstring.
    """

    def __init__(self, model: nn.Module, logit_resolution: str = "head"):
        inner = unwrap_model(model)
        if not is_segmentation_model(inner):
            raise TypeError(
                f"SegmentationAdapter cannot tap a {type(inner).__name__}; supported segmentation families: "
                "FCN, DeepLabV3 (torchvision _SimpleSegmentationModel) and LRASPP."
            )
        self.model = inner
        self.logit_resolution = check_logit_resolution(logit_resolution)
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
    @property
    def _at_head(self) -> bool:
        return self.logit_resolution == "head"

    def tap_outputs(self) -> list[str]:
        if not self._at_head:
            return ["backbone"]
        return ["backbone", "classifier"] + (["aux_classifier"] if self.has_aux else [])

    def collect(self, records: dict[str, Any], result: dict[str, Tensor], masks: Optional[Tensor]) -> SegmentationOutputs:
        """The student's outputs from its tap records and its forward's return value; ``masks``
        (N, H, W) stay at the input size."""
        if self._at_head:
            seg_logits, aux_logits = records["classifier"], records.get("aux_classifier")
        else:
            seg_logits, aux_logits = result["out"], result.get("aux")
        return SegmentationOutputs(
            features=dict(records["backbone"]), seg_logits=seg_logits, aux_logits=aux_logits, masks=masks
        )

    # --- teacher side -----------------------------------------------------------------
    def features_of(self, images: Tensor) -> dict[str, Tensor]:
        """Backbone level name -> (N, C, H_l, W_l)."""
        return dict(self.model.backbone(images))

    def main_logits(self, features: dict[str, Tensor], size: Optional[tuple[int, int]] = None) -> Tensor:
        """The classifier on the backbone's features: (N, K, h, w) as it computes them (``size``
        None), or upsampled to ``size`` (N, K, H, W), what the model's forward returns as "out"."""
        head_input = features if isinstance(self.model, LRASPP) else features["out"]
        logits = self.model.classifier(head_input)
        return logits if size is None else upsampled(logits, size)

    def aux_logits(self, features: dict[str, Tensor], size: Optional[tuple[int, int]] = None) -> Tensor:
        """The auxiliary classifier: (N, K, h, w) as it computes them (``size`` None), or
        upsampled to ``size`` (the forward's "aux")."""
        logits = self.model.aux_classifier(features["aux"])
        return logits if size is None else upsampled(logits, size)

    def run(self, images: Tensor, needs: set[str]) -> SegmentationOutputs:
        """Compute the outputs in ``needs`` on ``images`` (N, 3, H, W): the backbone always,
        each head only when a term needs its logits, at the adapter's ``logit_resolution``."""
        size: Optional[tuple[int, int]] = None if self._at_head else tuple(images.shape[-2:])
        outputs = SegmentationOutputs(features=self.features_of(images))
        if SEG_LOGITS in needs:
            outputs.seg_logits = self.main_logits(outputs.features, size)
        if AUX_LOGITS in needs:
            outputs.aux_logits = self.aux_logits(outputs.features, size)
        return outputs
