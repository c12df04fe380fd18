"""Long-tail statistics of a labelled training set: per-class counts, LVIS frequency groups and
repeat factors.

They describe data, not distillation, so the samplers, the evaluation and the class weights of
:mod:`densekd.core.weighting` all read them from here.

LVIS (Gupta et al. 2019, sec. 3) splits categories by the number of *training images* that
contain them: rare <= 10, common 11..100, frequent > 100. Evaluation reports AP per group
(APr / APc / APf), and long-tail weighting can scale by group. Plain COCO files carry no
``frequency`` field, so the groups are derived from the training split's counts.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "FREQUENCY_THRESHOLDS",
    "LVIS_FREQUENCIES",
    "lvis_frequency",
    "lvis_frequency_of_counts",
    "class_counts_from_labels",
    "repeat_factors",
]

FREQUENCY_THRESHOLDS: Tuple[int, int] = (10, 100)  # rare <= 10 images, common <= 100, frequent above
LVIS_FREQUENCIES: Tuple[str, str, str] = ("r", "c", "f")


def lvis_frequency(image_count: float) -> str:
    """``'r'``, ``'c'`` or ``'f'`` for a category seen in ``image_count`` training images."""
    if image_count < 0:
        raise ValueError(f"image_count must be >= 0, got {image_count}")
    rare_max, common_max = FREQUENCY_THRESHOLDS
    return "r" if image_count <= rare_max else "c" if image_count <= common_max else "f"


def lvis_frequency_of_counts(image_counts: Sequence[int]) -> List[str]:
    """(K,) training-image counts -> (K,) groups, e.g. ``[3, 40, 500] -> ['r', 'c', 'f']``."""
    return [lvis_frequency(float(count)) for count in image_counts]


def _image_label_indices(image_labels: Sequence[Sequence[int]], num_classes: int, first_label: int) -> list:
    """Per image, a 1-D int64 tensor of 0-based class indices (with duplicates)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    out = []
    for i, labels in enumerate(image_labels):
        idx = torch.as_tensor(labels, dtype=torch.int64).reshape(-1) - first_label  # (A_i,)
        if idx.numel() and (idx.min() < 0 or idx.max() >= num_classes):
            raise ValueError(
                f"image {i} has label(s) outside [{first_label}, {first_label + num_classes - 1}] "
                f"(first_label={first_label}, num_classes={num_classes}); labels must be foreground classes "
                "numbered from first_label. For torchvision detection targets (1..K, 0 = background) "
                "pass first_label=1 and num_classes=K"
            )
        out.append(idx)
    return out


def class_counts_from_labels(
    image_labels: Sequence[Sequence[int]],
    num_classes: int,
    first_label: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Image and annotation counts per class from per-image label lists.

    Args:
        image_labels: for each image, the labels of its annotations (duplicates
            allowed: one entry per instance).  Labels are ``first_label ..
            first_label + num_classes - 1``.
        num_classes: K, the number of foreground classes.
        first_label: 0 for contiguous 0-based labels (default); 1 for torchvision
            detection targets, where 0 is background.

    Returns:
        ``(image_counts, annotation_counts)``, each ``(K,)`` int64: number of images
        containing the class, and number of instances of the class.
    """
    image_counts = torch.zeros(num_classes, dtype=torch.int64)
    annotation_counts = torch.zeros(num_classes, dtype=torch.int64)
    for idx in _image_label_indices(image_labels, num_classes, first_label):
        annotation_counts += torch.bincount(idx, minlength=num_classes)
        image_counts[torch.unique(idx)] += 1
    return image_counts, annotation_counts


def repeat_factors(
    image_labels: Sequence[Sequence[int]],
    num_classes: int,
    threshold: float = 0.001,
    first_label: int = 0,
) -> Tensor:
    """Repeat factor per image for LVIS repeat-factor sampling.

    Gupta et al. 2019, "LVIS: A Dataset for Large Vocabulary Instance Segmentation":
    with ``f_c`` the fraction of training images containing class ``c``,

    * per class: ``r_c = max(1, sqrt(threshold / f_c))``
    * per image: ``r_i = max_{c in image i} r_c``, and 1.0 for images without annotations.

    Class frequencies are computed from ``image_labels`` itself, so pass the whole
    training set.  An epoch then repeats image ``i`` about ``r_i`` times (a sampler
    rounds stochastically).

    Args:
        image_labels: for each image, its annotation labels, numbered
            ``first_label .. first_label + num_classes - 1``.
        num_classes: K, the number of foreground classes.
        threshold: ``t``; classes in fewer than a fraction ``t`` of images are oversampled.
        first_label: 0 for 0-based labels (default), 1 for torchvision detection targets.

    Returns:
        ``(num_images,)`` float32, every entry >= 1.
    """
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0 (LVIS uses 0.001), got {threshold}")
    per_image = _image_label_indices(image_labels, num_classes, first_label)
    num_images = len(per_image)
    if num_images == 0:
        raise ValueError("image_labels is empty; repeat factors need the training set's labels")

    image_counts = torch.zeros(num_classes, dtype=torch.float64)
    for idx in per_image:
        image_counts[torch.unique(idx)] += 1
    freq = image_counts / num_images  # (K,) f_c
    # Classes absent from every image never enter the max below; give them 1.
    class_factor = torch.where(
        freq > 0,
        torch.sqrt(threshold / freq.clamp(min=1e-300)).clamp(min=1.0),
        torch.ones_like(freq),
    )  # (K,) r_c

    out = torch.ones(num_images, dtype=torch.float64)
    for i, idx in enumerate(per_image):
        if idx.numel():
            out[i] = class_factor[idx].max()
    return out.to(torch.float32)  # (num_images,)
