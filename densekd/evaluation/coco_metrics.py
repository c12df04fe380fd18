"""COCO and LVIS-style detection / instance-segmentation metrics as named floats.

Two entry points, one convention:

* :func:`evaluate_coco` -- COCO's 12 standard numbers through pycocotools or faster-coco-eval
  (same numbers, faster-coco-eval is a C++ port that is several times quicker).
* :func:`evaluate_lvis_style` -- LVIS's federated evaluation (AP plus APr / APc / APf) through
  faster-coco-eval's ``lvis_style=True`` mode. The official ``lvis`` package is not used: it
  still calls ``np.float`` and fails on numpy >= 2.

Conventions shared by both:

* Every metric is a **fraction in [0, 1]** (COCO's own scale), not a percentage. Only
  :func:`format_metrics_table` multiplies by 100, for display.
* A metric COCO cannot define -- no ground truth in that area range or frequency group, which
  the evaluators report as ``-1`` -- is ``float("nan")`` (as in detectron2's COCOEvaluator).
  A metric with ground truth but no detections is ``0.0``. So empty ``results`` never raise:
  they give ``0.0`` for every defined metric (``nan`` for undefined ones, as always).
* ``per_class_ap`` maps each ground-truth category id (the dataset's own, possibly
  non-contiguous ids) to its AP at IoU .50:.95, all areas, the largest ``maxDets``; it is read
  from ``eval["precision"]`` (shape ``(T, R, K, A, M)``: IoU thresholds, 101 recall points,
  categories, area ranges, max-detection settings). Categories without any (non-crowd)
  ground truth among the evaluated images are kept, with AP ``nan``.
* The ground truth may be a path to a COCO-format JSON file, an already-loaded dict (copied,
  never modified), or a ``COCO`` object of either library (converted when it belongs to the
  other backend's library). Results are a list of records as made by
  :func:`densekd.evaluation.to_coco_results`, or a path to a JSON file of them. The evaluators
  add keys to the records they are given, so they get copies of the caller's records.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections import abc, defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval

__all__ = [
    "BACKENDS",
    "IOU_TYPES",
    "COCO_METRIC_NAMES",
    "LVIS_METRIC_NAMES",
    "LVIS_FREQUENCIES",
    "evaluate_coco",
    "evaluate_lvis_style",
    "frequency_group_ap",
    "format_metrics_table",
]

BACKENDS: Tuple[str, ...] = ("pycocotools", "faster_coco_eval")
IOU_TYPES: Tuple[str, ...] = ("bbox", "segm")

# Names for COCOeval.stats[0:12], in COCO's order.
COCO_METRIC_NAMES: Tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",  # AP @ IoU .50:.95 / .50 / .75, then small / medium / large
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",  # AR @ maxDets 1 / 10 / 100, then by area (maxDets 100)
)  # fmt: skip

# Our name -> faster-coco-eval's ``stats_as_dict`` label in LVIS mode (maxDets = [max_dets]).
_LVIS_LABELS: Dict[str, str] = {
    "AP": "AP_all",
    "AP50": "AP_50",
    "AP75": "AP_75",
    "APs": "AP_small",
    "APm": "AP_medium",
    "APl": "AP_large",
    "APr": "APr",
    "APc": "APc",
    "APf": "APf",
    "AR": "AR_all",  # AR @ max_dets
    "ARs": "AR_small",
    "ARm": "AR_medium",
    "ARl": "AR_large",
}
LVIS_METRIC_NAMES: Tuple[str, ...] = tuple(_LVIS_LABELS)

# LVIS frequency groups (Gupta et al. 2019): rare <= 10 training images, common 11..100, frequent > 100.
LVIS_FREQUENCIES: Tuple[str, ...] = ("r", "c", "f")

GroundTruth = Union[str, "os.PathLike[str]", Mapping[str, Any], PyCOCO, FasterCOCO]
Results = Union[str, "os.PathLike[str]", Sequence[Mapping[str, Any]]]


def _silent(*args: Any, **kwargs: Any) -> None:
    """print_function for faster-coco-eval: it logs a line per step otherwise."""


def _check_choice(what: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _as_float(value: float) -> float:
    """COCO's ``-1`` ("no ground truth to measure against") -> nan; anything else -> float."""
    value = float(value)
    return float("nan") if value < 0 else value


