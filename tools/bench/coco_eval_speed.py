"""pycocotools vs faster-coco-eval on the same detections: same numbers, how much faster.

The ground truth is the val split of densekd's embedded synthetic dataset (generated once
into ``$DENSEKD_CACHE``). The detections are made from that ground truth with seeded noise,
so that AP is neither 0 nor 1 and every code path of the evaluators runs: per ground-truth
box a few jittered copies (some with a wrong category), plus false positives scattered over
the image, with random scores.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any

import numpy as np

from densekd.data.synthetic import SyntheticConfig, ensure_synthetic_dataset
from densekd.evaluation import BACKENDS, COCO_METRIC_NAMES, evaluate_coco

COPIES_PER_OBJECT = 3
WRONG_CATEGORY_RATE = 0.2


def noisy_detections(gt: dict, detections_per_image: int, seed: int) -> list[dict[str, Any]]:
    """COCO result records near the ground truth: ``detections_per_image`` on average."""
    rng = np.random.default_rng(seed)
    category_ids = [c["id"] for c in gt["categories"]]
    by_image: dict[int, list[dict]] = {image["id"]: [] for image in gt["images"]}
    for annotation in gt["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    sizes = {image["id"]: (image["width"], image["height"]) for image in gt["images"]}
    records = []
    for image_id, objects in by_image.items():
        width, height = sizes[image_id]
        for annotation in objects:
            x, y, w, h = annotation["bbox"]
            for _ in range(COPIES_PER_OBJECT):
                dx, dy, dw, dh = rng.normal(0.0, 0.12, 4) * [w, h, w, h]
                wrong = rng.random() < WRONG_CATEGORY_RATE
                records.append({
                    "image_id": image_id,
                    "category_id": int(rng.choice(category_ids)) if wrong else annotation["category_id"],
                    "bbox": [float(x + dx), float(y + dy), float(max(1.0, w + dw)), float(max(1.0, h + dh))],
                    "score": float(rng.uniform(0.3, 1.0)),
                })  # fmt: skip
        for _ in range(max(0, detections_per_image - COPIES_PER_OBJECT * len(objects))):
            w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            records.append({
                "image_id": image_id,
                "category_id": int(rng.choice(category_ids)),
                "bbox": [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), float(w), float(h)],
                "score": float(rng.uniform(0.05, 0.6)),
            })  # fmt: skip
    return records


def _difference(a: float, b: float) -> float:
    """|a - b|; 0 when both are undefined (nan), inf when only one is."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b)


def measure(num_val: int, detections_per_image: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Median wall time of evaluate_coco per backend (runs interleaved) and their metrics."""
    paths = ensure_synthetic_dataset(config=SyntheticConfig(num_train=40, num_val=num_val))
    gt = json.loads(paths.val_ann.read_text())
    records = noisy_detections(gt, detections_per_image, seed)
    seconds: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
    metrics: dict[str, dict] = {}
    for _ in range(repeats):
        for backend in BACKENDS:
            start = time.perf_counter()
            metrics[backend] = evaluate_coco(gt, records, backend=backend)
            seconds[backend].append(time.perf_counter() - start)
    pyco, fast = (metrics[b] for b in BACKENDS)
    differences = [_difference(pyco[name], fast[name]) for name in COCO_METRIC_NAMES]
    return {
        "ground_truth": f"synthetic val split, {len(gt['images'])} images, {len(gt['annotations'])} objects",
        "images": len(gt["images"]),
        "detections": len(records),
        "repeats": repeats,
        "backends": {
            backend: {
                "seconds": statistics.median(seconds[backend]),
                "metrics": {name: metrics[backend][name] for name in COCO_METRIC_NAMES},
            }
            for backend in BACKENDS
        },
        "max_abs_difference": max(differences),
        "ap_difference": pyco["AP"] - fast["AP"],
        "speedup": statistics.median(seconds["pycocotools"]) / statistics.median(seconds["faster_coco_eval"]),
    }
