"""Tiny torchvision segmentation models for the segmentation tests: 64 px images, 4 classes.

FCN and DeepLabV3 on a one-block ResNet (ResNet-10: "aux" at stride 16 with 256 channels,
"out" at stride 32 with 512), LRASPP and DeepLabV3 on MobileNetV3-Small ("low" / "aux" at
stride 8, "high" / "out" at stride 16 with dilation, as torchvision builds them).
"""
import torch
from torch import nn
from torchvision.models import mobilenet_v3_small
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

NUM_CLASSES = 4
IMAGE_SIZE = 64
IGNORE = 255


def _resnet10_levels(aux: bool) -> IntermediateLayerGetter:
    layers = {"layer3": "aux", "layer4": "out"} if aux else {"layer4": "out"}
    return IntermediateLayerGetter(ResNet(BasicBlock, [1, 1, 1, 1]), layers)


def _mobilenet_small_features() -> tuple[nn.Module, int, int]:
    """MobileNetV3-Small's feature stages with the last ones dilated (output stride 16), and the
    indices of its stride-8 and last stages, as torchvision's segmentation builders pick them."""
    features = mobilenet_v3_small(dilated=True).features
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    return features, stage_indices[-4], stage_indices[-1]


def build_fcn(aux: bool = True, num_classes: int = NUM_CLASSES) -> FCN:
    return FCN(_resnet10_levels(aux), FCNHead(512, num_classes), FCNHead(256, num_classes) if aux else None)


def build_deeplabv3(aux: bool = False, num_classes: int = NUM_CLASSES) -> DeepLabV3:
    return DeepLabV3(_resnet10_levels(aux), DeepLabHead(512, num_classes), FCNHead(256, num_classes) if aux else None)


def build_deeplabv3_mobilenet(aux: bool = True, num_classes: int = NUM_CLASSES) -> DeepLabV3:
    features, low, high = _mobilenet_small_features()
    layers = {str(low): "aux", str(high): "out"} if aux else {str(high): "out"}
    backbone = IntermediateLayerGetter(features, layers)
    aux_head = FCNHead(features[low].out_channels, num_classes) if aux else None
    return DeepLabV3(backbone, DeepLabHead(features[high].out_channels, num_classes), aux_head)


def build_lraspp(num_classes: int = NUM_CLASSES) -> LRASPP:
    features, low, high = _mobilenet_small_features()
    backbone = IntermediateLayerGetter(features, {str(low): "low", str(high): "high"})
    return LRASPP(backbone, features[low].out_channels, features[high].out_channels, num_classes, inter_channels=32)


BUILDERS = {
    "fcn": build_fcn,
    "deeplabv3": build_deeplabv3,
    "deeplabv3_mobilenet": build_deeplabv3_mobilenet,
    "lraspp": build_lraspp,
}


def make_batch(seed: int = 0, num_images: int = 2, size: int = IMAGE_SIZE):
    """Normalized-looking images and masks with every class, a void border and a rare class."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, size, size, generator=generator)
    masks = torch.zeros(num_images, size, size, dtype=torch.int64)
    masks[:, size // 4 : size // 2, :] = 1
    masks[:, size // 2 :, : size // 2] = 2
    masks[:, size // 2 + 4 : size // 2 + 8, size // 2 + 4 : size // 2 + 8] = 3  # a small, rare class
    masks[:, :2, :] = IGNORE  # void, as VOC's object boundaries
    return images, masks


def deterministic(model):
    """Dropout off and BatchNorm on running statistics, so a training-mode student computes
    what an eval-mode copy of it computes (as frozen BatchNorm does for detectors)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Dropout, torch.nn.BatchNorm2d)):
            module.eval()
    return model


def opinionated(teacher):
    """A random head predicts near-uniform classes; a perturbed one has opinions to distil."""
    with torch.no_grad():
        for module in teacher.classifier.modules():
            if isinstance(module, torch.nn.Conv2d) and module.out_channels == NUM_CLASSES:
                module.weight.add_(torch.randn_like(module.weight) * 0.5)
    return teacher
