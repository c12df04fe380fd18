"""COCO / LVIS-style metrics on tiny hand-built ground truth (no images needed)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from densekd.evaluation import (
    BACKENDS,
    COCO_METRIC_NAMES,
    LVIS_METRIC_NAMES,
    evaluate_coco,
    evaluate_lvis_style,
    format_metrics_table,
    frequency_group_ap,
    save_results,
    to_coco_results,
)


def _image(image_id, width=100, height=100, **extra):
    return {"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg", **extra}


def _ann(ann_id, image_id, category_id, box, iscrowd=0, segmentation=None):
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [float(v) for v in box],
        "area": float(box[2] * box[3]),
        "iscrowd": iscrowd,
    }
    if segmentation is not None:
        ann["segmentation"] = segmentation
        ann["area"] = float(mask_utils.area(segmentation))
    return ann


def _categories(ids, frequencies=None):
    cats = [{"id": c, "name": f"c{c}"} for c in ids]
    if frequencies is not None:
        for cat, freq in zip(cats, frequencies):
            cat["frequency"] = freq
    return cats


def _det(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in box], "score": score}


def _perfect(gt, score=0.9):
    return [_det(a["image_id"], a["category_id"], a["bbox"], score) for a in gt["annotations"] if not a["iscrowd"]]


def _rle(binary):
    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


# One GT box per area range (small < 32^2 <= medium < 96^2 <= large), so every COCO metric is defined.
_ALL_AREAS_GT = {
    "images": [_image(1, 200, 200), _image(2, 200, 200)],
    "categories": _categories([1, 2]),
    "annotations": [
        _ann(1, 1, 1, [5, 5, 20, 20]),  # small, 400
        _ann(2, 1, 2, [40, 40, 50, 50]),  # medium, 2500
        _ann(3, 2, 1, [10, 10, 150, 120]),  # large, 18000
    ],
}


# --------------------------------------------------------------------------- COCO: exact values


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_bbox_detections_score_one(backend):
    m = evaluate_coco(_ALL_AREAS_GT, _perfect(_ALL_AREAS_GT), backend=backend)
    for name in COCO_METRIC_NAMES:  # AR1 too: COCO's maxDets counts per image *and class*
        assert m[name] == pytest.approx(1.0), name
    assert m["per_class_ap"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_segm_detections_score_one(backend):
    h, w = 40, 50
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 20) ** 2 + (xx - 15) ** 2 < 10**2  # (H, W) bool, not box-shaped
    bar = (yy >= 5) & (yy < 35) & (xx >= 30) & (xx < 36)
    gt = {
        "images": [_image(1, w, h)],
        "categories": _categories([3, 9]),
        "annotations": [
            _ann(1, 1, 3, [5, 10, 20, 20], segmentation=_rle(disk)),
            _ann(2, 1, 9, [30, 5, 6, 30], segmentation=_rle(bar)),
        ],
    }
    probs = np.stack([disk, bar]).astype(np.float32)[:, None] * 0.8 + 0.1  # (D, 1, H, W) in {0.1, 0.9}
    pred = {
        "boxes": torch.tensor([[5.0, 10.0, 25.0, 30.0], [30.0, 5.0, 36.0, 35.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 2]),
        "masks": torch.from_numpy(probs),
    }
    results = to_coco_results([pred], [1], {1: 3, 2: 9}, with_masks=True)
    m = evaluate_coco(gt, results, iou_type="segm", backend=backend)
    assert m["AP"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(1.0)
    assert m["per_class_ap"] == {3: pytest.approx(1.0), 9: pytest.approx(1.0)}
    # A mask shifted by 8 px overlaps the disk with IoU < 0.5: zero mask AP for that class,
    # although the *box* in the record is still perfect.
    shifted = [dict(results[0], segmentation=_rle(np.roll(disk, 8, axis=1)))]
    m = evaluate_coco(gt, shifted, iou_type="segm", backend=backend)
    assert m["per_class_ap"][3] == 0.0
    assert math.isclose(evaluate_coco(gt, shifted, backend=backend)["per_class_ap"][3], 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_class_scores_zero_for_that_class(backend):
    gt = {
        "images": [_image(1)],
        "categories": _categories([1, 2]),
        "annotations": [_ann(1, 1, 1, [10, 10, 30, 30])],
    }
    m = evaluate_coco(gt, [_det(1, 2, [10, 10, 30, 30], 0.9)], backend=backend)
    assert m["per_class_ap"][1] == 0.0
    assert math.isnan(m["per_class_ap"][2])  # no GT of class 2: AP undefined, kept as nan
    assert m["AP"] == 0.0  # the mean runs over classes with GT only


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_of_two_found_gives_51_over_101(backend):
    """Two GT boxes, one found exactly (score 0.9), the other missed.

    Every IoU threshold sees the same curve: recall 0.5 at precision 1, nothing beyond.
    COCO samples interpolated precision at the 101 recall points 0, 0.01, ..., 1: the 51
    points 0..0.50 have precision 1 (a recall of 0.5 is reached), the 50 points 0.51..1.00
    are unreachable and count 0. AP = 51 / 101 = 0.50495..., not 0.5.
    """
    gt = {
        "images": [_image(1)],
        "categories": _categories([1]),
        "annotations": [_ann(1, 1, 1, [10, 10, 30, 30]), _ann(2, 1, 1, [60, 60, 30, 30])],
    }
    m = evaluate_coco(gt, [_det(1, 1, [10, 10, 30, 30], 0.9)], backend=backend)
    for name in ("AP", "AP50", "AP75"):
        assert m[name] == pytest.approx(51 / 101, abs=1e-12)
    assert m["AR100"] == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detection_on_crowd_region_is_not_a_false_positive(backend):
    normal = _ann(1, 1, 1, [10, 10, 20, 20])
    crowd = _ann(2, 1, 1, [50, 50, 40, 40], iscrowd=1)
    # A box inside the crowd region: crowd IoU is intersection / detection area = 1.
    dets = [_det(1, 1, [10, 10, 20, 20], 0.5), _det(1, 1, [55, 55, 20, 20], 0.9)]
    with_crowd = {"images": [_image(1)], "categories": _categories([1]), "annotations": [normal, crowd]}
    assert evaluate_coco(with_crowd, dets, backend=backend)["AP"] == pytest.approx(1.0)
    # Without the crowd region the higher-scored box is a false positive: precision 1/2 at recall 1.
    without = dict(with_crowd, annotations=[normal])
    assert evaluate_coco(without, dets, backend=backend)["AP"] == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zeros(backend):
    m = evaluate_coco(_ALL_AREAS_GT, [], backend=backend)
    assert {name: m[name] for name in COCO_METRIC_NAMES} == {name: 0.0 for name in COCO_METRIC_NAMES}
    assert m["per_class_ap"] == {1: 0.0, 2: 0.0}


def test_image_ids_restricts_evaluation():
    dets = [_det(1, 1, [5, 5, 20, 20], 0.9)]  # only image 1's class-1 box is found
    m = evaluate_coco(_ALL_AREAS_GT, dets, image_ids=[1])
    assert m["per_class_ap"][1] == pytest.approx(1.0)
    assert m["per_class_ap"][2] == 0.0
    assert evaluate_coco(_ALL_AREAS_GT, dets)["per_class_ap"][1] == pytest.approx(51 / 101)


def test_inputs_are_not_modified_and_paths_work(tmp_path):
    gt = json.loads(json.dumps(_ALL_AREAS_GT))
    results = _perfect(gt)
    before = json.dumps([gt, results], sort_keys=True)
    for backend in BACKENDS:
        evaluate_coco(gt, results, backend=backend)
    assert json.dumps([gt, results], sort_keys=True) == before
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    save_results(results, tmp_path / "out" / "res.json")
    assert os.listdir(tmp_path / "out") == ["res.json"]  # no temporary file left behind
    assert evaluate_coco(str(gt_path), tmp_path / "out" / "res.json")["AP"] == pytest.approx(1.0)


def test_results_outside_ground_truth_are_errors():
    with pytest.raises(ValueError, match="category id"):
        evaluate_coco(_ALL_AREAS_GT, [_det(1, 5, [0, 0, 5, 5], 0.5)])
    with pytest.raises(ValueError, match="image id"):
        evaluate_coco(_ALL_AREAS_GT, [_det(99, 1, [0, 0, 5, 5], 0.5)])
    with pytest.raises(ValueError, match="with_masks=True"):
        evaluate_coco(_ALL_AREAS_GT, _perfect(_ALL_AREAS_GT), iou_type="segm")
    with pytest.raises(ValueError, match="valid: pycocotools, faster_coco_eval"):
        evaluate_coco(_ALL_AREAS_GT, [], backend="lvis")


def _synthetic_gt_and_detections(seed=0, num_images=20, num_classes=5):
    """Jittered GT boxes, some wrong classes and misses, random false positives; seeded."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for image_id in range(1, num_images + 1):
        images.append(_image(image_id, 320, 240))
        for _ in range(rng.integers(1, 5)):
            w, h = rng.uniform(8, 150, size=2)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            cat = int(rng.integers(1, num_classes + 1))
            anns.append(_ann(len(anns) + 1, image_id, cat, [x, y, w, h], iscrowd=int(rng.random() < 0.05)))
            if rng.random() < 0.85:
                jx, jy, jw, jh = rng.normal(0, 0.1, size=4) * [w, h, w, h]
                det_cat = cat if rng.random() < 0.9 else int(rng.integers(1, num_classes + 1))
                dets.append(_det(image_id, det_cat, [x + jx, y + jy, w + jw, h + jh], float(rng.random())))
        for _ in range(rng.integers(0, 3)):  # false positives
            w, h = rng.uniform(8, 100, size=2)
            box = [rng.uniform(0, 320 - w), rng.uniform(0, 240 - h), w, h]
            dets.append(_det(image_id, int(rng.integers(1, num_classes + 1)), box, float(rng.random() * 0.6)))
    gt = {"images": images, "categories": _categories(range(1, num_classes + 1)), "annotations": anns}
    return gt, dets


