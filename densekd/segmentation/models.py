"""Builders of semantic-segmentation models, assembled from torchvision classes (no forked model code).

Every builder returns a plain torchvision :class:`~torchvision.models.segmentation.DeepLabV3`,
:class:`~torchvision.models.segmentation.LRASPP` or
:class:`~torchvision.models.segmentation.FCN` with K + 1 output channels (background at 0),
built without downloading anything; its ``state_dict`` loads into the same builder's output
with ``strict=True``. In eval and train mode the model returns an ``OrderedDict`` with
``"out"`` (N, K + 1, H, W) logits at the input's resolution (and ``"aux"`` when it has an
auxiliary head). Inputs are ImageNet-normalized images: torchvision's segmentation models
have no internal transform (:mod:`densekd.data.segmentation_transforms` normalizes).

    teacher = build_segmenter("deeplabv3_mobilenet_v3_large_aspp128", num_classes=12)  # configs/models/
    student = build_segmenter("lraspp_mobilenet_v3_large", num_classes=12)              # a torchvision builder
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torchvision
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small, resnet18, resnet34, resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import LRASPP, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead

from .._names import unknown_name_message
from ..experiment.config import model_definitions

__all__ = ["SEGMENTATION_ARCHITECTURES", "build_pretrained_segmenter", "build_segmenter", "deeplabv3", "lraspp"]


def _deeplab_head(in_channels: int, channels: int, num_classes: int, atrous_rates: Sequence[int]) -> nn.Sequential:
    """torchvision's ``DeepLabHead`` (same layers, same state_dict keys) with ``channels``
    instead of its fixed 256 ASPP / projection channels."""
    return nn.Sequential(
        ASPP(in_channels, list(atrous_rates), channels),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, num_classes, 1),
    )


def _mobilenet_stages(features: nn.Sequential) -> tuple[int, int]:
    """Indices of the C2 (stride 8) and last (C5) blocks of a MobileNetV3 ``features``, as
    torchvision's segmentation builders pick them."""
    stages = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
    return stages[-4], stages[-1]


def _undilated_stride_one(layer: nn.Sequential) -> None:
    """Make a ResNet stage keep its input resolution. BasicBlock stages (ResNet-18/34) cannot
    dilate (torchvision raises), so the first block's stride becomes 1 without dilation."""
    block = layer[0]
    block.conv1.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


_MOBILENETS = {"mobilenet_v3_large": mobilenet_v3_large, "mobilenet_v3_small": mobilenet_v3_small}
_RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


def deeplabv3(
    num_classes: int,
    backbone: str = "mobilenet_v3_large",
    aspp_channels: int = 256,
    atrous_rates: Sequence[int] = (12, 24, 36),
    aux: bool = True,
) -> DeepLabV3:
    """DeepLabV3 (Chen et al. 2017) from scratch with ``num_classes`` output channels.

    Backbones: ``mobilenet_v3_large`` / ``mobilenet_v3_small`` (dilated, output stride 16, aux
    head on the stride-8 stage, as torchvision's ``deeplabv3_mobilenet_v3_large``),
    ``resnet50`` (dilated layer3-4, output stride 8, as ``deeplabv3_resnet50``) and
    ``resnet18`` / ``resnet34`` (layer4 at stride 1 without dilation: output stride 16, aux
    head on layer3). On small images pick ``atrous_rates`` that fit the feature map (e.g.
    (2, 4, 6) for 96 px at stride 16).
    """
    if backbone in _MOBILENETS:
        features = _MOBILENETS[backbone](weights=None, dilated=True).features
        aux_index, out_index = _mobilenet_stages(features)
        layers = {str(out_index): "out", **({str(aux_index): "aux"} if aux else {})}
        out_channels, aux_channels = features[out_index].out_channels, features[aux_index].out_channels
        body: nn.Module = features
    elif backbone in _RESNETS:
        if backbone == "resnet50":
            body = resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
            out_channels, aux_channels = 2048, 1024
        else:
            body = _RESNETS[backbone](weights=None)
            _undilated_stride_one(body.layer4)
            out_channels, aux_channels = 512, 256
        layers = {"layer4": "out", **({"layer3": "aux"} if aux else {})}
    else:
        raise ValueError(unknown_name_message("DeepLabV3 backbone", backbone, [*_MOBILENETS, *_RESNETS]))
    return DeepLabV3(
        IntermediateLayerGetter(body, return_layers=layers),
        _deeplab_head(out_channels, aspp_channels, num_classes, atrous_rates),
        FCNHead(aux_channels, num_classes) if aux else None,
    )


