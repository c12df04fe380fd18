"""Label smoothing on a torchvision detector's hard classification loss (Szegedy et al. 2016,
"Rethinking the Inception Architecture for Computer Vision"), without forking its code.

- Softmax RoI heads (Faster/Mask R-CNN): ``loss_classifier`` is recomputed from the tapped
  RoI logits and the RoIs' labels (the same deterministic assignment torchvision used)
  with ``F.cross_entropy(..., label_smoothing=epsilon)``.
- Sigmoid heads (RetinaNet, FCOS): their losses call ``sigmoid_focal_loss`` from their own
  module's namespace; during the student's forward that name is bound to a version whose
  one-hot targets are smoothed to ``t * (1 - epsilon) + epsilon / C`` over the C class
  channels (the softmax rule applied per channel, so the many negatives move by only
  epsilon / C instead of the epsilon / 2 of binary smoothing).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import fcos, retinanet
from torchvision.ops import sigmoid_focal_loss

from ..core.outputs import DenseOutputs
from .adapters import DetectorAdapter, FCOSAdapter, RCNNAdapter, RetinaNetAdapter

_FOCAL_LOSS_MODULES = {FCOSAdapter: fcos, RetinaNetAdapter: retinanet}


def smoothed_targets(targets: Tensor, epsilon: float) -> Tensor:
    """(..., C) one-hot targets -> ``t * (1 - epsilon) + epsilon / C``."""
    return targets * (1.0 - epsilon) + epsilon / targets.shape[-1]


@contextlib.contextmanager
def smoothed_focal_loss(adapter: DetectorAdapter, epsilon: float) -> Iterator[None]:
    """Within the block, the adapter's one-stage family trains on smoothed class targets."""
    module = next((m for kind, m in _FOCAL_LOSS_MODULES.items() if isinstance(adapter, kind)), None)
    if not epsilon or module is None:
        yield
        return

    def focal_loss_on_smoothed_targets(inputs: Tensor, targets: Tensor, *args, **kwargs) -> Tensor:
        return sigmoid_focal_loss(inputs, smoothed_targets(targets, epsilon), *args, **kwargs)

    original = module.sigmoid_focal_loss
    module.sigmoid_focal_loss = focal_loss_on_smoothed_targets
    try:
        yield
    finally:
        module.sigmoid_focal_loss = original


def smoothed_roi_classification_loss(outputs: DenseOutputs, labels: Tensor, epsilon: float) -> Tensor:
    """Faster R-CNN's ``loss_classifier`` with label smoothing: (R, K + 1) logits, (R,) labels."""
    return F.cross_entropy(outputs.roi_class_logits, labels, label_smoothing=epsilon)


def check_label_smoothing(adapter: DetectorAdapter, epsilon: float) -> None:
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {epsilon}.")
    if epsilon and not isinstance(adapter, (RCNNAdapter, *_FOCAL_LOSS_MODULES)):
        raise ValueError(f"label smoothing is not available for {type(adapter.model).__name__}.")