def test_backends_agree_on_random_detections():
    gt, dets = _synthetic_gt_and_detections()
    a = evaluate_coco(gt, dets, backend="pycocotools")
    b = evaluate_coco(gt, dets, backend="faster_coco_eval")
    assert 0.2 < a["AP50"] < 0.95  # a non-trivial case
    for name in COCO_METRIC_NAMES:
        assert a[name] == pytest.approx(b[name], abs=1e-6, nan_ok=True), name
    assert a["per_class_ap"].keys() == b["per_class_ap"].keys()
    for cat_id, ap in a["per_class_ap"].items():
        assert ap == pytest.approx(b["per_class_ap"][cat_id], abs=1e-6)
    # Per-class AP averages back to COCO's AP (every class has GT here).
    assert np.mean(list(a["per_class_ap"].values())) == pytest.approx(a["AP"], abs=1e-12)


# --------------------------------------------------------------------------- LVIS style

_FREQS = {1: "r", 2: "c", 3: "f"}


def _lvis_gt(image_extras=None):
    image_extras = image_extras or {}
    return {
        "images": [_image(i, **image_extras.get(i, {})) for i in (1, 2, 3)],
        "categories": _categories([1, 2, 3], [_FREQS[c] for c in (1, 2, 3)]),
        "annotations": [
            _ann(1, 1, 1, [10, 10, 30, 30]),
            _ann(2, 2, 2, [20, 20, 40, 40]),
            _ann(3, 3, 3, [5, 5, 50, 60]),
            _ann(4, 1, 3, [50, 50, 40, 40]),
        ],
    }


