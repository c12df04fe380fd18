"""Tiny valid COCO datasets written into a test's folder, for tests to break one thing at a time.

``tiny_coco(tmp_path)`` writes three 32 px RGB images and an annotation file:

    image 1  a.png  annotations 1 (category 1, polygon) and 2 (category 2, RLE)
    image 2  b.png  annotation 3 (category 1, polygon) and crowd annotation 4 (category 2, RLE)
    image 3  c.png  no annotations

A test edits ``fixture.document`` (or an image file) and calls ``fixture.write()``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SIZE = 32


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def _square(top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[top : top + side, left : left + side] = 1
    return mask


@dataclass
class Fixture:
    image_dir: Path
    annotation_file: Path
    document: dict

    def write(self) -> "Fixture":
        self.annotation_file.write_text(json.dumps(self.document))
        return self

    def image(self, image_id: int) -> dict:
        return next(r for r in self.document["images"] if r["id"] == image_id)

    def annotation(self, annotation_id: int) -> dict:
        return next(r for r in self.document["annotations"] if r["id"] == annotation_id)

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.image(image_id)["file_name"]


def tiny_coco(tmp_path: Path) -> Fixture:
    image_dir = tmp_path / "images"
    image_dir.mkdir(parents=True)
    images = []
    for image_id, (name, value) in enumerate((("a.png", 40), ("b.png", 120), ("c.png", 200)), start=1):
        Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(image_dir / name)
        images.append({"id": image_id, "file_name": name, "width": SIZE, "height": SIZE})
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [16, 16, 8, 8], "area": 64, "iscrowd": 0,
         "segmentation": rle(_square(16, 16, 8))},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [4, 6, 12, 6], "area": 72, "iscrowd": 0,
         "segmentation": [[4, 6, 16, 6, 16, 12, 4, 12]]},
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [20, 20, 10, 10], "area": 100, "iscrowd": 1,
         "segmentation": rle(_square(20, 20, 10))},
    ]  # fmt: skip
    categories = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}]
    document = {"images": images, "annotations": annotations, "categories": categories}
    return Fixture(image_dir, tmp_path / "instances.json", document).write()
