"""The embedded long-tailed synthetic dataset: coloured shapes in COCO / LVIS format.

densekd's demo, test and benchmark data.  Nothing is ever downloaded: a seeded
generator draws RGB images of simple shapes (square, circle, triangle, diamond,
plus, ring) in a few colours; each (shape, colour) pair is one category.  The
defaults (12 classes, 96 px images, 1-4 objects of 16-48 px, mild noise) are
learnable by small detectors in minutes on a CPU.

Long tail.  Class ``rank`` r (0 = most common) is given a target number of
TRAIN images from a Zipf law placed on a longer, LVIS-like vocabulary: the
classes sit at log-spaced Zipf ranks ``R_r = zipf_rank_of_rarest_class ** (r / (K - 1))``
and get ``head_class_image_fraction * num_train / R_r ** zipf_exponent`` images.
With the defaults that is 1500 images for the head class down to 5 for the
rarest, so the train split holds LVIS rare (<= 10 images), common (11-100) and
frequent (> 100) classes.  The VAL split is class-balanced (every class is in
the same number of val images) so that rare-class AP is measurable.
Frequency ranks are interleaved over shapes and colours, so category ids are not
sorted by frequency and each shape has one frequent and one rarer colour.

Generation happens in two steps that can be used separately:

* :func:`plan_split` decides, without drawing, which objects each image holds
  (class, position, size, drawing order); cheap even for the full split.
* :func:`render_image` draws one planned image and returns its pixels and the
  visible mask of every object.

Occlusion.  Later-drawn objects occlude earlier ones.  Planning keeps the sum of
box intersections with later objects at most ``max_occluded_fraction`` (0.25) of
an object's box, so at least half of every shape stays visible.  Annotations
describe the VISIBLE region: the mask is the visible mask (COCO RLE), the box the
tight box of that mask (COCO ``xywh``, floats), ``area`` its pixel count.

Layout written by :func:`generate_synthetic_dataset`::

    <dir>/train/000001.png ...            RGB PNG, image_size x image_size
    <dir>/val/000001.png ...
    <dir>/annotations/instances_train.json
    <dir>/annotations/instances_val.json
    <dir>/config.json                     the SyntheticConfig that made it

:func:`ensure_synthetic_dataset` caches that layout under
``<root>/<hash of config>/`` and writes it atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from densekd._cache import cache_root

from .long_tail import lvis_frequency

__all__ = [
    "SHAPE_RASTERIZERS",
    "SyntheticConfig",
    "SyntheticPaths",
    "PlannedObject",
    "PlannedImage",
    "SPLITS",
    "category_table",
    "train_image_targets",
    "val_image_targets",
    "lvis_frequency",
    "plan_split",
    "count_images_per_category",
    "render_image",
    "generate_synthetic_dataset",
    "ensure_synthetic_dataset",
    "default_synthetic_root",
    "config_hash",
]

# Bump when the generator's output for a given config changes: it invalidates caches.
GENERATOR_VERSION = 1

SPLITS = ("train", "val")
_SPLIT_STREAM = {"train": 0, "val": 1}
_PLAN_STREAM = 0
_RENDER_STREAM = 1

# --------------------------------------------------------------------------- shapes
# Each rasterizer gets pixel-centre coordinates u, v in (-0.5, 0.5) of the object's
# square box (u to the right, v downwards) and returns a bool mask of the shape.
def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.ones(np.broadcast(u, v).shape, dtype=bool)


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 0.25


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # apex at the top centre, base along the bottom edge
    return np.abs(u) <= (v + 0.5) / 2.0


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u) + np.abs(v) <= 0.5


def _plus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= 1.0 / 6.0) | (np.abs(v) <= 1.0 / 6.0)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 0.25) & (r2 >= 0.0625)


SHAPE_RASTERIZERS: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "square": _square,
    "circle": _circle,
    "triangle": _triangle,
    "diamond": _diamond,
    "plus": _plus,
    "ring": _ring,
}

DEFAULT_COLOURS: Tuple[Tuple[str, Tuple[int, int, int]], ...] = (
    ("red", (210, 45, 45)),
    ("blue", (45, 90, 215)),
)


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the synthetic dataset.  Categories are ``shapes x colours``.

    Category ids are ``1..K`` in shape-major order: ``id = shape_index * len(colours)
    + colour_index + 1``, named ``"<colour>_<shape>"``.
    """

    image_size: int = 96
    num_train: int = 2000
    num_val: int = 300
    min_objects_per_image: int = 1
    max_objects_per_image: int = 4
    min_object_size: int = 16
    max_object_size: int = 48
    shapes: Tuple[str, ...] = ("square", "circle", "triangle", "diamond", "plus", "ring")
    colours: Tuple[Tuple[str, Tuple[int, int, int]], ...] = DEFAULT_COLOURS
    # long tail (train split): images of rank-r class = fraction * num_train / R_r ** s
    zipf_exponent: float = 1.0
    head_class_image_fraction: float = 0.75
    zipf_rank_of_rarest_class: float = 300.0
    # look
    pixel_noise_sigma: float = 6.0
    background_amplitude: float = 15.0
    background_grid: int = 4
    background_grey_range: Tuple[float, float] = (90.0, 160.0)
    background_tint_sigma: float = 8.0
    colour_jitter_sigma: float = 12.0
    # occlusion: later objects may cover at most this fraction of an earlier object's box
    allow_occlusion: bool = True
    max_occluded_fraction: float = 0.25
    placement_attempts: int = 100
    # LVIS negatives: up to this many absent categories listed per image
    num_negative_categories: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        # JSON / YAML round trips give lists; store tuples so the config stays hashable.
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(
            self, "colours", tuple((str(name), tuple(int(c) for c in rgb)) for name, rgb in self.colours)
        )
        object.__setattr__(self, "background_grey_range", tuple(float(g) for g in self.background_grey_range))
        self._validate()

    @property
    def num_classes(self) -> int:
        return len(self.shapes) * len(self.colours)

    def _validate(self) -> None:
        problems = []
        unknown = [s for s in self.shapes if s not in SHAPE_RASTERIZERS]
        if unknown:
            problems.append(f"unknown shapes {unknown}; choose from {sorted(SHAPE_RASTERIZERS)}")
        if len(set(self.shapes)) != len(self.shapes) or not self.shapes:
            problems.append(f"shapes must be a non-empty list without repeats, got {list(self.shapes)}")
        names = [name for name, _ in self.colours]
        if len(set(names)) != len(names) or not names:
            problems.append(f"colour names must be non-empty and unique, got {names}")
        if any(len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb) for _, rgb in self.colours):
            problems.append("each colour must be (name, (r, g, b)) with 0 <= r, g, b <= 255")
        if not 1 <= self.min_objects_per_image <= self.max_objects_per_image:
            problems.append(
                "need 1 <= min_objects_per_image <= max_objects_per_image, got "
                f"{self.min_objects_per_image}, {self.max_objects_per_image}"
            )
        if not 4 <= self.min_object_size <= self.max_object_size <= self.image_size:
            problems.append(
                "need 4 <= min_object_size <= max_object_size <= image_size, got "
                f"{self.min_object_size}, {self.max_object_size}, {self.image_size}"
            )
        if self.num_train < 1 or self.num_val < 1:
            problems.append(f"num_train and num_val must be >= 1, got {self.num_train}, {self.num_val}")
        if not 0.0 < self.head_class_image_fraction <= 1.0:
            problems.append(f"head_class_image_fraction must be in (0, 1], got {self.head_class_image_fraction}")
        if self.zipf_rank_of_rarest_class < 1.0 or self.zipf_exponent < 0.0:
            problems.append("need zipf_rank_of_rarest_class >= 1 and zipf_exponent >= 0")
        if not 0.0 <= self.max_occluded_fraction < 1.0:
            problems.append(f"max_occluded_fraction must be in [0, 1), got {self.max_occluded_fraction}")
        if self.background_grid < 2:
            problems.append(f"background_grid must be >= 2, got {self.background_grid}")
        if problems:
            raise ValueError("invalid SyntheticConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated dataset lives; pass these to ``CocoDetectionDataset``."""

    root: Path
    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path

    @classmethod
    def under(cls, root: Path) -> "SyntheticPaths":
        return cls(
            root=root,
            train_images=root / "train",
            train_ann=root / "annotations" / "instances_train.json",
            val_images=root / "val",
            val_ann=root / "annotations" / "instances_val.json",
        )


@dataclass(frozen=True)
class PlannedObject:
    """One object to draw: its category and its full (unoccluded) square box."""

    category_id: int  # 1..K
    x: int  # left edge, pixels
    y: int  # top edge, pixels
    size: int  # side of the square box, pixels


@dataclass(frozen=True)
class PlannedImage:
    """One image to draw; ``objects`` are in drawing order (later ones occlude earlier)."""

    image_id: int  # 1..N within the split
    index: int  # 0..N-1, selects the image's render random stream
    objects: Tuple[PlannedObject, ...]
    neg_category_ids: Tuple[int, ...] = field(default=())

    @property
    def file_name(self) -> str:
        return f"{self.image_id:06d}.png"

    @property
    def category_ids(self) -> List[int]:
        """Distinct categories in the image, sorted."""
        return sorted({o.category_id for o in self.objects})


# --------------------------------------------------------------------------- categories
def _category_id(config: SyntheticConfig, shape_index: int, colour_index: int) -> int:
    return shape_index * len(config.colours) + colour_index + 1


def _category_ids_by_frequency_rank(config: SyntheticConfig) -> List[int]:
    """Category ids from most to least frequent, interleaved over shapes and colours.

    Round c visits every shape once, in colour ``(shape + c) % num_colours``, so the
    frequent half and the rare half each cover all shapes and alternate colours.
    """
    num_colours = len(config.colours)
    return [
        _category_id(config, shape, (shape + round_) % num_colours)
        for round_ in range(num_colours)
        for shape in range(len(config.shapes))
    ]


def category_table(config: SyntheticConfig) -> List[dict]:
    """``[{"id", "name", "shape", "colour", "rgb"}]`` for ids 1..K in id order."""
    table = []
    for shape_index, shape in enumerate(config.shapes):
        for colour_index, (colour, rgb) in enumerate(config.colours):
            table.append(
                {
                    "id": _category_id(config, shape_index, colour_index),
                    "name": f"{colour}_{shape}",
                    "shape": shape,
                    "colour": colour,
                    "rgb": rgb,
                }
            )
    return table


def train_image_targets(config: SyntheticConfig) -> Dict[int, int]:
    """Number of TRAIN images each category id must appear in (the long tail)."""
    ranked = _category_ids_by_frequency_rank(config)
    last = max(len(ranked) - 1, 1)
    head = config.head_class_image_fraction * config.num_train
    targets = {}
    for rank, category_id in enumerate(ranked):
        zipf_rank = config.zipf_rank_of_rarest_class ** (rank / last)
        count = int(round(head / zipf_rank**config.zipf_exponent))
        targets[category_id] = min(max(count, 1), config.num_train)
    return targets


def val_image_targets(config: SyntheticConfig) -> Dict[int, int]:
    """Class-balanced: every category in the same number of VAL images.

    That number keeps the train split's mean number of distinct classes per image.
    """
    classes_per_image = sum(train_image_targets(config).values()) / config.num_train
    per_class = int(round(config.num_val * classes_per_image / config.num_classes))
    per_class = min(max(per_class, 1), config.num_val)
    return {c["id"]: per_class for c in category_table(config)}


# --------------------------------------------------------------------------- planning
def _split_rng(config: SyntheticConfig, split: str, *stream: int) -> np.random.Generator:
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    return np.random.default_rng([config.seed, _SPLIT_STREAM[split], *stream])


def _assign_categories(
    targets: Dict[int, int], num_objects: np.ndarray, max_objects: int, rng: np.random.Generator
) -> List[List[int]]:
    """Distinct categories per image so that category c is in exactly ``targets[c]`` images.

    Every image gets one "primary" category (categories share the primaries in
    proportion to their targets); the remaining appearances go to random images
    that lack the category and still have room, weighted by free room.  An image
    may grow past its drawn object count (up to ``max_objects``) when needed.
    """
    num_images = len(num_objects)
    ids = sorted(targets)
    counts = np.array([targets[c] for c in ids], dtype=np.int64)
    total = int(counts.sum())
    if total < num_images:
        raise ValueError(
            f"the class targets give only {total} (image, class) pairs for {num_images} images, "
            "so some images would be empty; raise head_class_image_fraction or lower "
            "zipf_rank_of_rarest_class / zipf_exponent"
        )
    if total > num_images * max_objects:
        raise ValueError(
            f"the class targets need {total} (image, class) pairs but {num_images} images hold at most "
            f"{num_images * max_objects}; raise max_objects_per_image or the number of images "
            "(num_train / num_val), or lower head_class_image_fraction"
        )
    # largest-remainder split of the num_images primaries
    share = counts * num_images / total
    primaries = np.floor(share).astype(np.int64)
    leftover = num_images - int(primaries.sum())
    primaries[np.argsort(-(share - primaries), kind="stable")[:leftover]] += 1
    primary_of_image = rng.permutation(np.repeat(np.arange(len(ids)), primaries))

    present = np.zeros((num_images, len(ids)), dtype=bool)
    present[np.arange(num_images), primary_of_image] = True
    capacity = num_objects.astype(np.int64).copy()
    remaining = counts - primaries
    for k in np.argsort(-remaining, kind="stable"):
        need = int(remaining[k])
        if need == 0:
            continue
        used = present.sum(axis=1)
        free = np.flatnonzero(~present[:, k] & (used < capacity))
        if len(free) >= need:
            room = (capacity[free] - used[free]).astype(np.float64)
            chosen = rng.choice(free, size=need, replace=False, p=room / room.sum())
        else:
            growable = np.flatnonzero(~present[:, k] & (used >= capacity) & (used < max_objects))
            if len(free) + len(growable) < need:
                raise ValueError(
                    f"cannot place category {ids[k]} in {int(counts[k])} distinct images; "
                    "raise max_objects_per_image or num images, or flatten the long tail"
                )
            grown = rng.choice(growable, size=need - len(free), replace=False)
            capacity[grown] += 1
            chosen = np.concatenate([free, grown])
        present[chosen, k] = True
    return [[ids[k] for k in np.flatnonzero(row)] for row in present]


def _covered_area(a: Tuple[int, int, int], b: Tuple[int, int, int]) -> int:
    """Intersection area of two square boxes given as (x, y, size)."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def _place_boxes(config: SyntheticConfig, count: int, rng: np.random.Generator) -> List[Tuple[int, int, int]]:
    """Square boxes (x, y, size) in drawing order with bounded occlusion of earlier boxes."""
    limit = config.max_occluded_fraction if config.allow_occlusion else 0.0
    boxes: List[Tuple[int, int, int]] = []
    covered: List[int] = []
    for _ in range(count):
        for attempt in range(config.placement_attempts):
            # shrink the largest allowed size as attempts fail, so crowded images still fit
            shrink = attempt / config.placement_attempts
            largest = config.max_object_size - int(shrink * (config.max_object_size - config.min_object_size))
            size = int(rng.integers(config.min_object_size, largest + 1))
            x = int(rng.integers(0, config.image_size - size + 1))
            y = int(rng.integers(0, config.image_size - size + 1))
            new_cover = [_covered_area(old, (x, y, size)) for old in boxes]
            if all(c + n <= limit * old[2] ** 2 for old, c, n in zip(boxes, covered, new_cover)):
                break
        else:
            raise RuntimeError(
                f"could not place {count} objects in a {config.image_size}px image within "
                f"{config.placement_attempts} attempts; lower max_objects_per_image or object sizes, "
                "raise image_size or max_occluded_fraction"
            )
        covered = [c + n for c, n in zip(covered, new_cover)] + [0]
        boxes.append((x, y, size))
    return boxes


def plan_split(
    config: SyntheticConfig, split: str, rng: Optional[np.random.Generator] = None
) -> List[PlannedImage]:
    """Decide every object of every image of ``split`` ("train" or "val") without drawing.

    ``rng`` defaults to the split's own stream derived from ``config.seed``; the
    generator always uses that default, so pass one only for experiments.
    """
    rng = _split_rng(config, split, _PLAN_STREAM) if rng is None else rng
    targets = train_image_targets(config) if split == "train" else val_image_targets(config)
    num_images = config.num_train if split == "train" else config.num_val
    num_objects = rng.integers(config.min_objects_per_image, config.max_objects_per_image + 1, size=num_images)
    distinct = _assign_categories(targets, num_objects, config.max_objects_per_image, rng)
    all_ids = np.array(sorted(targets))

    images = []
    for index, categories in enumerate(distinct):
        extra = max(int(num_objects[index]) - len(categories), 0)
        duplicates = [int(c) for c in rng.choice(categories, size=extra)] if extra else []
        drawing_order = [int(c) for c in rng.permutation(categories + duplicates)]
        boxes = _place_boxes(config, len(drawing_order), rng)
        absent = all_ids[~np.isin(all_ids, categories)]
        num_neg = min(config.num_negative_categories, len(absent))
        negatives = tuple(sorted(int(c) for c in rng.choice(absent, size=num_neg, replace=False)))
        objects = tuple(PlannedObject(c, x, y, s) for c, (x, y, s) in zip(drawing_order, boxes))
        images.append(PlannedImage(image_id=index + 1, index=index, objects=objects, neg_category_ids=negatives))
    return images


def count_images_per_category(images: Sequence[PlannedImage], category_ids: Sequence[int]) -> Dict[int, int]:
    """``{category_id: number of images containing it}`` for a planned split."""
    counts = {c: 0 for c in category_ids}
    for image in images:
        for c in image.category_ids:
            counts[c] += 1
    return counts


def _count_instances_per_category(images: Sequence[PlannedImage], category_ids: Sequence[int]) -> Dict[int, int]:
    counts = {c: 0 for c in category_ids}
    for image in images:
        for obj in image.objects:
            counts[obj.category_id] += 1
    return counts


# --------------------------------------------------------------------------- rendering
def _smooth_field(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency background variation, shape (H, W, 3), values within +-amplitude."""
    g, n = config.background_grid, config.image_size
    coarse = rng.uniform(-1.0, 1.0, size=(3, g, g)) * config.background_amplitude
    positions = np.linspace(0.0, g - 1.0, n)
    weights = np.maximum(0.0, 1.0 - np.abs(positions[:, None] - np.arange(g)[None, :]))  # (n, g) bilinear
    return (weights @ coarse @ weights.T).transpose(1, 2, 0)  # (3, n, n) -> (n, n, 3)


def _shape_patch(shape: str, size: int) -> np.ndarray:
    centres = (np.arange(size) + 0.5) / size - 0.5
    return SHAPE_RASTERIZERS[shape](centres[None, :], centres[:, None])  # (size, size): rows = v, cols = u


def render_image(
    config: SyntheticConfig, planned: PlannedImage, rng: np.random.Generator
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Draw one planned image.

    Returns ``(image, visible_masks)``: image uint8 (H, W, 3); one bool (H, W) mask per
    planned object, in drawing order, holding only the pixels no later object covers.
    """
    n = config.image_size
    categories = {c["id"]: c for c in category_table(config)}
    grey = rng.uniform(*config.background_grey_range)
    base = grey + rng.normal(0.0, config.background_tint_sigma, size=3)
    canvas = base[None, None, :] + _smooth_field(config, rng)

    full_masks = []
    for obj in planned.objects:
        category = categories[obj.category_id]
        colour = np.asarray(category["rgb"], dtype=np.float64) + rng.normal(0.0, config.colour_jitter_sigma, size=3)
        mask = np.zeros((n, n), dtype=bool)
        mask[obj.y : obj.y + obj.size, obj.x : obj.x + obj.size] = _shape_patch(category["shape"], obj.size)
        canvas[mask] = colour
        full_masks.append(mask)

    canvas += rng.normal(0.0, config.pixel_noise_sigma, size=canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    visible_masks: List[np.ndarray] = [np.zeros(0)] * len(full_masks)
    covered = np.zeros((n, n), dtype=bool)
    for i in range(len(full_masks) - 1, -1, -1):
        visible_masks[i] = full_masks[i] & ~covered
        covered |= full_masks[i]
    return image, visible_masks


def _mask_annotation(mask: np.ndarray) -> dict:
    """COCO fields of one visible mask: RLE segmentation, tight xywh bbox, pixel area."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        raise RuntimeError("an object is fully occluded; this is a densekd bug in occlusion planning")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    bbox = [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
    return {"segmentation": rle, "bbox": bbox, "area": float(mask.sum()), "iscrowd": 0}


# --------------------------------------------------------------------------- writing
def _categories_json(config: SyntheticConfig, train_plan: Sequence[PlannedImage]) -> List[dict]:
    """LVIS-style categories; counts and frequency describe the TRAIN split (as in LVIS)."""
    table = category_table(config)
    ids = [c["id"] for c in table]
    image_counts = count_images_per_category(train_plan, ids)
    instance_counts = _count_instances_per_category(train_plan, ids)
    return [
        {
            "id": c["id"],
            "name": c["name"],
            "supercategory": c["shape"],
            "frequency": lvis_frequency(image_counts[c["id"]]),
            "image_count": image_counts[c["id"]],
            "instance_count": instance_counts[c["id"]],
        }
        for c in table
    ]


def _write_split(
    config: SyntheticConfig, split: str, plan: Sequence[PlannedImage], categories: List[dict], paths: SyntheticPaths
) -> None:
    image_dir = paths.train_images if split == "train" else paths.val_images
    ann_file = paths.train_ann if split == "train" else paths.val_ann
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for planned in plan:
        pixels, masks = render_image(config, planned, _split_rng(config, split, _RENDER_STREAM, planned.index))
        Image.fromarray(pixels).save(image_dir / planned.file_name, compress_level=1)
        images.append(
            {
                "id": planned.image_id,
                "file_name": planned.file_name,
                "width": config.image_size,
                "height": config.image_size,
                "neg_category_ids": list(planned.neg_category_ids),
                "not_exhaustive_category_ids": [],
            }
        )
        for obj, mask in zip(planned.objects, masks):
            annotation = {"id": len(annotations) + 1, "image_id": planned.image_id, "category_id": obj.category_id}
            annotation.update(_mask_annotation(mask))
            annotations.append(annotation)

    document = {
        "info": {
            "description": f"densekd synthetic long-tailed shapes, {split} split",
            "version": str(GENERATOR_VERSION),
            "config": dataclasses.asdict(config),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    ann_file.write_text(json.dumps(document, separators=(",", ":")))


def generate_synthetic_dataset(output_dir: Union[str, Path], config: Optional[SyntheticConfig] = None) -> SyntheticPaths:
    """Write the full dataset into ``output_dir`` (not atomic; see :func:`ensure_synthetic_dataset`)."""
    config = SyntheticConfig() if config is None else config
    paths = SyntheticPaths.under(Path(output_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    train_plan = plan_split(config, "train")
    categories = _categories_json(config, train_plan)
    _write_split(config, "train", train_plan, categories, paths)
    _write_split(config, "val", plan_split(config, "val"), categories, paths)
    (paths.root / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return paths


def config_hash(config: SyntheticConfig) -> str:
    """Short stable hash of the config and generator version: the cache folder name."""
    payload = json.dumps({"generator_version": GENERATOR_VERSION, **dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def default_synthetic_root() -> Path:
    """``$DENSEKD_CACHE/synthetic`` if ``DENSEKD_CACHE`` is set, else ``~/.cache/densekd/synthetic``."""
    return cache_root() / "synthetic"


def ensure_synthetic_dataset(
    root: Union[str, Path, None] = None, config: Optional[SyntheticConfig] = None
) -> SyntheticPaths:
    """Return the dataset for ``config`` under ``root/<config hash>/``, generating it if absent.

    Generation writes into a hidden temporary folder next to the target and renames
    it into place only when complete, so an interrupted run never leaves a folder
    that a later call would take for a finished dataset.
    """
    config = SyntheticConfig() if config is None else config
    root = default_synthetic_root() if root is None else Path(root).expanduser()
    target = root / config_hash(config)
    if target.is_dir():
        return SyntheticPaths.under(target)

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root))
    try:
        generate_synthetic_dataset(staging, config)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not a concurrent writer finishing first: a real error
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SyntheticPaths.under(target)
