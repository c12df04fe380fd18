"""Distillation losses: plain tensors in, unweighted scalar out, usable in any codebase.

``LOSSES`` maps a loss name (as used in configs) to its functional core; ``get_loss(name)`` looks
one up with an error that lists the valid names.
"""

import difflib
from typing import Callable, Dict

import torch

from .attention import (
    ChannelAttentionLoss,
    RelationLoss,
    SpatialAttentionLoss,
    channel_attention_loss,
    relation_loss,
    spatial_attention_loss,
)
from .boxes import (
    DeltaRegressionKD,
    GIoUKD,
    TeacherBoundedRegression,
    delta_l1_kd,
    delta_l2_kd,
    delta_regression_kd,
    delta_smooth_l1_kd,
    giou_kd,
    teacher_bounded_regression,
)
from .features import (
    ChannelWiseKD,
    HintLoss,
    MaskedImitationLoss,
    PearsonKD,
    channel_wise_kd,
    hint_loss,
    masked_imitation_loss,
    pearson_kd,
)
from .heatmaps import SpatialSoftmaxKD, spatial_softmax_kd
from .logits import (
    BinaryKD,
    DecoupledKD,
    FocalBinaryKD,
    FocalKLKD,
    KLDivKD,
    MarginKD,
    binary_kd,
    decoupled_kd,
    focal_binary_kd,
    focal_kl_kd,
    kl_div_kd,
    margin_kd,
)
from .matched_boxes import MatchedGIoUKD, matched_giou_kd
from .pseudo_targets import PseudoTargetKD, pseudo_target_kd
from .segmentation import PairwiseAffinityKD, PixelKLKD, pairwise_affinity_kd, pixel_class_weights, pixel_kl_kd

LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "kl": kl_div_kd,
    "binary_kd": binary_kd,
    "focal_binary_kd": focal_binary_kd,
    "focal_kl": focal_kl_kd,
    "margin": margin_kd,
    "dkd": decoupled_kd,
    "delta_l1": delta_l1_kd,
    "delta_l2": delta_l2_kd,
    "delta_smooth_l1": delta_smooth_l1_kd,
    "teacher_bounded": teacher_bounded_regression,
    "giou": giou_kd,
    "hint": hint_loss,
    "masked_imitation": masked_imitation_loss,
    "cwd": channel_wise_kd,
    "pkd": pearson_kd,
    "attention": spatial_attention_loss,
    "channel_attention": channel_attention_loss,
    "relation": relation_loss,
    "pixel_kl": pixel_kl_kd,
    "pairwise_affinity": pairwise_affinity_kd,
    "spatial_kl": spatial_softmax_kd,
    "pseudo_targets": pseudo_target_kd,
    "matched_giou": matched_giou_kd,
}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """Return the functional core registered as ``name``; ValueError listing valid names otherwise."""
    if name in LOSSES:
        return LOSSES[name]
    close = difflib.get_close_matches(str(name), list(LOSSES), n=3)
    suggestion = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(f"unknown loss {name!r}; {suggestion}valid losses: {', '.join(sorted(LOSSES))}")


__all__ = [
    "LOSSES",
    "get_loss",
    # logits
    "kl_div_kd",
    "binary_kd",
    "focal_binary_kd",
    "focal_kl_kd",
    "margin_kd",
    "decoupled_kd",
    "KLDivKD",
    "BinaryKD",
    "FocalBinaryKD",
    "FocalKLKD",
    "MarginKD",
    "DecoupledKD",
    # boxes
    "delta_regression_kd",
    "delta_l1_kd",
    "delta_l2_kd",
    "delta_smooth_l1_kd",
    "teacher_bounded_regression",
    "giou_kd",
    "DeltaRegressionKD",
    "TeacherBoundedRegression",
    "GIoUKD",
    # features
    "hint_loss",
    "masked_imitation_loss",
    "channel_wise_kd",
    "pearson_kd",
    "HintLoss",
    "MaskedImitationLoss",
    "ChannelWiseKD",
    "PearsonKD",
    # attention
    "spatial_attention_loss",
    "channel_attention_loss",
    "relation_loss",
    "SpatialAttentionLoss",
    "ChannelAttentionLoss",
    "RelationLoss",
    # segmentation
    "pixel_kl_kd",
    "pairwise_affinity_kd",
    "pixel_class_weights",
    "PixelKLKD",
    "PairwiseAffinityKD",
    # heatmaps
    "spatial_softmax_kd",
    "SpatialSoftmaxKD",
    # teacher detections
    "pseudo_target_kd",
    "matched_giou_kd",
    "PseudoTargetKD",
    "MatchedGIoUKD",
]
