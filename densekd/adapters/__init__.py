"""Per-family knowledge of where to tap torchvision models."""
from .detection import DetectorAdapter, FCOSAdapter, RCNNAdapter, RetinaNetAdapter, adapter_for

__all__ = ["DetectorAdapter", "FCOSAdapter", "RCNNAdapter", "RetinaNetAdapter", "adapter_for"]
