"""Distillation losses on heatmap logits: one map of S_h x S_w cells per keypoint, read as a
spatial softmax (a distribution over where the keypoint lies), as Keypoint R-CNN's keypoint head
predicts per positive RoI.

Every function returns an unweighted scalar; teacher logits are detached inside.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._reduce import _check_same_shape, _weighted_mean
from .logits import Temperature


def _map_temperature(temperature: Temperature, logits: torch.Tensor) -> torch.Tensor:
    """float, () or (P,) -> tensor broadcastable to flattened maps (P, K, S_h * S_w)."""
    t = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    if t.dim() == 0:
        return t
    if t.shape != (logits.shape[0],):
        raise ValueError(
            f"temperature must be a number or have shape (P,) = ({logits.shape[0]},), one per RoI, for heatmap "
            f"logits {tuple(logits.shape)}, got {tuple(t.shape)}"
        )
    return t[:, None, None]  # (P,) -> (P, 1, 1)


def spatial_softmax_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: Temperature = 1.0,
    visible: Optional[torch.Tensor] = None,
    visible_only: bool = False,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Temperature KL distillation of heatmaps read as spatial softmaxes.

    Heatmap distillation for pose estimation: Zhang, Zhu & Ye, 2019, "Fast Human Pose Estimation"
    (CVPR; FPD, https://arxiv.org/abs/1811.05419), with the temperature KL of Hinton, Vinyals &
    Dean, 2015 (https://arxiv.org/abs/1503.02531). Per keypoint map, over its S_h * S_w cells:
    ``T^2 * KL(softmax(t / T) || softmax(s / T))``; then the (weighted) mean over maps.

    Note: FPD compares heatmaps with the mean squared error, as its hourglass student is trained
    against Gaussian target heatmaps. Here the maps are compared as distributions, because
    Keypoint R-CNN trains its head with a cross-entropy over the S * S cells of each map (He,
    Gkioxari, Dollar & Girshick, 2017, "Mask R-CNN", keypoint detection; torchvision's
    ``keypointrcnn_loss``): its logits are a spatial softmax, defined up to a constant per map,
    which an MSE would penalize and the KL does not.

    Args:
        student_logits: (P, K, S_h, S_w), e.g. (P, K_kp, 56, 56) keypoint logits of P RoIs.
        teacher_logits: (P, K, S_h, S_w), the teacher's maps of the same RoIs.
        temperature: float, or (P,) tensor, one temperature per RoI (e.g. per class of its label).
        visible: (P, K) bool, whether each keypoint is visible in the ground truth (torchvision's
            ``valid``: labelled visible and inside the RoI); read only when ``visible_only``.
        visible_only: compare only the maps of visible keypoints, those torchvision's own loss
            trains. False (default) compares every map: the teacher's heatmap of an occluded
            keypoint is still its estimate of where the keypoint lies.
        weights: (P, K) or (P, 1) non-negative per-map weights, or None.

    Returns:
        scalar tensor; 0 (keeping the graph) without maps or without a visible keypoint.
    """
    _check_same_shape(student_logits, teacher_logits, "heatmap logits")
    if student_logits.dim() != 4:
        raise ValueError(f"spatial_softmax_kd expects (P, K, S_h, S_w) logits, got {tuple(student_logits.shape)}")
    p, k = student_logits.shape[:2]
    t = _map_temperature(temperature, student_logits)
    # (P, K, S_h, S_w) -> (P, K, S_h * S_w): one distribution per map
    log_p_s = F.log_softmax(student_logits.flatten(2) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().flatten(2) / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # (P, K)
    per_map = kl * (t**2).squeeze(-1)  # (P, K) * () or (P, 1)
    map_weights = None if weights is None else torch.as_tensor(weights, device=per_map.device)
    if visible_only:
        if visible is None:
            raise ValueError("visible_only=True needs visible, a (P, K) bool map of the ground truth's visible keypoints")
        if visible.shape != (p, k):
            raise ValueError(f"visible must have shape (P, K) = {(p, k)}, got {tuple(visible.shape)}")
        keep = visible.to(device=per_map.device, dtype=torch.bool)
        # where, not a product: whatever an invisible keypoint's logits hold, value and gradient are 0
        per_map = torch.where(keep, per_map, torch.zeros_like(per_map))
        map_weights = keep.to(per_map.dtype) if map_weights is None else map_weights * keep
    return _weighted_mean(per_map, map_weights)


# --------------------------------------------------------------------------- module shells


class SpatialSoftmaxKD(nn.Module):
    """``spatial_softmax_kd`` with a stored temperature and choice of keypoints."""

    def __init__(self, temperature: Temperature = 1.0, visible_only: bool = False):
        super().__init__()
        self.temperature = temperature
        self.visible_only = visible_only

    def forward(self, student_logits, teacher_logits, visible=None, weights=None):
        return spatial_softmax_kd(student_logits, teacher_logits, self.temperature, visible, self.visible_only, weights)