# --------------------------------------------------------------------------- inputs


def _copy_dataset(dataset: Mapping[str, Any]) -> Dict[str, Any]:
    """Copy the top level and every image / annotation / category record.

    The evaluators only add keys to those records (``ignore``, ``rle``, ...), so this shallow
    copy protects the caller's dict without deep-copying polygons (LVIS val is ~1 GB of them).
    """
    out = dict(dataset)
    for key in ("images", "annotations", "categories"):
        if key in out:
            out[key] = [dict(record) for record in out[key]]
    return out


def _gt_dataset(gt: GroundTruth) -> Dict[str, Any]:
    """A private, modifiable COCO-format dict from any accepted ground-truth form."""
    if isinstance(gt, (PyCOCO, FasterCOCO)):
        return _copy_dataset(gt.dataset)
    if isinstance(gt, (str, os.PathLike)):
        with open(gt) as f:
            return json.load(f)
    if isinstance(gt, abc.Mapping):
        return _copy_dataset(gt)
    raise TypeError(
        f"ground truth must be a path, a COCO-format dict or a COCO object, got {type(gt).__name__}"
    )


def _load_gt(gt: GroundTruth, backend: str) -> Union[PyCOCO, FasterCOCO]:
    """The ground truth as the backend's own COCO object (a given one of that type is used as is)."""
    if backend == "pycocotools":
        if isinstance(gt, PyCOCO):
            return gt
        coco = PyCOCO()
        coco.dataset = _gt_dataset(gt)
        with contextlib.redirect_stdout(io.StringIO()):  # "creating index..."
            coco.createIndex()
        return coco
    if isinstance(gt, FasterCOCO):
        return gt
    return FasterCOCO(_gt_dataset(gt), use_deepcopy=False, print_function=_silent)


def _load_results(results: Results, iou_type: str) -> List[Dict[str, Any]]:
    """Private copies of the result records, shaped for ``iou_type``."""
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            records = json.load(f)
    else:
        records = [dict(r) for r in results]  # the evaluators add keys (id, area, rle, ...) to records
    if not isinstance(records, list):
        raise TypeError(f"results must be a list of records, got {type(records).__name__}")
    needed = "segmentation" if iou_type == "segm" else "bbox"
    for i, r in enumerate(records):
        missing = [k for k in ("image_id", "category_id", "score", needed) if k not in r]
        if missing:
            hint = " (make them with to_coco_results(..., with_masks=True))" if needed == "segmentation" else ""
            raise ValueError(f"result {i} lacks {missing} needed for iou_type={iou_type!r}{hint}")
        if iou_type == "segm":
            # As in detectron2's COCOEvaluator: with a bbox present, loadRes would take the *box*
            # area as the instance area, and small/medium/large would not be mask areas.
            r.pop("bbox", None)
    return records


def _check_results_match_gt(records: Sequence[Mapping[str, Any]], coco_gt: Union[PyCOCO, FasterCOCO]) -> None:
    """Results must name images and categories the ground truth has (COCO would assert or ignore)."""
    gt_images = set(coco_gt.getImgIds())
    bad_images = sorted({int(r["image_id"]) for r in records} - gt_images)
    if bad_images:
        raise ValueError(
            f"results refer to {len(bad_images)} image id(s) not in the ground truth, e.g. {bad_images[:5]}; "
            "pass the dataset's own image ids to to_coco_results"
        )
    gt_cats = set(coco_gt.getCatIds())
    bad_cats = sorted({int(r["category_id"]) for r in records} - gt_cats)
    if bad_cats:
        raise ValueError(
            f"results use category id(s) {bad_cats[:10]} that the ground truth does not define "
            f"(it has {sorted(gt_cats)[:20]}{' ...' if len(gt_cats) > 20 else ''}); map training labels back "
            "with to_coco_results(label_to_category_id=...)"
        )


