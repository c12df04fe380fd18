"""Evaluation: COCO / LVIS-style metrics for detectors and instance segmenters, mIoU for
semantic segmenters.

Stands apart from the rest of densekd (imports nothing from it), so it can score any model.
"""

from densekd.evaluation.class_report import ClassDiagnosis, class_report, format_class_report
from densekd.evaluation.coco_metrics import (
    BACKENDS,
    COCO_METRIC_NAMES,
    IOU_TYPES,
    LVIS_FREQUENCIES,
    LVIS_METRIC_NAMES,
    evaluate_coco,
    evaluate_lvis_style,
    format_metrics_table,
    frequency_group_ap,
)
from densekd.evaluation.detections import save_results, to_coco_results
from densekd.evaluation.detector import COCO_COLUMNS, LVIS_COLUMNS, evaluate
from densekd.evaluation.gains import (
    SIGNIFICANCE_FACTOR,
    PairedGain,
    SeedSummary,
    format_gain,
    format_mean_std,
    paired_gain,
    seed_summary,
)
from densekd.evaluation.plots import plot_gains, plot_per_class_ap, plot_per_class_iou
from densekd.evaluation.segmentation import (
    ConfusionMatrix,
    evaluate_segmentation,
    format_per_class_iou,
    group_mean_iou,
    segmentation_metrics,
)

__all__ = [
    "ClassDiagnosis",
    "class_report",
    "format_class_report",
    "BACKENDS",
    "COCO_COLUMNS",
    "ConfusionMatrix",
    "COCO_METRIC_NAMES",
    "IOU_TYPES",
    "LVIS_COLUMNS",
    "LVIS_FREQUENCIES",
    "LVIS_METRIC_NAMES",
    "PairedGain",
    "SIGNIFICANCE_FACTOR",
    "SeedSummary",
    "evaluate",
    "evaluate_coco",
    "evaluate_lvis_style",
    "format_gain",
    "format_mean_std",
    "evaluate_segmentation",
    "format_metrics_table",
    "format_per_class_iou",
    "frequency_group_ap",
    "paired_gain",
    "plot_gains",
    "group_mean_iou",
    "plot_per_class_ap",
    "plot_per_class_iou",
    "save_results",
    "seed_summary",
    "segmentation_metrics",
    "to_coco_results",
]
