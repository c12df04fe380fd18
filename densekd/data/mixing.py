"""Detection MixUp and CutMix as a Dataset wrapper.

:class:`MixedDetectionDataset` wraps a dataset that returns torchvision detection
samples and, at random, mixes each sample with another one of the same dataset::

    image   float32 (3, H, W) in [0, 1]
    target  {"boxes": float32 (M, 4) xyxy pixels, "labels": int64 (M,), "image_id": int,
             "area": float32 (M,), "iscrowd": int64 (M,), "masks": uint8 (M, H, W) (optional)}

Mixing happens on the data side, so the teacher and the student see the same mixed
image (the Distiller feeds both the same batch).  Every returned target gains
``mix_weights`` float32 (M,): 1 for unmixed samples, see below for mixed ones.

MixUp (Zhang et al. 2019, "Bag of Freebies for Training Object Detection Neural
Networks"): ``lam ~ Beta(mixup_alpha, mixup_alpha)``; both images are pasted top-left on a
zero canvas of the larger height and width, ``image = lam * a + (1 - lam) * b``; the
targets are concatenated (a's instances first), masks zero-padded to the canvas.
``mix_weights`` is ``lam`` for a's boxes and ``1 - lam`` for b's.  torchvision's detection
losses cannot weight boxes, so every box counts fully in training (the YOLO-style
simplification); ``mix_weights`` is stored for reference and for custom losses.

CutMix (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers
with Localizable Features"), adapted to boxes: ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``;
a rectangle of area ``(1 - lam)`` times the shared region (the top-left
``min(Ha, Hb) x min(Wa, Wb)``), centred uniformly and clipped to that region, is copied
from b into a at the same pixel coordinates; the output has a's size.

* a's boxes are kept WHOLE if at least ``cutmix_min_visible`` (30 %) of their box area
  lies outside the patch, dropped otherwise; kept masks lose the patch pixels.
* b's boxes are CLIPPED to the patch and kept if at least ``cutmix_min_visible`` of
  their box area lies inside it; their masks are cut to the patch.
* ``mix_weights`` is each kept box's visible fraction (outside the patch for a, inside
  for b); ``area`` is the mask pixel count with masks, else the area times that fraction.

Reproducibility.  Every random choice for sample ``index`` comes from
``numpy.random.default_rng((seed, epoch, index))``; call :meth:`MixedDetectionDataset.set_epoch`
once per epoch (before the DataLoader iterator is created, so worker processes get the
new epoch -- not compatible with ``persistent_workers=True``).  A resumed run therefore
replays the same mixes, whatever ``num_workers`` is.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numpy as np
import torch
from torch import Tensor

from densekd.data._checks import checked_epoch, checked_seed

__all__ = ["MixedDetectionDataset", "mixup", "cutmix"]

Target = Dict[str, Any]

def _with_mix_weights(target: Target) -> Target:
    """A shallow copy of ``target`` with ``mix_weights`` (M,) = 1 when absent."""
    out = dict(target)
    if "mix_weights" not in out:
        out["mix_weights"] = torch.ones(out["boxes"].reshape(-1, 4).shape[0], dtype=torch.float32)
    return out


def _check_pair(a: Target, b: Target) -> bool:
    """Whether the pair has masks; both or neither must."""
    if ("masks" in a) != ("masks" in b):
        raise ValueError("one sample has 'masks' and the other does not; mix samples of one dataset only")
    return "masks" in a


def _pad_masks(masks: Tensor, height: int, width: int) -> Tensor:
    """uint8 (M, h, w) -> (M, height, width), zero-padded bottom/right."""
    out = masks.new_zeros((masks.shape[0], height, width))
    out[:, : masks.shape[1], : masks.shape[2]] = masks
    return out


def _instances(target: Target, key: str) -> Tensor:
    """A per-instance tensor of ``target``: boxes (M, 4), others (M,); fills optional keys."""
    boxes = target["boxes"].reshape(-1, 4)
    value = target.get(key)
    if value is None:
        if key == "mix_weights":
            return torch.ones(boxes.shape[0], dtype=torch.float32)
        if key == "iscrowd":
            return torch.zeros(boxes.shape[0], dtype=torch.int64)
        if key == "area":
            return _box_area(boxes)
        raise KeyError(f"detection target has no {key!r}; targets need at least 'boxes' and 'labels'")
    return boxes if key == "boxes" else value.reshape(-1)


def mixup(a: Tuple[Tensor, Target], b: Tuple[Tensor, Target], lam: float) -> Tuple[Tensor, Target]:
    """MixUp two detection samples on a top-left aligned canvas (see the module docstring).

    ``a`` and ``b`` are ``(image (3, Ha, Wa), target)`` and ``(image (3, Hb, Wb), target)``;
    returns ``(image (3, max(Ha, Hb), max(Wa, Wb)), target)`` with ``Ma + Mb`` instances.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    (image_a, target_a), (image_b, target_b) = a, b
    has_masks = _check_pair(target_a, target_b)
    height = max(image_a.shape[1], image_b.shape[1])
    width = max(image_a.shape[2], image_b.shape[2])
    canvas = image_a.new_zeros((3, height, width))  # (3, H, W)
    canvas[:, : image_a.shape[1], : image_a.shape[2]] += lam * image_a
    canvas[:, : image_b.shape[1], : image_b.shape[2]] += (1.0 - lam) * image_b

    out: Target = dict(target_a)
    for key in ("boxes", "labels", "area", "iscrowd"):
        out[key] = torch.cat([_instances(target_a, key), _instances(target_b, key)])
    num_a, num_b = len(_instances(target_a, "labels")), len(_instances(target_b, "labels"))
    out["mix_weights"] = torch.cat(
        [
            _instances(target_a, "mix_weights") * lam,
            _instances(target_b, "mix_weights") * (1.0 - lam),
        ]
    ).reshape(num_a + num_b)
    if has_masks:
        out["masks"] = torch.cat(
            [_pad_masks(target_a["masks"], height, width), _pad_masks(target_b["masks"], height, width)]
        )  # (Ma + Mb, H, W)
    return canvas, out