def _check_image_ids(image_ids: Optional[Sequence[int]], coco_gt: Union[PyCOCO, FasterCOCO]) -> Optional[List[int]]:
    if image_ids is None:
        return None
    ids = sorted({int(i) for i in image_ids})
    if not ids:
        raise ValueError("image_ids is empty; pass None to evaluate every ground-truth image")
    unknown = sorted(set(ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"image_ids not in the ground truth, e.g. {unknown[:5]}")
    return ids


def _load_detections(
    coco_gt: Union[PyCOCO, FasterCOCO], records: List[Dict[str, Any]]
) -> Union[PyCOCO, FasterCOCO]:
    """``coco_gt.loadRes(records)``; an empty list gives an empty result set.

    pycocotools' ``loadRes([])`` fails (it reads ``anns[0]``), so that case is built by hand.
    """
    if isinstance(coco_gt, FasterCOCO):
        return coco_gt.loadRes(records)
    with contextlib.redirect_stdout(io.StringIO()):
        if records:
            return coco_gt.loadRes(records)
        empty = PyCOCO()
        empty.dataset = {
            "images": list(coco_gt.dataset["images"]),
            "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
            "annotations": [],
        }
        empty.createIndex()
        return empty


# --------------------------------------------------------------------------- outputs


def _per_class_ap(precision: np.ndarray, cat_ids: Sequence[int]) -> Dict[int, float]:
    """AP per category at IoU .50:.95, area 'all', the largest maxDets.

    ``precision`` is ``eval["precision"]``, shape ``(T, R, K, A, M)``; entries of ``-1`` mark
    categories without ground truth. A category's entries are either all valid or all ``-1``.
    """
    out: Dict[int, float] = {}
    for k, cat_id in enumerate(cat_ids):
        p = np.asarray(precision)[:, :, k, 0, -1]  # (T, R)
        valid = p[p > -1]
        out[int(cat_id)] = float(valid.mean()) if valid.size else float("nan")
    return out


def frequency_group_ap(
    per_class_ap: Mapping[int, float], category_frequency: Mapping[int, str]
) -> Dict[str, float]:
    """APr / APc / APf as LVIS defines them: the mean per-category AP over each frequency group.

    Args:
        per_class_ap: category id -> AP, as in the ``per_class_ap`` of :func:`evaluate_lvis_style`.
        category_frequency: category id -> ``"r"``, ``"c"`` or ``"f"`` (the LVIS ``frequency``).

    Categories whose AP is nan (no ground truth) are left out; a group with no category left is nan.
    faster-coco-eval reports the same numbers (it averages all valid precision entries of the
    group, and every category with ground truth has the same number of them).
    """
    groups: Dict[str, List[float]] = {f: [] for f in LVIS_FREQUENCIES}
    for cat_id, ap in per_class_ap.items():
        freq = category_frequency.get(cat_id)
        if freq not in groups:
            raise ValueError(f"category {cat_id} has frequency {freq!r}; expected one of {LVIS_FREQUENCIES}")
        if not math.isnan(ap):
            groups[freq].append(float(ap))
    return {f"AP{f}": (float(np.mean(v)) if v else float("nan")) for f, v in groups.items()}


# --------------------------------------------------------------------------- COCO


def evaluate_coco(
    gt: GroundTruth,
    results: Results,
    iou_type: str = "bbox",
    backend: str = "pycocotools",
    image_ids: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """COCO's standard metrics, named, as fractions in [0, 1].

    Args:
        gt: ground truth: a COCO-format JSON path, dict, or ``COCO`` object (either library).
        results: COCO result records (see :func:`densekd.evaluation.to_coco_results`) or a JSON path.
        iou_type: ``"bbox"`` or ``"segm"`` (segm needs ``segmentation`` in every record).
        backend: ``"pycocotools"`` or ``"faster_coco_eval"``; they agree to ~1e-12.
        image_ids: evaluate only these images (default: every image in ``gt``).

    Returns:
        ``{name: float}`` for the names in :data:`COCO_METRIC_NAMES` (``AP``, ``AP50``, ``AP75``,
        ``APs``, ``APm``, ``APl``, ``AR1``, ``AR10``, ``AR100``, ``ARs``, ``ARm``, ``ARl``), plus
        ``"per_class_ap"``: ``{category_id: AP}``. Undefined metrics are nan; empty results give
        0.0 for every defined metric. See the module docstring.
    """
    _check_choice("iou_type", iou_type, IOU_TYPES)
    _check_choice("backend", backend, BACKENDS)
    coco_gt = _load_gt(gt, backend)
    records = _load_results(results, iou_type)
    _check_results_match_gt(records, coco_gt)
    img_ids = _check_image_ids(image_ids, coco_gt)
    coco_dt = _load_detections(coco_gt, records)

    if backend == "pycocotools":
        evaluator = PyCOCOeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = img_ids
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
    else:
        evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_silent)
        if img_ids is not None:
            evaluator.params.imgIds = img_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    stats = np.asarray(evaluator.stats, dtype=np.float64)[: len(COCO_METRIC_NAMES)]
    metrics: Dict[str, Any] = {name: _as_float(v) for name, v in zip(COCO_METRIC_NAMES, stats)}
    metrics["per_class_ap"] = _per_class_ap(evaluator.eval["precision"], evaluator.params.catIds)
    return metrics


# --------------------------------------------------------------------------- LVIS


def _category_frequencies(coco_gt: FasterCOCO) -> Dict[int, str]:
    freqs = {int(c["id"]): c.get("frequency") for c in coco_gt.dataset.get("categories", [])}
    bad = sorted(cid for cid, f in freqs.items() if f not in LVIS_FREQUENCIES)
    if bad:
        raise ValueError(
            f"LVIS-style evaluation needs every category to carry 'frequency' in {LVIS_FREQUENCIES}; "
            f"missing or invalid for category id(s) {bad[:10]}. Pass category_frequency derived from the "
            "training split's image counts (CocoDetectionDataset.lvis_frequencies() of the training set; "
            "LVIS: r <= 10 images, c 11..100, f > 100)"
        )
    return freqs


def _with_frequencies(gt: GroundTruth, category_frequency: Mapping[int, str]) -> Dict[str, Any]:
    """A private copy of the ground truth whose categories carry ``category_frequency``."""
    document = _gt_dataset(gt)
    categories = document.get("categories", [])
    missing = sorted(int(c["id"]) for c in categories if int(c["id"]) not in category_frequency)
    if missing:
        raise ValueError(f"category_frequency has no group for category id(s) {missing[:10]} of the ground truth")
    document["categories"] = [{**c, "frequency": category_frequency[int(c["id"])]} for c in categories]
    return document


def _top_k_per_image(records: List[Dict[str, Any]], k: int) -> List[Dict[str, Any]]:
    """Keep each image's ``k`` highest-scoring records over all categories (LVIS's max_dets)."""
    by_image: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_image[int(r["image_id"])].append(r)
    kept: List[Dict[str, Any]] = []
    for image_records in by_image.values():
        kept.extend(sorted(image_records, key=lambda r: -float(r["score"]))[:k])
    return kept


def evaluate_lvis_style(
    gt: GroundTruth,
    results: Results,
    iou_type: str = "bbox",
    max_dets: int = 300,
    image_ids: Optional[Sequence[int]] = None,
    category_frequency: Optional[Mapping[int, str]] = None,
) -> Dict[str, Any]:
    """LVIS's federated AP with rare / common / frequent splits, through faster-coco-eval.

    LVIS semantics (Gupta et al. 2019, sec. 5), as faster-coco-eval implements them:

    * every category needs ``frequency`` in ``("r", "c", "f")``: from the file (LVIS files carry
      it), or from ``category_frequency``, which replaces the file's (plain COCO files have none);
    * a detection of category c in image i counts only if c is annotated in i or listed in the
      image's ``neg_category_ids``; any other detection is dropped (neither TP nor FP), since
      nobody checked whether c is in i. An image without ``neg_category_ids`` therefore has
      only its annotated categories evaluated;
    * an unmatched detection of a category in the image's ``not_exhaustive_category_ids`` is
      ignored (not a false positive); matched ones still count as true positives;
    * at most ``max_dets`` detections per image, the highest-scoring over all categories (as
      the official ``LVISResults``); faster-coco-eval alone would cap each image *and category*.

    Args:
        gt: LVIS/COCO-format ground truth (path, dict or ``COCO`` object).
        results: result records or a JSON path.
        iou_type: ``"bbox"`` or ``"segm"``.
        max_dets: detections kept per image (LVIS: 300).
        image_ids: evaluate only these images (default: all).
        category_frequency: category id -> ``"r"`` / ``"c"`` / ``"f"`` for every category of
            ``gt``, e.g. from the training split's image counts; default: the file's ``frequency``.

    Returns:
        ``{name: float}`` for :data:`LVIS_METRIC_NAMES` (``AP, AP50, AP75, APs, APm, APl, APr,
        APc, APf``, and ``AR, ARs, ARm, ARl`` at ``max_dets``), fractions in [0, 1], nan where
        undefined (e.g. APr with no rare category in the ground truth); plus ``"per_class_ap"``.
    """
    _check_choice("iou_type", iou_type, IOU_TYPES)
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    if category_frequency is not None:
        gt = _with_frequencies(gt, category_frequency)
    coco_gt = _load_gt(gt, "faster_coco_eval")
    frequencies = _category_frequencies(coco_gt)
    records = _load_results(results, iou_type)
    _check_results_match_gt(records, coco_gt)
    img_ids = _check_image_ids(image_ids, coco_gt)
    coco_dt = _load_detections(coco_gt, _top_k_per_image(records, max_dets))

    evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, lvis_style=True, print_function=_silent)
    evaluator.params.maxDets = [max_dets]
    if img_ids is not None:
        evaluator.params.imgIds = img_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()

    stats = evaluator.stats_as_dict
    per_class = _per_class_ap(evaluator.eval["precision"], evaluator.params.catIds)
    metrics: Dict[str, Any] = {}
    for name, label in _LVIS_LABELS.items():
        if label in stats:
            metrics[name] = _as_float(stats[label])
    if not all(f"AP{f}" in metrics for f in LVIS_FREQUENCIES):  # older faster-coco-eval: LVIS's own definition
        metrics.update(frequency_group_ap(per_class, frequencies))
    metrics["per_class_ap"] = per_class
    return metrics