def lraspp(num_classes: int, backbone: str = "mobilenet_v3_large", inter_channels: int = 128) -> LRASPP:
    """Lite R-ASPP (Howard et al. 2019, "Searching for MobileNetV3") from scratch, on a dilated
    MobileNetV3 (``mobilenet_v3_large`` as torchvision's ``lraspp_mobilenet_v3_large``, or
    ``mobilenet_v3_small``): stride-8 "low" and stride-16 "high" features."""
    if backbone not in _MOBILENETS:
        raise ValueError(unknown_name_message("LRASPP backbone", backbone, _MOBILENETS))
    features = _MOBILENETS[backbone](weights=None, dilated=True).features
    low, high = _mobilenet_stages(features)
    body = IntermediateLayerGetter(features, return_layers={str(low): "low", str(high): "high"})
    return LRASPP(body, features[low].out_channels, features[high].out_channels, num_classes, inter_channels)


#: architectures that segmentation definitions in ``configs/models/<name>.yaml`` instantiate
SEGMENTATION_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"deeplabv3": deeplabv3, "lraspp": lraspp}


def _torchvision_segmenters() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


def _segmentation_definitions() -> dict[str, tuple[str, dict]]:
    return {name: d for name, d in model_definitions().items() if d[0] in SEGMENTATION_ARCHITECTURES}


def _batchnorm_momentum(model: nn.Module, momentum: float = 0.1) -> nn.Module:
    """Every BatchNorm's running-statistics momentum (not part of the state_dict). torchvision's
    MobileNetV3 uses 0.01: after the few hundred steps of a from-scratch run its running
    statistics still lag far behind, and eval-mode predictions collapse to background."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model


def build_segmenter(name: str, num_classes: int) -> nn.Module:
    """A segmentation model for ``num_classes`` foreground classes K (mask values 1..K, 0 =
    background), with K + 1 output channels, built without pretrained weights.

    ``name`` is a segmentation definition in ``configs/models/<name>.yaml`` (an architecture of
    :data:`SEGMENTATION_ARCHITECTURES` with its arguments) or a torchvision segmentation builder
    (``deeplabv3_resnet50``, ``lraspp_mobilenet_v3_large``, ``fcn_resnet50``, ...; FCN and
    DeepLabV3 builders get their auxiliary head). Every BatchNorm gets momentum 0.1 (PyTorch's
    default; torchvision's MobileNetV3 has 0.01, too slow for short from-scratch training).
    Load trained weights with :func:`densekd.training.checkpoints.load_weights`.
    """
    definitions = _segmentation_definitions()
    if name in definitions:
        architecture, arguments = definitions[name]
        return _batchnorm_momentum(SEGMENTATION_ARCHITECTURES[architecture](num_classes + 1, **arguments))
    if name in _torchvision_segmenters():
        builder = torchvision.models.get_model_builder(name)
        aux = {"aux_loss": True} if "aux_loss" in inspect.signature(builder).parameters else {}
        return _batchnorm_momentum(builder(weights=None, weights_backbone=None, num_classes=num_classes + 1, **aux))
    raise ValueError(unknown_name_message("segmentation model", name, [*definitions, *_torchvision_segmenters()]))


def build_pretrained_segmenter(name: str, weights: str, num_classes: int) -> nn.Module:
    """A torchvision segmentation builder with its pretrained weights (e.g. ``"DEFAULT"``:
    ``COCO_WITH_VOC_LABELS_V1``, 21 channels for background + the 20 VOC classes in VOC order;
    segment such a teacher's data with ``categories="voc"``). Downloads once into torch's hub
    cache; without a connection pass the downloaded file as the model's checkpoint instead."""
    if name not in _torchvision_segmenters():
        raise ValueError(f"Pretrained weights need a torchvision segmentation builder; {name!r} is not one.")
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        raise RuntimeError(
            f"Could not load torchvision weights {weights!r} for {name}: {error}. Without internet access, "
            "download the weights file on another machine and pass it as the model's checkpoint."
        ) from error
    channels = model.classifier[-1].out_channels if isinstance(model.classifier, nn.Sequential) else model.classifier.high_classifier.out_channels
    if channels != num_classes + 1:
        raise ValueError(
            f"{name} weights {weights!r} predict {channels} channels but the data has {num_classes} classes "
            f"+ background = {num_classes + 1}; for torchvision's VOC-label weights use the VOC categories "
            "(data.categories=voc)."
        )
    return model
