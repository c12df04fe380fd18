"""class_report: per class, top scores in images with and without it, detections, recall and the
labels its missed boxes were found under, from COCO result records."""
import math

from pycocotools.coco import COCO

from densekd.evaluation.class_report import class_report, format_class_report


def _ground_truth() -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 64, "height": 64} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "ring"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "never_seen"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [30, 30, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 2, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 4, "image_id": 3, "category_id": 2, "bbox": [40, 0, 20, 20], "area": 400, "iscrowd": 1},
        ],
    }
    coco.createIndex()
    return coco


RESULTS = [
    {"image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20], "score": 0.8},  # finds ring in image 1
    {"image_id": 1, "category_id": 1, "bbox": [40, 40, 10, 10], "score": 0.3},  # a weaker, wrong ring
    {"image_id": 2, "category_id": 2, "bbox": [30, 30, 20, 20], "score": 0.6},  # ring of image 2 taken for a circle
    {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.1},  # a ring elsewhere in image 2
    {"image_id": 3, "category_id": 2, "bbox": [10, 10, 20, 20], "score": 0.9},  # finds the circle
    {"image_id": 3, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.2},  # ring score in an image without one
]


def test_scores_recall_and_confusions_per_class():
    ring, circle, never_seen = class_report(_ground_truth(), RESULTS)
    assert (ring.gt_boxes, ring.detections) == (2, 4)
    assert math.isclose(ring.mean_top_score_with, (0.8 + 0.1) / 2) and math.isclose(ring.mean_top_score_without, 0.2)
    assert ring.recall == 0.5 and ring.taken_as == [("circle", 1)]
    assert (circle.gt_boxes, circle.recall, circle.taken_as) == (1, 1.0, [])  # the crowd box is left out
    assert math.isclose(circle.mean_top_score_with, 0.9) and math.isclose(circle.mean_top_score_without, 0.6 / 2)
    assert never_seen.detections == 0 and math.isnan(never_seen.recall) and math.isnan(never_seen.mean_top_score_with)


def test_a_class_the_model_never_detects_reads_as_zero_scores_and_zero_recall():
    only_circles = [r for r in RESULTS if r["category_id"] == 2]
    ring = class_report(_ground_truth(), only_circles)[0]
    assert (ring.detections, ring.recall, ring.mean_top_score_with, ring.mean_top_score_without) == (0, 0.0, 0.0, 0.0)
    assert ring.taken_as == [("circle", 1)]


def test_table_has_one_row_per_class_with_ap_and_group():
    table = format_class_report(class_report(_ground_truth(), RESULTS), {1: 0.25, 2: 1.0}, {1: "r", 2: "f", 3: "r"})
    rows = table.splitlines()
    assert len(rows) == 2 + 3
    assert rows[2] == "| ring | r | 25.0 | 0.450 / 0.200 | 4 | 0.50 | circle (1) |"
