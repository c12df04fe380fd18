"""Joint image + mask pipelines for semantic segmentation, shaped for the segmentation datasets.

:func:`build_segmentation_transforms` returns a :class:`SegmentationTransform`, a callable
``(image, mask, key) -> (image, mask)`` that plugs into
:class:`~densekd.data.segmentation.SemanticSegmentationDataset` and
:class:`~densekd.data.segmentation.MaskFolderDataset` (``transforms=``)::

    image  uint8 (H, W, 3) RGB          -> float32 tensor (3, S, S), ImageNet-normalized
    mask   uint8 (H, W) class indices   -> int64 tensor (S, S), same geometry, nearest-neighbour
    key    int (image id or index)         seeds the sample's draws

One ``A.Compose`` moves image and mask together:

1. ``A.LongestMaxSize(S)`` + ``A.PadIfNeeded(S, S)``: the longer side becomes ``S`` (aspect
   ratio kept) and the rest is padded, the image with the ImageNet mean colour, the mask
   with ``ignore_index``, so padding counts neither in the loss nor in the metrics. Square
   images are simply resized (the synthetic set's 96 px images to ``S`` = 96: unchanged).
2. Augmentation, scaled by ``strength`` (>= 0; 0 = none): horizontal flip with probability
   ``hflip * min(strength, 1)``; a zoom about the centre by a factor in
   ``[1 - scale_jitter * strength, 1 + scale_jitter * strength]`` (size kept; what zooming
   out uncovers is ignore in the mask); brightness / contrast / saturation in
   ``1 +- color_jitter * strength`` and hue in ``+- color_jitter * strength / 4``.
3. ``A.Normalize`` with the ImageNet mean and std: torchvision's segmentation models (FCN,
   DeepLabV3, LRASPP) have no internal transform and expect normalized input.

Every geometric step resamples the mask with nearest-neighbour interpolation, so it keeps
exact class indices (and the ignore value); the image uses bilinear.

Determinism (as :class:`~densekd.data.transforms.DetectionTransform`): with an integer
``seed`` every call re-seeds the pipeline from ``SeedSequence((seed, epoch, key, worker,
occurrence))`` (``occurrence`` counts repeats of ``key`` in this epoch, for repeat-factor
sampling); call :meth:`SegmentationTransform.set_epoch` before each epoch. ``seed=None``
draws from albumentations' own unseeded RNG.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Dict, Optional, Sequence, Tuple

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor

from densekd.data._checks import checked_epoch, checked_seed
from densekd.data.segmentation import IGNORE_INDEX

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegmentationTransform", "build_segmentation_transforms"]

# What torchvision's segmentation weights were trained with (torchvision.transforms._presets.SemanticSegmentation).
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


def _non_negative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


class SegmentationTransform:
    """Resize/pad, strength-scaled augmentation and normalization of an image and its mask.

    Args:
        image_size: S, the side of the square output.
        strength: augmentation strength, >= 0 (0 = resize and normalize only).
        hflip: horizontal flip probability at strength >= 1, in [0, 1].
        scale_jitter: zoom range half-width at strength 1; ``scale_jitter * strength`` < 1.
        color_jitter: brightness / contrast / saturation half-width at strength 1.
        seed: integer for reproducible draws (module docstring), None for unseeded.
        ignore_index: mask value of padding and of pixels uncovered by zooming out.
        mean, std: per-channel normalization of [0, 1] pixels (default ImageNet's).

    Call: ``transform(image uint8 (H, W, 3), mask uint8 (H, W), key) -> (float32 (3, S, S), int64 (S, S))``.
    """

    def __init__(
        self,
        image_size: int,
        strength: float = 1.0,
        hflip: float = 0.0,
        scale_jitter: float = 0.0,
        color_jitter: float = 0.0,
        seed: Optional[int] = None,
        ignore_index: int = IGNORE_INDEX,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = image_size
        self.hflip = _non_negative("hflip", hflip)
        if self.hflip > 1:
            raise ValueError(f"hflip is a probability and must be in [0, 1], got {hflip}")
        self.scale_jitter = _non_negative("scale_jitter", scale_jitter)
        self.color_jitter = _non_negative("color_jitter", color_jitter)
        self.seed = None if seed is None else checked_seed(seed)
        self.ignore_index = int(ignore_index)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each (RGB), std > 0; got {mean}, {std}")
        self.epoch = 0
        self._occurrences: Dict[int, int] = defaultdict(int)
        self.strength = 0.0
        self.pipeline: A.Compose = self._build(0.0)
        self.set_strength(strength)

    def set_strength(self, strength: float) -> None:
        """Rebuild the pipeline for a new augmentation strength (>= 0)."""
        strength = _non_negative("strength", strength)
        if self.scale_jitter * strength >= 1:
            raise ValueError(
                f"scale_jitter * strength = {self.scale_jitter} * {strength} must be < 1 (zoom factors must "
                "stay positive); lower scale_jitter or the strength schedule's maximum"
            )
        self.strength = strength
        self.pipeline = self._build(strength)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws the seeded transform makes (resets repeat counters)."""
        self.epoch = checked_epoch(epoch)
        self._occurrences.clear()

    def _build(self, strength: float) -> A.Compose:
        size, zoom, color = self.image_size, self.scale_jitter * strength, self.color_jitter * strength
        mean_colour = tuple(round(255 * m) for m in self.mean)  # padding normalizes to ~0
        steps = [
            A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
            A.PadIfNeeded(size, size, border_mode=cv2.BORDER_CONSTANT, fill=mean_colour, fill_mask=self.ignore_index),
        ]
        if strength > 0:
            steps += [
                A.HorizontalFlip(p=self.hflip * min(strength, 1.0)),
                A.Affine(
                    scale=(1.0 - zoom, 1.0 + zoom), keep_ratio=True, interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=mean_colour,
                    fill_mask=self.ignore_index, p=1.0 if zoom > 0 else 0.0,
                ),  # fmt: skip
                A.ColorJitter(
                    brightness=color, contrast=color, saturation=color, hue=min(0.5, color / 4),
                    p=1.0 if color > 0 else 0.0,
                ),  # fmt: skip
            ]
        steps.append(A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0))
        return A.Compose(steps, seed=self.seed)

    def _reseed(self, key: int) -> None:
        if self.seed is None:
            return
        occurrence = self._occurrences[key]
        self._occurrences[key] += 1
        info = torch.utils.data.get_worker_info()
        worker_id = 0 if info is None else info.id
        sequence = np.random.SeedSequence([self.seed, self.epoch, key & 0xFFFFFFFFFFFFFFFF, worker_id, occurrence])
        np_state, py_state = sequence.spawn(2)
        self.pipeline.set_random_state(np.random.default_rng(np_state), random.Random(int(py_state.generate_state(1)[0])))

    def __call__(self, image: np.ndarray, mask: np.ndarray, key: int = 0) -> Tuple[Tensor, Tensor]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} (H, W) must have the same size")
        self._reseed(int(key))
        out = self.pipeline(image=image, mask=np.ascontiguousarray(mask, dtype=np.uint8))
        image_tensor = torch.from_numpy(np.ascontiguousarray(out["image"], dtype=np.float32)).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)
        return image_tensor.contiguous(), torch.from_numpy(np.ascontiguousarray(out["mask"])).long()  # (S, S)

    def __repr__(self) -> str:
        return (
            f"SegmentationTransform(image_size={self.image_size}, strength={self.strength}, hflip={self.hflip}, "
            f"scale_jitter={self.scale_jitter}, color_jitter={self.color_jitter}, seed={self.seed})"
        )


def build_segmentation_transforms(image_size: int, **options) -> SegmentationTransform:
    """Training (``strength > 0`` with flip / zoom / colour) or evaluation (``strength=0``)
    pipeline for the segmentation datasets: see :class:`SegmentationTransform`."""
    return SegmentationTransform(image_size, **options)
