"""Per-family knowledge of where to tap torchvision models."""
from torch import nn

from .detection.adapters import DetectorAdapter, FCOSAdapter, RCNNAdapter, RetinaNetAdapter, SSDAdapter
from .detection.adapters import adapter_for as detector_adapter_for
from .segmentation.adapter import SegmentationAdapter, is_segmentation_model


def adapter_for(model: nn.Module):
    """The adapter of a torchvision detector (FasterRCNN, MaskRCNN, RetinaNet, FCOS, SSD) or
    segmentation model (FCN, DeepLabV3, LRASPP)."""
    if is_segmentation_model(model):
        return SegmentationAdapter(model)
    return detector_adapter_for(model)


__all__ = [
    "DetectorAdapter",
    "FCOSAdapter",
    "RCNNAdapter",
    "RetinaNetAdapter",
    "SSDAdapter",
    "SegmentationAdapter",
    "adapter_for",
    "detector_adapter_for",
    "is_segmentation_model",
]