def test_lvis_only_rare_detected():
    gt = _lvis_gt()
    m = evaluate_lvis_style(gt, [_det(1, 1, [10, 10, 30, 30], 0.8)])
    assert set(LVIS_METRIC_NAMES) <= set(m)
    assert m["APr"] == pytest.approx(1.0)
    assert m["APc"] == 0.0 and m["APf"] == 0.0
    assert m["AP"] == pytest.approx(1 / 3)
    # faster-coco-eval's own group numbers equal LVIS's definition (mean per-class AP per group).
    groups = frequency_group_ap(m["per_class_ap"], _FREQS)
    for name in ("APr", "APc", "APf"):
        assert m[name] == pytest.approx(groups[name], abs=1e-12)


def test_lvis_groups_agree_with_per_class_average_on_random_detections():
    gt, dets = _synthetic_gt_and_detections(seed=1, num_images=12, num_classes=6)
    freqs = dict(zip(range(1, 7), "rrccff"))
    for cat in gt["categories"]:
        cat["frequency"] = freqs[cat["id"]]
    for image in gt["images"]:  # every class verified in every image: LVIS == COCO here
        present = {a["category_id"] for a in gt["annotations"] if a["image_id"] == image["id"]}
        image["neg_category_ids"] = sorted(set(freqs) - present)
    m = evaluate_lvis_style(gt, dets, max_dets=100)
    groups = frequency_group_ap(m["per_class_ap"], freqs)
    for name in ("APr", "APc", "APf"):
        assert m[name] == pytest.approx(groups[name], abs=1e-12)
    coco = evaluate_coco(gt, dets, backend="faster_coco_eval")
    assert m["AP"] == pytest.approx(coco["AP"], abs=1e-12)


