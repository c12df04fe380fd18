"""Per-class detection diagnostics: does the model score a class at all, and where it does not,
what does it call that class's boxes instead?

AP says *that* a class failed; this says *how*. A class whose top score is as high in images
without it as in images with it has no signal left; a class with no detections at all sits below
the model's score threshold everywhere; a class whose boxes are found under another label is
confused with a lookalike. Computed from the COCO result records that evaluation already made, so
it works for every detector family.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torchvision.ops import box_convert, box_iou

__all__ = ["ClassDiagnosis", "class_report", "format_class_report"]


@dataclass
class ClassDiagnosis:
    category_id: int
    name: str
    gt_boxes: int
    mean_top_score_with: float  # mean over images containing the class of its highest detection score (0: none)
    mean_top_score_without: float  # the same over the images that do not contain it
    detections: int
    recall: float  # share of its GT boxes found under its own label at IoU >= iou_threshold
    taken_as: list[tuple[str, int]]  # missed boxes found under another label: (label name, boxes), most first


def _xyxy(boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    return box_convert(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")  # (B, 4)


def class_report(coco_gt: Any, results: Sequence[Mapping[str, Any]], iou_threshold: float = 0.5) -> list[ClassDiagnosis]:
    """One :class:`ClassDiagnosis` per category of ``coco_gt`` (a pycocotools ``COCO``), in id order.

    Args:
        coco_gt: the ground truth; crowd boxes are left out.
        results: COCO result records (``image_id``, ``category_id``, ``bbox`` as x, y, w, h, ``score``).
        iou_threshold: overlap at which a detection finds a GT box.
    """
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    detections_by_image: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for record in results:
        detections_by_image[record["image_id"]].append(record)
    top_score: dict[tuple[int, int], float] = {}  # (image, category) -> highest score
    detections = Counter()
    for image_id, records in detections_by_image.items():
        for record in records:
            key = (image_id, record["category_id"])
            top_score[key] = max(top_score.get(key, 0.0), float(record["score"]))
            detections[record["category_id"]] += 1

    images_with: dict[int, set[int]] = defaultdict(set)
    found, gt_boxes = Counter(), Counter()
    taken_as: dict[int, Counter] = defaultdict(Counter)
    for image_id in coco_gt.getImgIds():
        annotations = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        if not annotations:
            continue
        records = detections_by_image.get(image_id, [])
        gt = _xyxy([a["bbox"] for a in annotations])  # (G, 4)
        det = _xyxy([r["bbox"] for r in records])  # (D, 4)
        det_labels = torch.tensor([r["category_id"] for r in records], dtype=torch.long)  # (D,)
        det_scores = torch.tensor([float(r["score"]) for r in records])  # (D,)
        overlaps = box_iou(gt, det) >= iou_threshold  # (G, D)
        for index, annotation in enumerate(annotations):
            category = annotation["category_id"]
            images_with[category].add(image_id)
            gt_boxes[category] += 1
            if (overlaps[index] & (det_labels == category)).any():
                found[category] += 1
            elif overlaps[index].any():  # found, but under another label: the best-scoring one
                best = int(torch.where(overlaps[index], det_scores, -1.0).argmax())
                taken_as[category][names.get(int(det_labels[best]), str(int(det_labels[best])))] += 1

    all_images = set(coco_gt.getImgIds())
    report = []
    for category in sorted(names):
        with_class = images_with[category]
        without = all_images - with_class
        report.append(
            ClassDiagnosis(
                category_id=category,
                name=names[category],
                gt_boxes=gt_boxes[category],
                mean_top_score_with=_mean_top(top_score, with_class, category),
                mean_top_score_without=_mean_top(top_score, without, category),
                detections=detections[category],
                recall=found[category] / gt_boxes[category] if gt_boxes[category] else float("nan"),
                taken_as=taken_as[category].most_common(),
            )
        )
    return report


def _mean_top(top_score: Mapping[tuple[int, int], float], images: set[int], category: int) -> float:
    if not images:
        return float("nan")
    return sum(top_score.get((image, category), 0.0) for image in images) / len(images)


def format_class_report(
    report: Sequence[ClassDiagnosis],
    per_class_ap: Optional[Mapping[int, float]] = None,
    groups: Optional[Mapping[int, str]] = None,
) -> str:
    """A markdown table of ``report``; AP (fractions) and LVIS groups ('r'/'c'/'f') per category id when given."""
    header = ["category", "group", "AP", "top score: with / without", "detections", "recall@.5", "missed boxes found as"]
    rows = [header, ["---"] * len(header)]
    for d in report:
        ap = (per_class_ap or {}).get(d.category_id)
        taken = ", ".join(f"{name} ({count})" for name, count in d.taken_as[:2]) or "-"
        rows.append([
            d.name,
            (groups or {}).get(d.category_id, "-"),
            "-" if ap is None else f"{100 * ap:.1f}",
            f"{d.mean_top_score_with:.3f} / {d.mean_top_score_without:.3f}",
            str(d.detections),
            f"{d.recall:.2f}",
            taken,
        ])  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
