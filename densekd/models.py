"""Builders of the demo's detectors, assembled from torchvision classes (no forked model code).

Every builder returns a plain torchvision :class:`~torchvision.models.detection.FCOS` whose
``state_dict`` loads into the same builder's output with ``strict=True``. Teacher and student
share the anchor generator and the feature strides (8, 16, 32, 64, 128 on levels
"0", "1", "2", "p6", "p7"), so per-anchor terms (``cls_logits``, ``centerness``, ...) pair.

    student = build_detector("fcos_resnet18_fpn64", num_classes=12, image_size=96)
"""
from __future__ import annotations

import difflib
from typing import Callable

from torch import nn
from torchvision.models import resnet18, resnet34
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

__all__ = ["DETECTORS", "build_detector", "fcos_resnet18_fpn64", "fcos_resnet34_fpn128"]

# ResNet stages 2-4 (strides 8, 16, 32) -> FPN levels "0", "1", "2"; P6/P7 add strides 64, 128.
_RETURN_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}
_ANCHOR_SIZES = ((8,), (16,), (32,), (64,), (128,))  # one square anchor per location and level
# Torchvision's FCOS default keeps detections scoring > 0.2; COCO-style evaluation (and
# detectron2's FCOS) keeps those > 0.05, which is what AP should be measured on.
_SCORE_THRESH = 0.05


def _fcos(
    backbone_body: nn.Module,
    stage_channels: tuple[int, int, int],
    fpn_channels: int,
    num_classes: int,
    image_size: int,
    head_convs: int,
) -> FCOS:
    backbone = BackboneWithFPN(
        backbone_body,
        return_layers=_RETURN_LAYERS,
        in_channels_list=list(stage_channels),
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )
    anchors = AnchorGenerator(_ANCHOR_SIZES, ((1.0,),) * len(_ANCHOR_SIZES))
    # torchvision's FCOS loss sets the one-hot target at channel index == label, so labels
    # 1..K need K + 1 sigmoid channels; channel 0 is never a positive (as in torchvision's
    # COCO FCOS, num_classes=91 for labels 1..90).
    head = FCOSHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes + 1, num_convs=head_convs)
    return FCOS(
        backbone,
        num_classes=num_classes + 1,
        min_size=image_size,
        max_size=image_size,
        anchor_generator=anchors,
        head=head,
        score_thresh=_SCORE_THRESH,
    )


def fcos_resnet34_fpn128(num_classes: int, image_size: int) -> FCOS:
    """The demo's teacher: FCOS, ResNet-34 (from scratch) + 128-channel FPN P3-P7, 4-conv GroupNorm head."""
    return _fcos(resnet34(weights=None), (128, 256, 512), 128, num_classes, image_size, head_convs=4)


def fcos_resnet18_fpn64(num_classes: int, image_size: int) -> FCOS:
    """The demo's student: FCOS, ResNet-18 (from scratch) + 64-channel FPN P3-P7, 2-conv GroupNorm head."""
    return _fcos(resnet18(weights=None), (128, 256, 512), 64, num_classes, image_size, head_convs=2)


DETECTORS: dict[str, Callable[[int, int], FCOS]] = {
    "fcos_resnet34_fpn128": fcos_resnet34_fpn128,
    "fcos_resnet18_fpn64": fcos_resnet18_fpn64,
}


def build_detector(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A detector from :data:`DETECTORS` by name, for ``num_classes`` foreground classes K
    (labels 1..K, as :class:`~densekd.data.CocoDetectionDataset` gives them) on square
    ``image_size`` images (``min_size = max_size = image_size``).

    The FCOS head has K + 1 sigmoid channels indexed by label (channel 0 unused), because
    torchvision's FCOS loss indexes channels by label; rebuild with the same K to load weights.
    """
    if name not in DETECTORS:
        close = difflib.get_close_matches(name, list(DETECTORS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown detector {name!r}.{hint} Valid names: {', '.join(DETECTORS)}.")
    return DETECTORS[name](num_classes, image_size)
