"""Builders of the demo's detectors, assembled from torchvision classes (no forked model code).

Every builder returns a plain torchvision :class:`~torchvision.models.detection.FCOS` or
``SSD`` whose ``state_dict`` loads into the same builder's output with ``strict=True``. The FCOS
teacher and student share the anchor generator and the feature strides (8, 16, 32, 64, 128 on
levels "0", "1", "2", "p6", "p7"), so per-anchor terms (``cls_logits``, ``centerness``, ...)
pair. The SSDlite builder keeps torchvision's ``ssdlite320_mobilenet_v3_large`` default boxes, so
its per-anchor terms pair with that model (built here at the same image size).

    student = build_detector("fcos_resnet18_fpn64", num_classes=12, image_size=96)   # configs/models/
"""
from __future__ import annotations

import difflib
from functools import partial
from typing import Callable, Optional

import torchvision
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small, resnet18, resnet34, resnet50
from torchvision.models.detection import FCOS
from torchvision.models.detection._utils import retrieve_out_channels
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet, SSDLiteHead, _normal_init
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..experiment.config import model_definitions

__all__ = ["ARCHITECTURES", "build_detector", "build_pretrained", "fcos_fpn", "ssdlite_mobilenet_v3"]

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
    box_bias_init: float = 0.0,
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
    # The box regression passes through a ReLU; with torchvision's zero bias its outputs start near 0,
    # so every box starts near zero size, GIoU gives almost no gradient on large boxes, and the ReLU can
    # die within tens of iterations (seen on 256-px photos). A positive bias starts each box at about
    # its anchor's size, with every output alive.
    nn.init.constant_(head.regression_head.bbox_reg.bias, box_bias_init)
    return FCOS(
        backbone,
        num_classes=num_classes + 1,
        min_size=image_size,
        max_size=image_size,
        anchor_generator=anchors,
        head=head,
        score_thresh=_SCORE_THRESH,
    )


_BACKBONES = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
_STAGE_CHANNELS = {"resnet18": (128, 256, 512), "resnet34": (128, 256, 512), "resnet50": (512, 1024, 2048)}


def fcos_fpn(
    num_classes: int,
    image_size: int,
    backbone: str = "resnet18",
    fpn_channels: int = 64,
    head_convs: int = 2,
    box_bias_init: float = 0.0,
) -> FCOS:
    """FCOS on a ResNet body (from scratch) with an FPN over P3-P7 and a GroupNorm head.

    ``box_bias_init``: initial bias of the box-regression output (torchvision: 0). A value such
    as 1.0 starts every box at about its anchor's size, which keeps the regression's ReLU alive
    when training from scratch on large images with large boxes."""
    if backbone not in _BACKBONES:
        raise ValueError(f"Unknown FCOS backbone {backbone!r}; valid: {', '.join(_BACKBONES)}.")
    body = _BACKBONES[backbone](weights=None)
    return _fcos(body, _STAGE_CHANNELS[backbone], fpn_channels, num_classes, image_size, head_convs, box_bias_init)


_MOBILENETS = {"mobilenet_v3_small": mobilenet_v3_small, "mobilenet_v3_large": mobilenet_v3_large}


