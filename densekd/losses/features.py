"""Distillation losses on intermediate feature maps (backbone / FPN levels).

Inputs are the student feature already projected to the teacher's shape (see connectors), both
(N, C, H, W). Every function returns an unweighted scalar; teacher tensors are detached inside.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._reduce import _check_same_shape, _weighted_mean
from .logits import kl_div_kd

HINT_KINDS = ("l2", "cosine")


def _check_feature_maps(student: torch.Tensor, teacher: torch.Tensor) -> None:
    _check_same_shape(student, teacher, "feature maps")
    if student.dim() != 4:
        raise ValueError(f"feature maps must have shape (N, C, H, W), got {tuple(student.shape)}")


def _check_position_map(name: str, position_map: torch.Tensor, features: torch.Tensor) -> None:
    n, _, h, w = features.shape
    if position_map.shape != (n, 1, h, w):
        raise ValueError(f"{name} must have shape {(n, 1, h, w)} for features {tuple(features.shape)}, "
                         f"got {tuple(position_map.shape)}")


def hint_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "l2",
    normalize: bool = True,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Hint (feature-matching) loss.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, 2015, "FitNets: Hints for Thin Deep Nets"
    (ICLR). Per position: squared error summed over channels ("l2") or ``1 - cosine similarity``
    ("cosine"); then the (mask-weighted) mean over positions.

    Note: FitNets compares raw activations; ``normalize=True`` (default) first L2-normalizes each
    position's channel vector, which keeps the loss scale independent of the teachers' activation
    magnitude (a "modest weight" then means the same thing across FPN levels and models).

    Args:
        student: (N, C, H, W), projected to the teacher's shape.
        teacher: (N, C, H, W).
        kind: "l2" or "cosine".
        normalize: L2-normalize channel vectors per position before comparing.
        mask: (N, 1, H, W) non-negative position weights, or None.
    """
    if kind not in HINT_KINDS:
        raise ValueError(f"unknown kind {kind!r} for hint_loss; valid kinds: {', '.join(HINT_KINDS)}")
    _check_feature_maps(student, teacher)
    if mask is not None:
        _check_position_map("mask", mask, student)
    teacher = teacher.detach()
    if normalize:
        student, teacher = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    if kind == "l2":
        per_position = (student - teacher).pow(2).sum(dim=1, keepdim=True)  # (N, 1, H, W)
    else:
        per_position = 1.0 - F.cosine_similarity(student, teacher, dim=1).unsqueeze(1)  # (N, 1, H, W)
    return _weighted_mean(per_position, mask)


def masked_imitation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    foreground: torch.Tensor,
    fg_weight: float = 1.0,
    bg_weight: float = 0.5,
) -> torch.Tensor:
    """Foreground/background-masked feature imitation.

    Wang, Yuan, Zhang & Feng, 2019, "Distilling Object Detectors with Fine-grained Feature
    Imitation" (CVPR) imitate features near objects only; Yang et al., 2022, "Focal and Global
    Knowledge Distillation for Detectors" (CVPR) keep the background with its own weight.
    Per position: squared error averaged over channels; then
    ``fg_weight * (mean over positions weighted by foreground)
    + bg_weight * (mean over positions where foreground == 0)``.

    Notes: Wang et al. build the mask from anchors near GT boxes and normalize by the number of
    masked positions; FGD also scales by box area and teacher attention. Here the caller's
    ``foreground`` map carries any such weighting. A part with no positions contributes 0, so
    images without boxes give no NaN.

    Args:
        student: (N, C, H, W), projected to the teacher's shape.
        teacher: (N, C, H, W).
        foreground: (N, 1, H, W) non-negative; 0 outside every GT box, inside the box's (class) weight.
        fg_weight: weight of the foreground part.
        bg_weight: weight of the background part.
    """
    _check_feature_maps(student, teacher)
    _check_position_map("foreground", foreground, student)
    foreground = foreground.detach()
    per_position = (student - teacher.detach()).pow(2).mean(dim=1, keepdim=True)  # (N, 1, H, W)
    fg = _weighted_mean(per_position, foreground)
    bg = _weighted_mean(per_position, foreground == 0)
    return fg_weight * fg + bg_weight * bg