def test_lvis_ignores_unverified_categories_where_coco_penalizes():
    """Federated evaluation: a category neither annotated in an image nor in its
    neg_category_ids was never checked there, so detections of it are dropped.

    Class 2 has one GT (image 2), found at score 0.5. A class-2 box in image 1 at score 0.9
    comes first: COCO counts it as a false positive (precision 1/2 at recall 1 -> AP 0.5);
    LVIS drops it (AP 1) unless image 1 lists class 2 as verified absent.
    """
    dets = [_det(2, 2, [20, 20, 40, 40], 0.5), _det(1, 2, [60, 10, 20, 20], 0.9)]
    assert evaluate_coco(_lvis_gt(), dets)["per_class_ap"][2] == pytest.approx(0.5)
    assert evaluate_lvis_style(_lvis_gt(), dets)["per_class_ap"][2] == pytest.approx(1.0)
    negative = _lvis_gt({1: {"neg_category_ids": [2]}})
    assert evaluate_lvis_style(negative, dets)["per_class_ap"][2] == pytest.approx(0.5)


def test_lvis_not_exhaustive_category_has_no_false_positives():
    """Image 1 has class 3 annotated but not exhaustively: an unmatched class-3 box there is
    ignored, while the matched one still counts. COCO ranks it FP (0.9), TP (0.5), TP (0.4):
    interpolated precision 2/3 at every recall -> AP 2/3; LVIS: AP 1."""
    dets = [
        _det(1, 3, [50, 50, 40, 40], 0.4),  # TP in image 1
        _det(3, 3, [5, 5, 50, 60], 0.5),  # TP in image 3
        _det(1, 3, [0, 60, 30, 30], 0.9),  # unmatched, in image 1
    ]
    assert evaluate_coco(_lvis_gt(), dets)["per_class_ap"][3] == pytest.approx(2 / 3)
    assert evaluate_lvis_style(_lvis_gt(), dets)["per_class_ap"][3] == pytest.approx(2 / 3)
    not_exhaustive = _lvis_gt({1: {"not_exhaustive_category_ids": [3]}})
    assert evaluate_lvis_style(not_exhaustive, dets)["per_class_ap"][3] == pytest.approx(1.0)


def test_lvis_max_dets_is_per_image_over_all_categories():
    # Image 1 holds class 1 and class 3; with max_dets=1 only the higher-scored detection survives.
    dets = [_det(1, 1, [10, 10, 30, 30], 0.6), _det(1, 3, [50, 50, 40, 40], 0.7)]
    ap = evaluate_lvis_style(_lvis_gt(), dets, max_dets=1)["per_class_ap"]
    assert ap[1] == 0.0 and ap[3] > 0.0


