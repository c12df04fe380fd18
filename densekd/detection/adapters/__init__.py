"""Detector adapters, one module per family: which submodules of a torchvision detector to tap, and how to turn
what they return into :class:`~densekd.core.outputs.DenseOutputs`.

The student runs its own, unmodified forward (so torchvision computes its usual losses)
while a :class:`~densekd.core.taps.Tap` records the attach points listed here. The teacher
does not run its full forward: the adapter drives its submodules directly on the
student's batch, computing only what the distillation terms need (the backbone alone
when only feature terms are used) and running the RoI heads on the student's proposals
so that RoI outputs pair one to one.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.ssd import SSD

from ...core.taps import unwrap_model
from .base import DetectorAdapter, decode_boxes, encode_boxes
from .one_stage import FCOSAdapter, RetinaNetAdapter
from .rcnn import RCNNAdapter
from .ssd import SSDAdapter

__all__ = [
    "DetectorAdapter", "FCOSAdapter", "RCNNAdapter", "RetinaNetAdapter", "SSDAdapter", "adapter_for", "decode_boxes",
    "encode_boxes",
]

_ADAPTERS: dict[type, type] = {
    GeneralizedRCNN: RCNNAdapter, RetinaNet: RetinaNetAdapter, FCOS: FCOSAdapter, SSD: SSDAdapter,
}


def adapter_for(model: nn.Module) -> DetectorAdapter:
    """The adapter of a torchvision detector (FasterRCNN, MaskRCNN, RetinaNet, FCOS, SSD/SSDlite)."""
    inner = unwrap_model(model)
    for model_type, adapter_type in _ADAPTERS.items():
        if isinstance(inner, model_type):
            return adapter_type(inner)
    supported = ", ".join(t.__name__ for t in _ADAPTERS)
    raise TypeError(
        f"densekd cannot tap a {type(inner).__name__}; supported detector families: {supported} "
        "(FasterRCNN and MaskRCNN are GeneralizedRCNN models)."
    )