def _box_area(boxes: Tensor) -> Tensor:
    """(M,) area of (M, 4) xyxy boxes (0 for empty boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _clip_to(boxes: Tensor, patch: Tuple[int, int, int, int]) -> Tensor:
    """(M, 4) boxes clipped to the patch (x0, y0, x1, y1); boxes outside become empty."""
    x0, y0, x1, y1 = patch
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(x0, x1)
    out[:, 1::2] = out[:, 1::2].clamp(y0, y1)
    return out


def cutmix(
    a: Tuple[Tensor, Target],
    b: Tuple[Tensor, Target],
    patch: Tuple[int, int, int, int],
    min_visible: float = 0.3,
) -> Tuple[Tensor, Target]:
    """Paste ``b``'s pixels inside ``patch`` = (x0, y0, x1, y1) (integer pixels, x1/y1 exclusive) into ``a``.

    The patch must lie inside both images.  Returns ``(image (3, Ha, Wa), target)``;
    the keep / drop / clip rule is in the module docstring.
    """
    (image_a, target_a), (image_b, target_b) = a, b
    has_masks = _check_pair(target_a, target_b)
    x0, y0, x1, y1 = (int(v) for v in patch)
    height_a, width_a = image_a.shape[1:]
    if not (0 <= x0 <= x1 <= min(width_a, image_b.shape[2]) and 0 <= y0 <= y1 <= min(height_a, image_b.shape[1])):
        raise ValueError(f"patch {patch} must lie inside both images ({tuple(image_a.shape)}, {tuple(image_b.shape)})")
    image = image_a.clone()
    image[:, y0:y1, x0:x1] = image_b[:, y0:y1, x0:x1]

    boxes_a, boxes_b = _instances(target_a, "boxes"), _instances(target_b, "boxes")
    area_a, area_b = _box_area(boxes_a), _box_area(boxes_b)
    covered_a = _box_area(_clip_to(boxes_a, (x0, y0, x1, y1)))  # (Ma,) box area under the patch
    visible_a = torch.where(area_a > 0, (area_a - covered_a) / area_a.clamp(min=1e-12), torch.zeros_like(area_a))
    keep_a = visible_a >= min_visible
    clipped_b = _clip_to(boxes_b, (x0, y0, x1, y1))
    visible_b = torch.where(area_b > 0, _box_area(clipped_b) / area_b.clamp(min=1e-12), torch.zeros_like(area_b))
    keep_b = visible_b >= min_visible

    out: Target = dict(target_a)
    out["boxes"] = torch.cat([boxes_a[keep_a], clipped_b[keep_b]])
    for key in ("labels", "iscrowd"):
        out[key] = torch.cat([_instances(target_a, key)[keep_a], _instances(target_b, key)[keep_b]])
    out["mix_weights"] = torch.cat(
        [
            (_instances(target_a, "mix_weights") * visible_a)[keep_a],
            (_instances(target_b, "mix_weights") * visible_b)[keep_b],
        ]
    ).float()
    if has_masks:
        masks_a = target_a["masks"][keep_a].clone()  # (Ma', Ha, Wa)
        masks_a[:, y0:y1, x0:x1] = 0
        masks_b = target_b["masks"].new_zeros((int(keep_b.sum()), height_a, width_a))
        masks_b[:, y0:y1, x0:x1] = target_b["masks"][keep_b][:, y0:y1, x0:x1]
        out["masks"] = torch.cat([masks_a, masks_b])  # (Ma' + Mb', Ha, Wa)
        out["area"] = out["masks"].flatten(1).sum(1).float()
    else:
        out["area"] = torch.cat(
            [
                (_instances(target_a, "area") * visible_a)[keep_a],
                (_instances(target_b, "area") * visible_b)[keep_b],
            ]
        ).float()
    return image, out


def _random_patch(rng: np.random.Generator, height: int, width: int, lam: float) -> Tuple[int, int, int, int]:
    """Yun et al.'s box: area ratio (1 - lam) of height x width, centre uniform, clipped."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(round(height * cut)), int(round(width * cut))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    return x0, y0, x1, y1


