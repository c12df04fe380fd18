"""densekd: knowledge distillation for torchvision detection and segmentation models."""
from .adapters import adapter_for
from .connectors import FeatureConnector
from .distiller import Distiller
from .outputs import DenseOutputs
from .schedules import Constant, Cosine, Linear, Step, build_schedule
from .taps import Tap
from .terms import LOSSES_BY_OUTPUT, Term
from .weighting import class_weights, lvis_frequency_groups, per_class_temperature, repeat_factors

__all__ = [
    "Constant",
    "Cosine",
    "DenseOutputs",
    "Distiller",
    "FeatureConnector",
    "LOSSES_BY_OUTPUT",
    "Linear",
    "Step",
    "Tap",
    "Term",
    "adapter_for",
    "build_schedule",
    "class_weights",
    "lvis_frequency_groups",
    "per_class_temperature",
    "repeat_factors",
]

__version__ = "0.1.0"