# --------------------------------------------------------------------------- display


def _format_cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"column {column!r} holds a {type(value).__name__}, not a number") from None
    return "-" if math.isnan(value) else f"{100.0 * value:.1f}"


def format_metrics_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str],
    name_header: str = "model",
) -> str:
    """A plain, aligned text table of metrics, in percent with one decimal.

    Args:
        rows: row name (e.g. ``"teacher"``, ``"baseline"``, ``"distilled"``) -> metrics as
            returned by :func:`evaluate_coco` / :func:`evaluate_lvis_style` (fractions).
        columns: metric names to show, in order.
        name_header: header of the first column.

    nan and metrics a row lacks show as ``-``; a column no row has is an error (likely a typo).
    Example::

        model      AP  AP50
        teacher  41.0  62.3
        student  30.5     -
    """
    if not columns:
        raise ValueError("columns is empty; name the metrics to show, e.g. ['AP', 'AP50', 'AP75']")
    for column in columns:
        if rows and not any(column in r for r in rows.values()):
            available = sorted({k for r in rows.values() for k in r})
            raise ValueError(f"column {column!r} is in no row; available: {', '.join(available)}")
    table = [[name_header, *columns]]
    table += [[str(name), *(_format_cell(metrics.get(c), c) for c in columns)] for name, metrics in rows.items()]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = []
    for line in table:
        cells = [line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
