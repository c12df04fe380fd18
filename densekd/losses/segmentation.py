"""Distillation losses for semantic segmentation: per-pixel logits (N, K, H, W) and the
structure of feature maps.

Every function returns an unweighted scalar; teacher tensors are detached inside. Pixels whose
ground truth is the ignore label (255 in torchvision's references) are passed as a boolean
``ignore`` map and have no effect on the value or the gradient.
Channel-wise distillation on logits is ``channel_wise_kd`` (``densekd.losses.features``) with its
``ignore`` and per-channel ``weights`` arguments; spatial attention transfer is
``spatial_attention_loss`` (``densekd.losses.attention``).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._reduce import _check_same_shape, _weighted_mean
from .attention import _check_4d, relation_loss
from .logits import Temperature


def _check_pixel_map(name: str, pixel_map: torch.Tensor, logits: torch.Tensor) -> None:
    n, _, h, w = logits.shape
    if pixel_map.shape != (n, h, w):
        raise ValueError(f"{name} must have shape {(n, h, w)} for logits {tuple(logits.shape)}, "
                         f"got {tuple(pixel_map.shape)}")


def pixel_class_weights(
    target: torch.Tensor, class_weights: torch.Tensor, ignore_index: Optional[int] = 255
) -> torch.Tensor:
    """(N, H, W) weight of every pixel: the weight of its ground-truth class, 0 where ignored.

    The pixel-level form of class-balanced weighting (Cui, Jia, Lin, Song & Belongie, 2019,
    "Class-Balanced Loss Based on Effective Number of Samples"; per-pixel class weights as in
    Paszke et al., 2016, "ENet"): rare classes weigh more in any per-pixel loss.

    Args:
        target: (N, H, W) int64 ground-truth classes 0..K-1 (or ``ignore_index``).
        class_weights: (K,) non-negative weights, e.g. ``densekd.core.weighting.class_weights``.
        ignore_index: the label of ignored pixels (None: no pixel is ignored).
    """
    class_weights = torch.as_tensor(class_weights, device=target.device)
    if class_weights.dim() != 1:
        raise ValueError(f"class_weights must be 1-D (K,), got shape {tuple(class_weights.shape)}")
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    labels = target.masked_fill(~valid, 0)
    num_classes = class_weights.numel()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"target holds labels outside 0..{num_classes - 1} (ignore_index={ignore_index}); "
                         f"give one class weight per class")
    return class_weights[labels] * valid.to(class_weights.dtype)


def pixel_kl_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: Temperature = 1.0,
    ignore: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pixel-wise temperature KL distillation for segmentation logits.

    Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network", applied to every
    pixel's class distribution as the pixel-wise term of Liu, Chen, Liu, Qin, Luo & Wang, 2019,
    "Structured Knowledge Distillation for Semantic Segmentation" (CVPR). Per pixel:
    ``T^2 * KL(softmax(t / T) || softmax(s / T))`` over the K classes; then the (weighted) mean
    over the pixels that are not ignored.

    Note: Liu et al. use T = 1 and no T^2 factor (the same value at T = 1).

    Args:
        student_logits: (N, K, H, W).
        teacher_logits: (N, K, H, W), e.g. resized to the student's size beforehand.
        temperature: float, or (N, H, W) per-pixel temperature (e.g. per class of each pixel).
        ignore: (N, H, W) bool, True at pixels left out (ground truth == ignore_index), or None.
        weights: (N, H, W) non-negative pixel weights (e.g. ``pixel_class_weights``), or None.

    Returns:
        scalar tensor; 0 (keeping the graph) when every pixel is ignored.
    """
    _check_same_shape(student_logits, teacher_logits, "logits")
    if student_logits.dim() != 4:
        raise ValueError(f"pixel_kl_kd expects (N, K, H, W) logits, got {tuple(student_logits.shape)}")
    t = torch.as_tensor(temperature, dtype=student_logits.dtype, device=student_logits.device)
    if t.dim() > 0:
        _check_pixel_map("temperature", t, student_logits)
        t = t.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W), broadcast over classes
    # Classes stay on dim 1: no (N*H*W, K) copy of full-resolution logits.
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)  # (N, K, H, W)
    per_pixel = (kl * t**2).sum(dim=1)  # (N, H, W)
    pixel_weights = torch.ones_like(per_pixel) if weights is None else weights
    if weights is not None:
        _check_pixel_map("weights", weights, student_logits)
    if ignore is not None:
        _check_pixel_map("ignore", ignore, student_logits)
        keep = ~ignore.bool()
        # where, not a product: whatever the logits hold at ignored pixels, value and gradient are 0
        per_pixel = torch.where(keep, per_pixel, torch.zeros_like(per_pixel))
        pixel_weights = torch.where(keep, pixel_weights, torch.zeros_like(per_pixel))
    return _weighted_mean(per_pixel, pixel_weights)


def pairwise_affinity_kd(student: torch.Tensor, teacher: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Pair-wise (structured) distillation of feature affinities.

    Liu, Chen, Liu, Qin, Luo & Wang, 2019, "Structured Knowledge Distillation for Semantic
    Segmentation" (CVPR), pair-wise distillation: each map is max-pooled into nodes of
    ``scale * H`` by ``scale * W`` positions (the authors' code; scale 0.5 gives 2 x 2 nodes),
    the affinity of two nodes is the cosine similarity of their channel vectors, and the loss is
    the squared difference of student and teacher affinities averaged over node pairs and images.

    Note: the authors' code divides by a detached norm; here the gradient also flows through the
    normalization (the same value). The affinity comparison is ``relation_loss``.

    Args:
        student: (N, C_s, H, W); channel counts may differ.
        teacher: (N, C_t, H, W); N, H and W must match the student's (resize one map first).
        scale: fraction of the map's side that one node covers, in (0, 1].
    """
    _check_4d(student, teacher, "pairwise_affinity_kd")
    if (student.shape[0],) + student.shape[2:] != (teacher.shape[0],) + teacher.shape[2:]:
        raise ValueError(
            f"pairwise_affinity_kd needs the same N, H, W (channels may differ), got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}; resize one map first"
        )
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must lie in (0, 1] (fraction of the map side per node), got {scale}")
    h, w = student.shape[-2:]
    kernel = (max(1, int(h * scale)), max(1, int(w * scale)))
    pool = lambda x: F.max_pool2d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)  # (N, C, H', W')
    return relation_loss(pool(student), pool(teacher.detach()))


# --------------------------------------------------------------------------- module shells


class PixelKLKD(nn.Module):
    """``pixel_kl_kd`` with a stored temperature."""

    def __init__(self, temperature: Temperature = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits, ignore=None, weights=None):
        return pixel_kl_kd(student_logits, teacher_logits, self.temperature, ignore, weights)


class PairwiseAffinityKD(nn.Module):
    """``pairwise_affinity_kd`` with a stored node scale."""

    def __init__(self, scale: float = 0.5):
        super().__init__()
        self.scale = scale

    def forward(self, student, teacher):
        return pairwise_affinity_kd(student, teacher, self.scale)
