"""Bbox- and mask-aware albumentations pipelines for detection, shaped for the dataset's ``transforms`` hook.

:func:`build_detection_transforms` returns a :class:`DetectionTransform`, a callable
``(image, target) -> (image, target)`` that plugs into
:class:`~densekd.data.coco.CocoDetectionDataset` (``transforms=``)::

    image   uint8 (H, W, 3) RGB                      -> uint8 (H, W, 3), same size
    target  {"boxes": float32 (M, 4) xyxy pixels,     -> the same keys, M' <= M instances:
             "labels": int64 (M,), "area": float32 (M,),   every per-instance array keeps
             "iscrowd": int64 (M,), "image_id": int,       the same instances, in order
             "masks": uint8 (M, H, W) (optional)}

The pipeline is an ``A.Compose`` of a horizontal flip, a mild scale-only ``A.Affine``
(zoom about the centre, image size kept, zero fill) and ``A.ColorJitter``, with
``A.BboxParams(format="pascal_voc", min_visibility=...)``.  Albumentations drops boxes
that leave the image (visible fraction < ``min_visibility``); the transform carries each
box's index through a label field and indexes every other per-instance array (labels,
masks, area, iscrowd and any other array of length M) with the survivors, so they stay
aligned.  Masks go in as ``masks=[...]`` and get the same geometry (nearest interpolation).

``area`` is updated to follow the geometry: the mask's pixel count when masks are
present, otherwise the old area times (new box area / old box area).

Strength.  ``strength`` (>= 0) scales everything: flip probability
``hflip * min(strength, 1)``, zoom in ``[1 - scale_jitter * strength, 1 + scale_jitter * strength]``,
brightness / contrast / saturation factors in ``1 +- color_jitter * strength`` and hue in
``+- color_jitter * strength / 4``.  ``strength = 0`` is the exact identity (albumentations
is not called).  ``transform.set_strength(s)`` rebuilds the pipeline; that is how a
curriculum raises augmentation strength during training.

Determinism.  Albumentations 2 keeps its own RNG inside ``A.Compose`` (``np.random.seed``
and ``torch.manual_seed`` do not reach it).  With ``seed=None`` the transform uses that RNG
unseeded (random every run).  With an integer ``seed``, every call re-seeds the pipeline
(``Compose.set_random_state``) from
``SeedSequence((seed, epoch, image_id, worker_id, occurrence))``, where ``occurrence``
counts how often this process has already transformed that ``image_id`` in the current
epoch (so repeated images -- repeat-factor sampling -- get different draws) and
``worker_id`` is the DataLoader worker (0 in the main process).  Hence:

* the same seed gives identical outputs, run after run, for a given ``num_workers``
  (the DataLoader hands batches to workers in a fixed round-robin order);
* a run resumed at an epoch boundary replays the same augmentations;
* call :meth:`DetectionTransform.set_epoch` before each epoch's iterator is created
  (worker processes get a copy of the transform when the iterator starts; with
  ``persistent_workers=True`` the copy never sees later ``set_epoch`` calls, so use
  non-persistent workers when you need per-epoch reproducibility).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any, Dict, Optional, Tuple

import albumentations as A
import cv2
import numpy as np
import torch

from densekd.data._checks import checked_epoch, checked_seed

__all__ = ["DetectionTransform", "build_detection_transforms"]

NumpyTarget = Dict[str, Any]

# Keys that are never indexed per instance ("boxes" and "masks" are handled explicitly).
_NOT_PER_INSTANCE = ("boxes", "masks", "image_id")


def _check_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _per_instance_keys(target: NumpyTarget, num_boxes: int) -> list:
    """Keys (other than boxes / masks / image_id) holding an array with one row per box."""
    keys = []
    for key, value in target.items():
        if key in _NOT_PER_INSTANCE:
            continue
        array = np.asarray(value)
        if array.ndim >= 1 and array.shape[0] == num_boxes:
            keys.append(key)
    return keys


class DetectionTransform:
    """Seedable, strength-scaled albumentations detection pipeline; see the module docstring.

    Args:
        strength: overall augmentation strength, >= 0 (0 = identity, 1 = the nominal setting).
        hflip: horizontal flip probability at strength >= 1, in [0, 1].
        scale_jitter: zoom range half-width at strength 1; ``scale_jitter * strength`` must be < 1.
        color_jitter: brightness / contrast / saturation half-width at strength 1.
        min_visibility: boxes with less than this fraction of their area left inside
            the image are dropped (with their labels, masks, ...).
        seed: integer for reproducible draws (see the module docstring), None for unseeded.
        fill: pixel value of the border uncovered when zooming out.

    Call: ``transform(image, target) -> (image, target)`` with ``image`` uint8 (H, W, 3).
    """

    def __init__(
        self,
        strength: float = 1.0,
        hflip: float = 0.5,
        scale_jitter: float = 0.2,
        color_jitter: float = 0.2,
        min_visibility: float = 0.3,
        seed: Optional[int] = None,
        fill: int = 0,
    ) -> None:
        self.hflip = _check_non_negative("hflip", hflip)
        if self.hflip > 1:
            raise ValueError(f"hflip is a probability and must be in [0, 1], got {hflip}")
        self.scale_jitter = _check_non_negative("scale_jitter", scale_jitter)
        self.color_jitter = _check_non_negative("color_jitter", color_jitter)
        self.min_visibility = _check_non_negative("min_visibility", min_visibility)
        if self.min_visibility > 1:
            raise ValueError(f"min_visibility is a fraction and must be in [0, 1], got {min_visibility}")
        self.seed = None if seed is None else checked_seed(seed)
        self.fill = fill
        self.epoch = 0
        self._occurrences: Dict[int, int] = defaultdict(int)
        self._calls = 0
        self.strength = 0.0
        self.pipeline: Optional[A.Compose] = None
        self.set_strength(strength)

    # ------------------------------------------------------------------ configuration
    def set_strength(self, strength: float) -> None:
        """Rebuild the pipeline for a new strength (>= 0; 0 = identity)."""
        strength = _check_non_negative("strength", strength)
        if self.scale_jitter * strength >= 1:
            raise ValueError(
                f"scale_jitter * strength = {self.scale_jitter} * {strength} must be < 1 (zoom factors "
                "must stay positive); lower scale_jitter or the strength schedule's maximum"
            )
        self.strength = strength
        self.pipeline = None if strength == 0 else self._build(strength)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws the seeded transform makes (resets repeat counters)."""
        self.epoch = checked_epoch(epoch)
        self._occurrences.clear()
        self._calls = 0

    def _build(self, strength: float) -> A.Compose:
        zoom = self.scale_jitter * strength
        color = self.color_jitter * strength
        transforms = [
            A.HorizontalFlip(p=self.hflip * min(strength, 1.0)),
            A.Affine(
                scale=(1.0 - zoom, 1.0 + zoom),
                keep_ratio=True,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=self.fill,
                fill_mask=0,
                p=1.0 if zoom > 0 else 0.0,
            ),
            A.ColorJitter(
                brightness=color,
                contrast=color,
                saturation=color,
                hue=min(0.5, color / 4),
                p=1.0 if color > 0 else 0.0,
            ),
        ]
        return A.Compose(
            transforms,
            bbox_params=A.BboxParams(
                format="pascal_voc", label_fields=["instance_index"], min_visibility=self.min_visibility
            ),
            seed=self.seed,
        )

    # ------------------------------------------------------------------ seeding
    def _reseed(self, target: NumpyTarget) -> None:
        if self.seed is None:
            return
        image_id = int(target.get("image_id", -1))
        if "image_id" in target:
            occurrence = self._occurrences[image_id]
            self._occurrences[image_id] += 1
        else:  # no id to key on: fall back to the call count of this process
            occurrence = self._calls
        self._calls += 1
        info = torch.utils.data.get_worker_info()
        worker_id = 0 if info is None else info.id
        sequence = np.random.SeedSequence(
            [self.seed, self.epoch, image_id & 0xFFFFFFFFFFFFFFFF, worker_id, occurrence]
        )
        np_state, py_state = sequence.spawn(2)
        self.pipeline.set_random_state(
            np.random.default_rng(np_state), random.Random(int(py_state.generate_state(1)[0]))
        )

    # ------------------------------------------------------------------ call
    def __call__(self, image: np.ndarray, target: NumpyTarget) -> Tuple[np.ndarray, NumpyTarget]:
        if self.pipeline is None:
            return image, target
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}; "
                "DetectionTransform runs before the dataset converts to tensors"
            )
        height, width = image.shape[:2]
        boxes = np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)  # (M, 4) xyxy
        num_boxes = boxes.shape[0]
        # albumentations rejects boxes poking out of the image by float noise; clip first.
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        has_masks = "masks" in target
        masks = np.asarray(target["masks"], dtype=np.uint8).reshape(-1, height, width) if has_masks else None
        if has_masks and masks.shape[0] != num_boxes:
            raise ValueError(f"target has {num_boxes} boxes but {masks.shape[0]} masks; they must match one-to-one")

        self._reseed(target)
        inputs: Dict[str, Any] = {"image": image, "bboxes": boxes, "instance_index": np.arange(num_boxes)}
        if has_masks and num_boxes:
            inputs["masks"] = list(masks)  # each (H, W): same geometric transform as the image
        out = self.pipeline(**inputs)

        keep = np.asarray(out["instance_index"], dtype=np.int64).reshape(-1)  # (M',) surviving indices
        new_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)  # (M', 4)
        new_image = out["image"]
        result: NumpyTarget = dict(target)
        for key in _per_instance_keys(target, num_boxes):
            result[key] = np.asarray(target[key])[keep]
        result["boxes"] = new_boxes
        if has_masks:
            new_height, new_width = new_image.shape[:2]
            if num_boxes:
                all_masks = np.stack([np.asarray(m, dtype=np.uint8) for m in out["masks"]])  # (M, H, W)
                result["masks"] = all_masks[keep]
            else:
                result["masks"] = np.zeros((0, new_height, new_width), dtype=np.uint8)
        if "area" in target:
            result["area"] = self._new_area(target, boxes, new_boxes, keep, result.get("masks"))
        return new_image, result

    @staticmethod
    def _new_area(
        target: NumpyTarget, old_boxes: np.ndarray, new_boxes: np.ndarray, keep: np.ndarray, masks: Optional[np.ndarray]
    ) -> np.ndarray:
        """(M',) float32: mask pixel counts, or the old area scaled by the box-area ratio."""
        if masks is not None:
            return masks.sum(axis=(1, 2), dtype=np.int64).astype(np.float32)  # (M',)
        old_area = np.asarray(target["area"], dtype=np.float32)[keep]
        kept = old_boxes[keep]
        old_box_area = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])
        new_box_area = (new_boxes[:, 2] - new_boxes[:, 0]) * (new_boxes[:, 3] - new_boxes[:, 1])
        ratio = np.divide(new_box_area, old_box_area, out=np.ones_like(new_box_area), where=old_box_area > 0)
        return (old_area * ratio).astype(np.float32)

    def __repr__(self) -> str:
        return (
            f"DetectionTransform(strength={self.strength}, hflip={self.hflip}, scale_jitter={self.scale_jitter}, "
            f"color_jitter={self.color_jitter}, min_visibility={self.min_visibility}, seed={self.seed})"
        )


def build_detection_transforms(**options) -> DetectionTransform:
    """The training pipeline: flip, mild zoom (size kept), colour jitter, all scaled by ``strength``.

    Returns a :class:`DetectionTransform` (same keyword arguments) for
    ``CocoDetectionDataset(transforms=...)``; ``image`` uint8 (H, W, 3) in and out, boxes /
    labels / masks / area / iscrowd kept aligned. Pass an integer ``seed`` for reproducible
    augmentation (see the module docstring).
    """
    return DetectionTransform(**options)