def test_lvis_empty_results_and_missing_frequency():
    m = evaluate_lvis_style(_lvis_gt(), [])
    assert m["AP"] == 0.0 and m["APr"] == 0.0 and m["APc"] == 0.0 and m["APf"] == 0.0
    with pytest.raises(ValueError, match="frequency"):
        evaluate_lvis_style(_ALL_AREAS_GT, [])


def test_lvis_groups_given_for_a_file_without_frequency():
    """Plain COCO files carry no 'frequency': the groups come from the caller (the training
    split's image counts) and replace the file's, without touching the caller's ground truth."""
    plain = _lvis_gt()
    for cat in plain["categories"]:
        del cat["frequency"]
    dets = [_det(1, 1, [10, 10, 30, 30], 0.8)]
    m = evaluate_lvis_style(plain, dets, category_frequency=_FREQS)
    assert m["APr"] == pytest.approx(1.0) and m["APc"] == 0.0 and m["APf"] == 0.0
    assert all("frequency" not in cat for cat in plain["categories"])
    regrouped = evaluate_lvis_style(_lvis_gt(), dets, category_frequency={1: "f", 2: "c", 3: "f"})
    assert regrouped["APf"] == pytest.approx(0.5) and regrouped["APr"] != regrouped["APr"]  # no rare class: nan
    with pytest.raises(ValueError, match=r"no group for category id\(s\) \[3\]"):
        evaluate_lvis_style(plain, dets, category_frequency={1: "r", 2: "c"})


# --------------------------------------------------------------------------- conversion and display


def test_to_coco_results_maps_non_contiguous_ids_and_xyxy_to_xywh():
    pred = {
        "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.5, 1.5, 2.5, 4.0]]),
        "scores": torch.tensor([0.75, 0.25]),
        "labels": torch.tensor([2, 1]),
    }
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    results = to_coco_results([pred, empty], [42, 7], {1: 18, 2: 90})
    assert results == [
        {"image_id": 42, "category_id": 90, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.75},
        {"image_id": 42, "category_id": 18, "bbox": [0.5, 1.5, 2.0, 2.5], "score": 0.25},
    ]
    gt = {
        "images": [_image(42), _image(7)],
        "categories": _categories([18, 90]),
        "annotations": [_ann(1, 42, 90, [10, 20, 30, 40]), _ann(2, 42, 18, [0.5, 1.5, 2, 2.5])],
    }
    assert evaluate_coco(gt, results)["per_class_ap"] == {18: pytest.approx(1.0), 90: pytest.approx(1.0)}
    with pytest.raises(ValueError, match=r"label 3 .*known labels: \[1, 2\]"):
        to_coco_results([dict(pred, labels=torch.tensor([3, 1]))], [42], {1: 18, 2: 90})


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode, numpy 2
def test_to_coco_results_masks_are_json_ready_rle():
    probs = torch.zeros(2, 1, 6, 8)
    probs[0, 0, 1:3, 2:5] = 0.7
    probs[1, 0, 4, :] = 0.5  # exactly at the threshold: off (pixels are on where p > threshold)
    pred = {"boxes": torch.zeros(2, 4), "scores": torch.ones(2), "labels": torch.ones(2, dtype=torch.int64)}
    results = to_coco_results([dict(pred, masks=probs)], [1], {1: 1}, with_masks=True)
    json.dumps(results)
    seg = results[0]["segmentation"]
    assert isinstance(seg["counts"], str) and seg["size"] == [6, 8]
    assert mask_utils.decode(seg).sum() == 6
    assert mask_utils.decode(results[1]["segmentation"]).sum() == 0
    with pytest.raises(ValueError, match="no 'masks'"):
        to_coco_results([pred], [1], {1: 1}, with_masks=True)


