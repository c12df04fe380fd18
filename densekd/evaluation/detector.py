"""Score a detector over a data loader with COCO and LVIS-style metrics."""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .coco_metrics import evaluate_coco, evaluate_lvis_style
from .detections import to_coco_results

COCO_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_COLUMNS = ("APr", "APc", "APf")


def evaluate(
    model: nn.Module, data_loader, dataset, category_frequency: Optional[Mapping[int, str]] = None
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Detect on every image of ``data_loader`` and score with COCO and LVIS-style metrics.

    Args:
        model: a detector returning torchvision detections (``boxes``, ``scores``, ``labels``
            with labels 1..K) in eval mode.
        data_loader: yields ``(images, targets)``; each target carries ``image_id``.
        dataset: a :class:`~densekd.data.CocoDetectionDataset` (``coco``, ``label_to_category_id``).
        category_frequency: category id -> LVIS group for APr / APc / APf, normally the training
            split's ``lvis_frequencies()``. Default: the file's ``frequency``; when the file has
            none either (plain COCO), APr / APc / APf are nan.

    Returns:
        ``(metrics, results, images_per_second)``: ``metrics`` holds AP, AP50, AP75, APs, APm,
        APl (pycocotools) and APr, APc, APf (LVIS-style), fractions in [0, 1], plus
        ``dropped_detections``: detections whose label has no category (e.g. an unused
        background channel), left out of the results; ``results`` the COCO result records;
        ``images_per_second`` the model's throughput (forward passes only).
    """
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    known = set(dataset.label_to_category_id)
    dropped = 0
    images_seen, model_seconds = 0, 0.0
    with torch.inference_mode():
        for images, targets in data_loader:
            start = time.perf_counter()
            predictions = model(images)
            model_seconds += time.perf_counter() - start
            images_seen += len(images)
            kept = []
            for prediction in predictions:
                valid = torch.tensor([int(label) in known for label in prediction["labels"]], dtype=torch.bool)
                dropped += int((~valid).sum())
                kept.append({key: prediction[key][valid] for key in ("boxes", "scores", "labels")})
            results += to_coco_results(kept, [t["image_id"] for t in targets], dataset.label_to_category_id)
    model.train(was_training)
    coco = evaluate_coco(dataset.coco, results)
    metrics: dict[str, Any] = {name: coco[name] for name in COCO_COLUMNS}
    if category_frequency is None and dataset.frequency_groups is None:
        metrics.update({name: math.nan for name in LVIS_COLUMNS})  # no groups to split by
    else:
        lvis = evaluate_lvis_style(dataset.coco.dataset, results, category_frequency=category_frequency)
        metrics.update({name: lvis[name] for name in LVIS_COLUMNS})
    metrics["dropped_detections"] = dropped
    metrics["per_class_ap"] = coco["per_class_ap"]  # category id -> AP (COCO .50:.95)
    return metrics, results, images_seen / max(model_seconds, 1e-9)
