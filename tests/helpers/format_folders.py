"""Tiny YOLO and Pascal VOC dataset folders written into a test's folder, with the COCO boxes
they convert to (worked out by hand in the comments).

``tiny_yolo(root)``: classes cat (0), dog (1) in data.yaml::

    images/train/a.png  64x32  labels a.txt  0 0.5 0.5 0.25 0.5     -> cat [24, 8, 16, 16]
                                             1 0.75 0.25 0.25 0.25  -> dog [40, 4, 16, 8]
    images/train/b.png  32x48  labels b.txt  1 0.25 0.25 0.5 0.5    -> dog [0, 0, 16, 24]
    images/train/c.png  40x40  no label file                        -> no objects
    images/train/d.png  48x48  empty label file                     -> no objects
    images/val/e.png    32x32  labels e.txt  0 0.5 0.5 0.5 0.5      -> cat [8, 8, 16, 16]

``tiny_voc(root)``: train = img1, img2, img3; val = img4; classes found in train: bird, cat, dog::

    img1.jpg 64x48  cat  xmin 5  ymin 9  xmax 20 ymax 24            -> [4, 8, 16, 16]
                    dog  xmin 31 ymin 1  xmax 50 ymax 10 difficult  -> [30, 0, 20, 10], iscrowd 1
    img2.jpg 32x32  dog  xmin 1  ymin 1  xmax 32 ymax 32            -> [0, 0, 32, 32] (the whole image)
    img3.jpg 40x32  bird xmin 11 ymin 11 xmax 20 ymax 30            -> [10, 10, 10, 20]
    img4.jpg 32x32  cat  xmin 3  ymin 3  xmax 18 ymax 18            -> [2, 2, 16, 16]

Pixel values are all 128: the tests read sizes and boxes, not pixels (JPEG stays exact).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

# (file, width, height, label file text or None for no label file) per split
YOLO_IMAGES: Dict[str, List[Tuple[str, int, int, object]]] = {
    "train": [
        ("a.png", 64, 32, "0 0.5 0.5 0.25 0.5\n1 0.75 0.25 0.25 0.25\n"),
        ("b.png", 32, 48, "1 0.25 0.25 0.5 0.5\n"),
        ("c.png", 40, 40, None),
        ("d.png", 48, 48, ""),
    ],
    "val": [("e.png", 32, 32, "0 0.5 0.5 0.5 0.5\n")],
}
YOLO_NAMES = ["cat", "dog"]
# COCO (file, category id, bbox) of each box, in file order
YOLO_BOXES = {
    "train": [("a.png", 1, [24, 8, 16, 16]), ("a.png", 2, [40, 4, 16, 8]), ("b.png", 2, [0, 0, 16, 24])],
    "val": [("e.png", 1, [8, 8, 16, 16])],
}

# id -> (width, height, [(name, xmin, ymin, xmax, ymax, difficult), ...])
VOC_IMAGES = {
    "img1": (64, 48, [("cat", 5, 9, 20, 24, 0), ("dog", 31, 1, 50, 10, 1)]),
    "img2": (32, 32, [("dog", 1, 1, 32, 32, 0)]),
    "img3": (40, 32, [("bird", 11, 11, 20, 30, 0)]),
    "img4": (32, 32, [("cat", 3, 3, 18, 18, 0)]),
}
VOC_SPLITS = {"train": ["img1", "img2", "img3"], "val": ["img4"]}
VOC_NAMES = ["bird", "cat", "dog"]  # sorted names of the train split
# COCO (file, category id, bbox, iscrowd) of each box, in split order
VOC_BOXES = {
    "train": [("img1.jpg", 2, [4, 8, 16, 16], 0), ("img1.jpg", 3, [30, 0, 20, 10], 1),
              ("img2.jpg", 3, [0, 0, 32, 32], 0), ("img3.jpg", 1, [10, 10, 10, 20], 0)],
    "val": [("img4.jpg", 2, [2, 2, 16, 16], 0)],
}  # fmt: skip


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)


def tiny_yolo(root: Path) -> Path:
    """The YOLO dataset above under ``root`` (data.yaml also has nc, path, train and val keys)."""
    for split, images in YOLO_IMAGES.items():
        for name, width, height, labels in images:
            _image(root / "images" / split / name, width, height)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            if labels is not None:
                (root / "labels" / split / name).with_suffix(".txt").write_text(labels)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnc: 2\nnames: [cat, dog]\n")
    return root


def voc_xml(image_id: str, width: int, height: int, objects) -> str:
    """The annotation XML of one image; ``objects`` as in :data:`VOC_IMAGES`."""
    parts = [f"<annotation><folder>VOC</folder><filename>{image_id}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]  # fmt: skip
    for name, xmin, ymin, xmax, ymax, difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")  # fmt: skip
    return "\n".join(parts + ["</annotation>"])


def tiny_voc(root: Path) -> Path:
    """The VOC dataset above under ``root``."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, (width, height, objects) in VOC_IMAGES.items():
        _image(root / "JPEGImages" / f"{image_id}.jpg", width, height)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, width, height, objects))
    for split, ids in VOC_SPLITS.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