def test_format_metrics_table():
    rows = {
        "teacher": {"AP": 0.41, "AP50": 0.6234},
        "distilled": {"AP": 0.3049, "AP50": float("nan")},
    }
    table = format_metrics_table(rows, ["AP", "AP50"])
    assert table.splitlines() == [
        "model        AP  AP50",
        "teacher    41.0  62.3",
        "distilled  30.5     -",
    ]
    with pytest.raises(ValueError, match="available: AP, AP50"):
        format_metrics_table(rows, ["APr"])


# --------------------------------------------------------------------------- instance segmentation


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode, numpy 2
def test_mask_rcnn_outputs_score_with_coco_and_lvis_segm_metrics():
    """Mask R-CNN's eval outputs (masks (D, 1, H, W) probabilities at image size) go through
    to_coco_results(with_masks=True) into COCO and LVIS-style mask AP (iou_type="segm")."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.resnet import BasicBlock, ResNet

    h = w = 48
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 16) ** 2 + (xx - 16) ** 2 < 9**2  # (H, W) bool
    bar = (yy >= 26) & (yy < 44) & (xx >= 30) & (xx < 38)
    def xyxy(mask):
        return [float(xx[mask].min()), float(yy[mask].min()), float(xx[mask].max() + 1), float(yy[mask].max() + 1)]

    def xywh(mask):
        x0, y0, x1, y1 = xyxy(mask)
        return [x0, y0, x1 - x0, y1 - y0]

    gt = {
        "images": [_image(1, w, h, neg_category_ids=[]), _image(2, w, h)],
        "categories": _categories([5, 8], ["r", "f"]),
        "annotations": [
            _ann(1, 1, 5, xywh(disk), segmentation=_rle(disk)),
            _ann(2, 1, 8, xywh(bar), segmentation=_rle(bar)),
            _ann(3, 2, 8, xywh(bar), segmentation=_rle(bar)),
        ],
    }
    label_to_category_id = {1: 5, 2: 8}

    torch.manual_seed(0)
    layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}  # the levels torchvision's defaults expect
    backbone = BackboneWithFPN(ResNet(BasicBlock, [1, 1, 1, 1]), layers, [64, 128, 256, 512], 16)
    model = MaskRCNN(backbone, num_classes=3, min_size=h, max_size=w, box_score_thresh=0.0, box_detections_per_img=10,
                     rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=50).eval()  # fmt: skip
    with torch.inference_mode():
        outputs = model([torch.rand(3, h, w), torch.rand(3, h, w)])
    assert outputs[0]["masks"].shape[1:] == (1, h, w)
    results = to_coco_results(outputs, [1, 2], label_to_category_id, with_masks=True)
    for metrics in (evaluate_coco(gt, results, iou_type="segm"), evaluate_lvis_style(gt, results, iou_type="segm")):
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50")), metrics  # untrained: low, but defined

    def prediction(masks, labels):
        probs = np.stack(masks).astype(np.float32)[:, None] * 0.8 + 0.1  # (D, 1, H, W)
        return {"boxes": torch.tensor([xyxy(m) for m in masks]), "scores": torch.full((len(masks),), 0.9), "labels": torch.tensor(labels),
                "masks": torch.from_numpy(probs)}  # fmt: skip

    perfect = to_coco_results([prediction([disk, bar], [1, 2]), prediction([bar], [2])], [1, 2], label_to_category_id, with_masks=True)
    lvis = evaluate_lvis_style(gt, perfect, iou_type="segm")
    assert lvis["APr"] == pytest.approx(1.0) and lvis["APf"] == pytest.approx(1.0) and lvis["AP"] == pytest.approx(1.0)
    assert evaluate_coco(gt, perfect, iou_type="segm")["AP"] == pytest.approx(1.0)
    # the rare disk's mask shifted by 9 px: its box is still right, its mask is not (IoU < 0.5)
    shifted = [dict(perfect[0], segmentation=_rle(np.roll(disk, 9, axis=1))), *perfect[1:]]
    assert evaluate_lvis_style(gt, shifted, iou_type="segm")["APr"] == 0.0
    assert evaluate_lvis_style(gt, shifted, iou_type="bbox")["APr"] == pytest.approx(1.0)