def channel_wise_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 4.0,
    ignore: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Channel-wise distillation (CWD).

    Shu, Liu, Gao, Yan & Shen, 2021, "Channel-wise Knowledge Distillation for Dense Prediction"
    (ICCV). Each channel becomes a distribution over the H*W positions (softmax at temperature T);
    loss = ``T^2 * KL(teacher || student)`` summed over positions, averaged over the N*C channels
    (as the official implementation: sum / (N * C)).

    Notes (additions to the paper, both off by default): ``ignore`` removes positions from every
    channel's distribution, as if the map did not contain them (the softmax runs over the kept
    positions only), so ignored pixels of segmentation logits (e.g. VOC's void boundaries) change
    neither student nor teacher distribution; a channel with no kept position is left out of the
    mean. ``weights`` turns the mean over channels into a weighted mean; on segmentation logits,
    channel c is class c, so class weights apply per channel.

    Args:
        student: (N, C, H, W), projected to the teacher's shape (e.g. segmentation logits).
        teacher: (N, C, H, W).
        temperature: softmax temperature T over positions.
        ignore: (N, H, W) bool, True at positions left out of every channel's distribution, or None.
        weights: (C,) or (N, C) non-negative per-channel weights, or None.
    """
    _check_feature_maps(student, teacher)
    n, c, h, w = student.shape
    # (N, C, H, W) -> (N*C, H*W): one distribution over positions per channel
    rows_s, rows_t = student.reshape(n * c, h * w), teacher.reshape(n * c, h * w)
    channel_weights = None
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=student.dtype, device=student.device)
        if weights.shape not in ((c,), (n, c)):
            raise ValueError(f"weights must have shape ({c},) or ({n}, {c}) for maps {tuple(student.shape)}, "
                             f"got {tuple(weights.shape)}")
        channel_weights = weights.expand(n, c).reshape(n * c)  # (C,) or (N, C) -> (N*C,)
    if ignore is None:
        return kl_div_kd(rows_s, rows_t, temperature, channel_weights)
    if ignore.shape != (n, h, w):
        raise ValueError(f"ignore must have shape {(n, h, w)} for maps {tuple(student.shape)}, got {tuple(ignore.shape)}")
    keep = (~ignore.bool()).reshape(n, 1, h * w).expand(n, c, h * w).reshape(n * c, h * w)  # (N*C, H*W)
    has_kept = keep.any(dim=1)  # (N*C,); channels of a fully ignored image drop out
    # A fully ignored row keeps all positions (finite softmax) and gets weight 0 below.
    keep = keep | ~has_kept[:, None]

    def kept_log_softmax(rows: torch.Tensor) -> torch.Tensor:  # (N*C, H*W), 0 at left-out positions
        log_p = F.log_softmax((rows / temperature).masked_fill(~keep, float("-inf")), dim=1)
        return torch.where(keep, log_p, torch.zeros_like(log_p))

    log_p_s, log_p_t = kept_log_softmax(rows_s), kept_log_softmax(rows_t.detach())
    p_t = torch.where(keep, log_p_t.exp(), torch.zeros_like(log_p_t))
    per_channel = (p_t * (log_p_t - log_p_s)).sum(dim=1) * temperature**2  # (N*C,)
    row_weights = has_kept.to(student.dtype)
    if channel_weights is not None:
        row_weights = row_weights * channel_weights
    return _weighted_mean(per_channel, row_weights)


def _standardize_per_channel(feat: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero mean, unit std per channel over (N, H, W); shape kept (N, C, H, W)."""
    mean = feat.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
    std = feat.std(dim=(0, 2, 3), keepdim=True, correction=0)  # (1, C, 1, 1)
    return (feat - mean) / (std + eps)


def pearson_kd(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pearson-correlation distillation (PKD).

    Cao, Zhang, Gao, Cheng, Cheng & Cheng, 2022, "PKD: General Distillation Framework for Object
    Detectors via Pearson Correlation Coefficient" (NeurIPS). Each map is standardized per channel
    over (N, H, W); loss = MSE between the standardized maps / 2 (official mmdet/mmrazor code),
    i.e. ``1 - mean Pearson correlation`` per channel. Invariant to a per-channel positive affine
    rescaling of either input.

    Note: the std is the population std (official code: unbiased); it differs by a factor
    ``sqrt(n / (n - 1))`` with n = N*H*W and stays finite for a single position.

    Args:
        student: (N, C, H, W), projected to the teacher's shape.
        teacher: (N, C, H, W).
        eps: added to the std.
    """
    _check_feature_maps(student, teacher)
    if student.numel() == 0:
        return student.sum() * 0.0
    norm_s = _standardize_per_channel(student, eps)
    norm_t = _standardize_per_channel(teacher.detach(), eps)
    return (norm_s - norm_t).pow(2).mean() / 2


# --------------------------------------------------------------------------- module shells


class HintLoss(nn.Module):
    """``hint_loss`` with stored kind and normalize."""

    def __init__(self, kind: str = "l2", normalize: bool = True):
        super().__init__()
        if kind not in HINT_KINDS:
            raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(HINT_KINDS)}")
        self.kind, self.normalize = kind, normalize

    def forward(self, student, teacher, mask=None):
        return hint_loss(student, teacher, self.kind, self.normalize, mask)


class MaskedImitationLoss(nn.Module):
    """``masked_imitation_loss`` with stored fg/bg weights."""

    def __init__(self, fg_weight: float = 1.0, bg_weight: float = 0.5):
        super().__init__()
        self.fg_weight, self.bg_weight = fg_weight, bg_weight

    def forward(self, student, teacher, foreground):
        return masked_imitation_loss(student, teacher, foreground, self.fg_weight, self.bg_weight)


class ChannelWiseKD(nn.Module):
    """``channel_wise_kd`` with a stored temperature."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student, teacher, ignore=None, weights=None):
        return channel_wise_kd(student, teacher, self.temperature, ignore, weights)


class PearsonKD(nn.Module):
    """``pearson_kd`` with a stored eps."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, student, teacher):
        return pearson_kd(student, teacher, self.eps)
