"""densekd: knowledge distillation for torchvision detection and segmentation models."""
from .adapters import SegmentationAdapter, adapter_for, is_segmentation_model
from .core.connectors import FeatureConnector
from .core.outputs import DenseOutputs, SegmentationOutputs
from .core.parameter_groups import weight_decay_groups
from .core.schedules import Constant, Cosine, Linear, Step, build_schedule
from .core.taps import Tap
from .core.terms import LOSSES_BY_OUTPUT, Term
from .core.weighting import (
    class_weights,
    lvis_frequency_groups,
    per_class_temperature,
    repeat_factors,
    segmentation_class_counts,
)
from .detection.distiller import Distiller
from .segmentation.distiller import SegmentationDistiller
from .segmentation.trainer import SegmentationTraining

__all__ = [
    "Constant",
    "Cosine",
    "DenseOutputs",
    "Distiller",
    "FeatureConnector",
    "LOSSES_BY_OUTPUT",
    "Linear",
    "SegmentationAdapter",
    "SegmentationDistiller",
    "SegmentationOutputs",
    "SegmentationTraining",
    "Step",
    "Tap",
    "Term",
    "adapter_for",
    "build_schedule",
    "class_weights",
    "is_segmentation_model",
    "lvis_frequency_groups",
    "per_class_temperature",
    "repeat_factors",
    "segmentation_class_counts",
    "weight_decay_groups",
]

__version__ = "0.1.0"