def _check_probability(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


class MixedDetectionDataset(torch.utils.data.Dataset):
    """Applies detection MixUp / CutMix on top of ``dataset``; see the module docstring.

    Args:
        dataset: returns ``(image float32 (3, H, W) in [0, 1], target)`` (e.g. CocoDetectionDataset).
        mixup_prob: probability that a sample is MixUp-ed with another random sample.
        mixup_alpha: ``lam ~ Beta(alpha, alpha)`` (1.5 as in Zhang et al. 2019).
        cutmix_prob: probability of CutMix instead; ``mixup_prob + cutmix_prob <= 1``.
        seed: base of the per-(epoch, index) random stream.
        cutmix_alpha: ``lam ~ Beta(alpha, alpha)`` for the CutMix patch (1.0 = uniform, as in Yun et al.).
        cutmix_min_visible: visible-area fraction below which a box is dropped (0.3).

    Attributes:
        dataset: the wrapped dataset (use it for ``image_labels()`` / ``num_classes``).
        epoch: the current epoch (:meth:`set_epoch`).
    """

    def __init__(
        self,
        dataset,
        mixup_prob: float = 0.0,
        mixup_alpha: float = 1.5,
        cutmix_prob: float = 0.0,
        seed: int = 0,
        cutmix_alpha: float = 1.0,
        cutmix_min_visible: float = 0.3,
    ) -> None:
        self.dataset = dataset
        self.mixup_prob = _check_probability("mixup_prob", mixup_prob)
        self.cutmix_prob = _check_probability("cutmix_prob", cutmix_prob)
        if self.mixup_prob + self.cutmix_prob > 1.0 + 1e-9:
            raise ValueError(
                f"mixup_prob + cutmix_prob = {self.mixup_prob + self.cutmix_prob} > 1; a sample gets at most "
                "one of the two, so lower one of them"
            )
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not (math.isfinite(alpha) and alpha > 0):
                raise ValueError(f"{name} must be a finite number > 0 (Beta(alpha, alpha)), got {alpha}")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.cutmix_min_visible = _check_probability("cutmix_min_visible", cutmix_min_visible)
        self.seed = checked_seed(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the random choices of sample ``i`` depend on (seed, epoch, i) only."""
        self.epoch = checked_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _partner(self, rng: np.random.Generator, index: int) -> int:
        n = len(self.dataset)
        if n < 2:
            return index
        return (index + 1 + int(rng.integers(n - 1))) % n  # any other index, uniformly

    def __getitem__(self, index: int) -> Tuple[Tensor, Target]:
        if index < 0:
            index += len(self)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        u = rng.random()
        image, target = self.dataset[index]
        if u < self.mixup_prob:
            other = self.dataset[self._partner(rng, index)]
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            return mixup((image, target), other, lam)
        if u < self.mixup_prob + self.cutmix_prob:
            other_image, other_target = self.dataset[self._partner(rng, index)]
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            height = min(image.shape[1], other_image.shape[1])
            width = min(image.shape[2], other_image.shape[2])
            patch = _random_patch(rng, height, width, lam)
            return cutmix((image, target), (other_image, other_target), patch, self.cutmix_min_visible)
        return image, _with_mix_weights(target)