def ssdlite_mobilenet_v3(
    num_classes: int,
    image_size: int,
    backbone: str = "mobilenet_v3_small",
    width_mult: float = 1.0,
    norm_layer: Optional[Callable[..., nn.Module]] = None,
) -> SSD:
    """SSDlite (Sandler et al. 2018, https://arxiv.org/abs/1801.04381; Howard et al. 2019,
    https://arxiv.org/abs/1905.02244) on a MobileNetV3 from scratch, for ``image_size`` images.

    Assembled as torchvision's ``ssdlite320_mobilenet_v3_large`` without a pretrained backbone
    (reduced tail, normal init, C4 expansion + C5 + four extra blocks, six maps "0".."5" at strides
    16 ... 512, the same ``DefaultBoxGenerator``, mean/std 0.5, its score/NMS settings), but with
    ``backbone`` "mobilenet_v3_small" or "mobilenet_v3_large", ``width_mult`` scaling the backbone
    and the extra blocks, and a fixed size of ``image_size`` instead of 320. K + 1 softmax classes,
    background 0. ``norm_layer`` defaults to torchvision's ``BatchNorm2d(eps=0.001, momentum=0.03)``;
    as in torchvision, the last maps are 1 x 1 below 512 px, so training needs >= 2 images per batch."""
    if backbone not in _MOBILENETS:
        raise ValueError(f"Unknown SSDlite backbone {backbone!r}; valid: {', '.join(_MOBILENETS)}.")
    norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    body = _MOBILENETS[backbone](weights=None, norm_layer=norm_layer, reduced_tail=True, width_mult=width_mult)
    _normal_init(body)
    blocks = body.features
    # torchvision's _mobilenet_extractor: the last strided block (C5's first) splits C4 from C5
    c4_position = [i for i, block in enumerate(blocks) if getattr(block, "_is_cn", False)][-1]
    extractor = SSDLiteFeatureExtractorMobileNet(blocks, c4_position, norm_layer, width_mult=width_mult)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    channels = retrieve_out_channels(extractor, (image_size, image_size))
    head = SSDLiteHead(channels, anchors.num_anchors_per_location(), num_classes + 1, norm_layer)
    return SSD(
        extractor, anchors, (image_size, image_size), num_classes + 1, head=head,
        score_thresh=0.001, nms_thresh=0.55, detections_per_img=300, topk_candidates=300,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip


#: architectures that ``configs/models/<name>.yaml`` files instantiate
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "fcos_fpn": fcos_fpn,
    "ssdlite_mobilenet_v3": ssdlite_mobilenet_v3,
}


def _torchvision_detectors() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def build_detector(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A detector for ``num_classes`` foreground classes K (labels 1..K, as
    :class:`~densekd.data.CocoDetectionDataset` gives them) on ``image_size`` images.

    ``name`` is a model definition in ``configs/models/<name>.yaml`` (an architecture from
    :data:`ARCHITECTURES` with its arguments) or a torchvision detection builder such as
    ``fasterrcnn_resnet50_fpn`` (built without weights; load a checkpoint with
    :func:`load_weights`). Heads get K + 1 class channels: softmax heads keep background at
    0, and torchvision's one-stage losses index channels by label (channel 0 unused).
    """
    definitions = {n: d for n, d in model_definitions().items() if d[0] in ARCHITECTURES}  # not segmenters
    if name in definitions:
        architecture, arguments = definitions[name]
        return ARCHITECTURES[architecture](num_classes, image_size, **arguments)
    if name in _torchvision_detectors() and name.startswith("ssd"):  # SSD builders fix their size themselves
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes + 1)
        mean, std = model.transform.image_mean, model.transform.image_std  # default boxes are relative: resize only
        size = (image_size, image_size)
        model.transform = GeneralizedRCNNTransform(image_size, image_size, mean, std, size_divisible=1, fixed_size=size)
        return model
    if name in _torchvision_detectors():
        return torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes + 1, min_size=image_size, max_size=image_size
        )
    valid = sorted(definitions) + _torchvision_detectors()
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown detector {name!r}.{hint} Valid names: {', '.join(valid)}.")


def build_pretrained(name: str, weights: str) -> nn.Module:
    """A torchvision detection builder with its pretrained weights (e.g. ``"DEFAULT"`` or
    ``"FCOS_ResNet50_FPN_Weights.COCO_V1"``), keeping the class channels the weights were
    trained with (91 for COCO: labels are COCO category ids). Downloads once into torch's hub
    cache; without a connection, download the file elsewhere and pass it as ``checkpoint``."""
    if name not in _torchvision_detectors():
        raise ValueError(f"Pretrained weights need a torchvision detection builder; {name!r} is not one.")
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        raise RuntimeError(
            f"Could not load torchvision weights {weights!r} for {name}: {error}. Without internet access, "
            "download the weights file on another machine and pass it as the model's checkpoint."
        ) from error
