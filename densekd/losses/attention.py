"""Attention and relation transfer: compare channel-free summaries of features, so student and
teacher channel counts may differ and no connector is needed.

Every function returns an unweighted scalar; teacher tensors are detached inside.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ._reduce import _weighted_mean


def _check_4d(student: torch.Tensor, teacher: torch.Tensor, loss_name: str) -> None:
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(f"{loss_name} expects (N, C, H, W) feature maps, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")


def _spatial_attention(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): mean over channels of squared activations, L2-normalized per sample."""
    return F.normalize(x.pow(2).mean(dim=1).flatten(1), dim=1)


def _channel_attention(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C): spatial mean of squared activations, L2-normalized per sample."""
    return F.normalize(x.pow(2).mean(dim=(2, 3)), dim=1)


def _cosine_affinity(items: torch.Tensor) -> torch.Tensor:
    """(B, M, D) -> (B, M, M) cosine similarity between the M items of each batch entry."""
    items = F.normalize(items, dim=-1)
    return items @ items.transpose(1, 2)


def spatial_attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Spatial attention transfer.

    Zagoruyko & Komodakis, 2017, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer" (ICLR). Attention map = mean over
    channels of squared activations, flattened and L2-normalized per sample; loss = mean squared
    difference between the two maps.

    Note: the paper uses the (unsquared) p-norm of the difference, ``beta / 2`` times; the authors'
    code, followed here, uses ``(at(x) - at(y)).pow(2).mean()``.

    Args:
        student: (N, C_s, H, W).
        teacher: (N, C_t, H, W); channel counts may differ, N, H and W must match.
    """
    _check_4d(student, teacher, "spatial_attention_loss")
    if (student.shape[0],) + student.shape[2:] != (teacher.shape[0],) + teacher.shape[2:]:
        raise ValueError(
            f"spatial_attention_loss needs the same N, H, W (channels may differ), got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}; resize one map first"
        )
    diff = _spatial_attention(student) - _spatial_attention(teacher.detach())  # (N, H*W)
    return _weighted_mean(diff.pow(2))


def channel_attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Channel attention transfer.

    The attention-transfer recipe of Zagoruyko & Komodakis, 2017 (see ``spatial_attention_loss``)
    applied along channels, in the spirit of Zhou et al., 2020, "Channel Distillation:
    Channel-Wise Attention for Knowledge Distillation". Channel attention = spatial mean of squared
    activations (N, C), L2-normalized per sample; loss = mean squared difference.

    Note: Channel Distillation pools raw activations and takes an unnormalized MSE; squaring and
    normalizing here matches the spatial variant and makes the loss scale-free.

    Args:
        student: (N, C, H_s, W_s).
        teacher: (N, C, H_t, W_t); N and C must match, spatial sizes may differ.
    """
    _check_4d(student, teacher, "channel_attention_loss")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"channel_attention_loss needs the same N and C, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}; add a 1x1 conv connector to match channels"
        )
    diff = _channel_attention(student) - _channel_attention(teacher.detach())  # (N, C)
    return _weighted_mean(diff.pow(2))


def _as_items(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C) positions as items, or (M, D) -> (1, M, D)."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    return x.unsqueeze(0)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relation (pairwise affinity) transfer.

    Park, Kim, Lu & Cho, 2019, "Relational Knowledge Distillation" (CVPR) transfer relations
    between items instead of the items themselves; this uses the cosine-affinity pairwise term of
    Liu, Chen, Liu, Qin, Luo & Wang, 2019, "Structured Knowledge Distillation for Semantic
    Segmentation" (CVPR): loss = mean over item pairs of the squared difference of cosine
    similarities.

    Notes: RKD's distance and angle potentials with a Huber loss are not used; Liu et al. first
    pool positions into larger nodes, here every position is an item (pool before calling to
    coarsen). The affinity matrices are (N, HW, HW): keep H*W small.

    Args:
        student: (N, C_s, H, W) feature maps (positions are the items), or (M, D_s) embeddings
            (e.g. RoI features).
        teacher: (N, C_t, H, W) or (M, D_t); channel / embedding sizes may differ.

    Returns:
        scalar; 0 (keeping the graph) when there are fewer than 2 items.
    """
    if student.dim() not in (2, 4) or student.dim() != teacher.dim():
        raise ValueError(f"relation_loss expects (N, C, H, W) or (M, D) inputs of the same rank, got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    items_s, items_t = _as_items(student), _as_items(teacher.detach())  # (B, M, D_s), (B, M, D_t)
    if items_s.shape[:2] != items_t.shape[:2]:
        raise ValueError(f"relation_loss needs the same items (N, H, W or M), got student "
                         f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if items_s.shape[1] < 2:
        return student.sum() * 0.0
    diff = _cosine_affinity(items_s) - _cosine_affinity(items_t)  # (B, M, M)
    return _weighted_mean(diff.pow(2))


# --------------------------------------------------------------------------- module shells


class SpatialAttentionLoss(nn.Module):
    """``spatial_attention_loss`` as a module."""

    def forward(self, student, teacher):
        return spatial_attention_loss(student, teacher)


class ChannelAttentionLoss(nn.Module):
    """``channel_attention_loss`` as a module."""

    def forward(self, student, teacher):
        return channel_attention_loss(student, teacher)


class RelationLoss(nn.Module):
    """``relation_loss`` as a module."""

    def forward(self, student, teacher):
        return relation_loss(student, teacher)
