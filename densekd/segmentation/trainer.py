"""Plain (undistilled) training of a torchvision segmentation model, behind the same call
signature as the distiller::

    training = SegmentationTraining(deeplabv3_mobilenet_v3_large(num_classes=21, aux_loss=True))
    losses = training(images, masks)        # {"loss_seg": ..., "loss_aux": ...}
    sum(losses.values()).backward()

The losses are those of torchvision's references/segmentation: cross-entropy of "out" plus
``aux_weight`` (0.5) times the cross-entropy of "aux", pixels labelled ``ignore_index`` (255)
left out; optional label smoothing (Szegedy et al. 2016, "Rethinking the Inception
Architecture for Computer Vision") also leaves them out.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import SegmentationAdapter, is_segmentation_model


def check_segmentation_settings(aux_weight: float, ignore_index: int, label_smoothing: float) -> None:
    if aux_weight < 0:
        raise ValueError(f"aux_weight must be >= 0 (torchvision's references use 0.5), got {aux_weight}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int (255 for VOC-style masks), got {ignore_index!r}.")


def check_masks(masks: Optional[Tensor], logits: Tensor, ignore_index: int) -> Tensor:
    """(N, H, W) integer masks matching (N, K, H, W) logits, as int64; a clear error otherwise."""
    if masks is None:
        raise ValueError("Training needs masks: call model(images, masks) with (N, H, W) int64 class maps.")
    if masks.is_floating_point() or masks.is_complex() or masks.dtype == torch.bool:
        raise ValueError(f"masks must hold integer class indices (int64), got dtype {masks.dtype}; use masks.long().")
    n, k, h, w = logits.shape
    if masks.shape != (n, h, w):
        raise ValueError(
            f"masks must have shape (N, H, W) = {(n, h, w)} to match the images and logits {tuple(logits.shape)}, "
            f"got {tuple(masks.shape)}. Resize masks with nearest-neighbour interpolation, as the images."
        )
    masks = masks.long()
    invalid = ((masks < 0) | (masks >= k)) & (masks != ignore_index)
    if bool(invalid.any()):
        bad = sorted(set(masks[invalid].unique().tolist()))[:5]
        raise ValueError(
            f"masks hold labels {bad} outside 0..{k - 1} and not the ignore_index {ignore_index}; "
            f"the model predicts {k} classes. Remap the dataset's labels or set ignore_index."
        )
    return masks


def pixel_cross_entropy(logits: Tensor, masks: Tensor, ignore_index: int, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the pixels that are not ignored: (N, K, H, W) logits, (N, H, W)
    masks. Equals ``F.cross_entropy(..., ignore_index=...)``, but a batch whose pixels are all
    ignored gives 0 (keeping the graph) instead of NaN."""
    total = F.cross_entropy(logits, masks, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    return total / (masks != ignore_index).sum().clamp_min(1)


def segmentation_losses(
    result: dict[str, Tensor],
    masks: Tensor,
    aux_weight: float,
    ignore_index: int,
    label_smoothing: float,
) -> dict[str, Tensor]:
    """{"loss_seg", "loss_aux" (only with an aux head)} from a model's output dict and
    already checked (N, H, W) masks."""
    losses = {"loss_seg": pixel_cross_entropy(result["out"], masks, ignore_index, label_smoothing)}
    if "aux" in result:
        losses["loss_aux"] = aux_weight * pixel_cross_entropy(result["aux"], masks, ignore_index, label_smoothing)
    return losses


class SegmentationTraining(nn.Module):
    """A torchvision segmentation model that returns its training losses.

    Args:
        model: FCN, DeepLabV3 or LRASPP (any backbone); ``self.model`` stays that plain model.
        aux_weight: weight of the auxiliary head's cross-entropy (models built with an aux head).
        ignore_index: mask label of pixels without ground truth (VOC's void boundaries: 255).
        label_smoothing: epsilon of label smoothing in both cross-entropies.

    ``forward(images (N, 3, H, W), masks (N, H, W) int64)``: in training mode the loss dict,
    in evaluation mode ``model(images)`` unchanged (its {"out", "aux"} logits).
    """

    def __init__(self, model: nn.Module, aux_weight: float = 0.5, ignore_index: int = 255, label_smoothing: float = 0.0):
        super().__init__()
        if not is_segmentation_model(model):
            SegmentationAdapter(model)  # raises the TypeError that names the supported families
        check_segmentation_settings(aux_weight, ignore_index, label_smoothing)
        self.model = model
        self.aux_weight = float(aux_weight)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)

    def forward(self, images: Tensor, masks: Optional[Tensor] = None):
        if not self.training:
            return self.model(images)
        result = self.model(images)
        masks = check_masks(masks, result["out"], self.ignore_index)
        return segmentation_losses(result, masks, self.aux_weight, self.ignore_index, self.label_smoothing)
