"""The segmentation family of tools/bench_overhead.py: DeepLabV3 with an FCN auxiliary head on
the detection families' bodies (ResNet-34 teacher, ResNet-18 student, built from scratch by
densekd.segmentation.models), the ModelSpec's FPN width serving as the ASPP width.

Segmentation models take one (N, 3, H, W) tensor and (N, H, W) class masks, and have no
internal transform, so the teacher sees the student's input tensor itself.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from densekd import Term
from densekd.segmentation.models import deeplabv3
from densekd.segmentation.trainer import segmentation_losses

from .internals import IGNORE_INDEX

NUM_CLASSES = 12  # as the detection families: background at 0 and labels 1..12 -> 13 channels
OUTPUT_STRIDE = 16  # ResNet-18/34 with layer4 at stride 1 (densekd.segmentation.models.deeplabv3)


def build_deeplabv3(spec, scale) -> nn.Module:
    """DeepLabV3 + aux head; atrous rates spaced to fit the stride-16 map (torchvision's 12/24/36
    suit 513 px at stride 8, 65 px maps; 160 px at stride 16 gives 10 px maps)."""
    side = max(scale.image_size // OUTPUT_STRIDE, 3)
    rates = [max(1, round(side * fraction)) for fraction in (0.2, 0.4, 0.6)]
    return deeplabv3(NUM_CLASSES + 1, backbone=spec.body, aspp_channels=spec.fpn_channels, atrous_rates=rates, aux=True)


def feature_terms() -> list[Term]:
    """CWD on both backbone levels and spatial attention, as the detection families' feature terms."""
    return [
        Term("cwd", on="features", temperature=4.0, weight=0.2),
        Term("attention", on="features"),
    ]


def full_terms() -> list[Term]:
    """configs/recipes/seg_pixel_kl_cwd.yaml (without its class weights, which need dataset
    counts) on the final and the auxiliary logits, pairwise affinity (Liu et al. 2019) and the
    feature terms: every kind of output a segmentation model gives."""
    return [
        Term("pixel_kl", on="seg_logits", temperature=4.0, weight=3.0),
        Term("cwd", on="seg_logits", temperature=4.0, weight=0.5),
        Term("pixel_kl", on="aux_logits", temperature=4.0),
        Term("pairwise_affinity", on="features"),
        *feature_terms(),
    ]


def segmentation_batch(scale, seed: int) -> tuple[Tensor, Tensor]:
    """(N, 3, H, W) images and (N, H, W) int64 masks: background with 1-4 labelled rectangles
    (side 1/8 to 1/2 of the image) and an ignored border, as the dataset's masks."""
    generator = torch.Generator().manual_seed(seed)
    size, count = scale.image_size, scale.batch_size
    images = torch.rand(count, 3, size, size, generator=generator)
    masks = torch.zeros(count, size, size, dtype=torch.int64)
    for mask in masks:
        for _ in range(int(torch.randint(1, 5, (), generator=generator))):
            width, height = (int(side) for side in (torch.rand(2, generator=generator) * 3 / 8 + 1 / 8) * size)
            x, y = (int(corner) for corner in torch.rand(2, generator=generator) * (size - max(width, height)))
            mask[y : y + height, x : x + width] = int(torch.randint(1, NUM_CLASSES + 1, (), generator=generator))
        mask[:, :2] = IGNORE_INDEX
    return images, masks


def segmentation_student_losses(model: nn.Module, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """The plain student's losses: cross-entropy on "out" plus 0.5 x on "aux" (torchvision's
    reference training), as densekd.SegmentationTraining computes them."""
    return segmentation_losses(model(images), masks, aux_weight=0.5, ignore_index=IGNORE_INDEX, label_smoothing=0.0)


def segmentation_forward(model: nn.Module, images: Tensor) -> object:
    """The model's full eval forward: backbone, classifier and aux classifier, upsampled logits."""
    return model(images)


def segmentation_features(model: nn.Module, images: Tensor) -> object:
    """The backbone alone: what a feature-only teacher computes."""
    return model.backbone(images)
