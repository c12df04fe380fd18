"""Semantic-segmentation metrics from a confusion matrix: mIoU, per-class IoU, pixel accuracy.

:class:`ConfusionMatrix` accumulates ``(C, C)`` pixel counts over batches (rows: ground truth,
columns: prediction; C = K + 1 classes with background at 0), skipping pixels whose ground
truth is ``ignore_index``; :meth:`ConfusionMatrix.reduce` sums it over processes when
``torch.distributed`` is initialised, so every rank scores the whole validation set.
:func:`segmentation_metrics` turns it into named numbers, fractions in [0, 1]:

* ``per_class_iou[c] = TP / (TP + FP + FN)``; ``mIoU`` the mean over classes, background included
  (as Pascal VOC, Cityscapes and torchvision's reference scripts count it);
* ``pixel_accuracy = trace / total``: the fraction of valid (non-ignored) pixels predicted right;
* ``per_class_accuracy[c] = TP / (TP + FN)`` (recall); ``mean_class_accuracy`` its mean.

A class absent from both the ground truth and the predictions (TP + FP + FN = 0) has IoU
``nan`` -- there is nothing to measure -- and is left out of ``mIoU`` (as mmsegmentation does);
a class predicted but absent from the ground truth has IoU 0 and counts. Likewise a class
without ground-truth pixels has accuracy ``nan``, left out of ``mean_class_accuracy``.

:func:`evaluate_segmentation` runs a torchvision segmentation model over a loader and
returns the metrics with its throughput. Stands apart from the rest of densekd.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "ConfusionMatrix",
    "evaluate_segmentation",
    "format_per_class_iou",
    "group_mean_iou",
    "segmentation_metrics",
]


class ConfusionMatrix:
    """``(C, C)`` int64 pixel counts, rows = ground truth, columns = prediction.

    Args:
        num_classes: C, the model's output channels (background included).
        ignore_index: ground-truth value of pixels left out (e.g. 255).
        device: where the counts live (that of the predictions avoids copies).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: Optional[torch.device] = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add a batch: ``prediction`` and ``target`` are integer class maps of equal shape,
        e.g. ``(N, H, W)`` (the argmax of the logits, and the ground-truth masks)."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must have the same shape; "
                "pass class maps (argmax over the channel dimension), not logits"
            )
        target = target.to(self.matrix.device).reshape(-1)  # (N*H*W,)
        prediction = prediction.to(self.matrix.device).reshape(-1)  # (N*H*W,)
        valid = target != self.ignore_index
        target, prediction = target[valid].long(), prediction[valid].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            bad = torch.unique(target[(target < 0) | (target >= self.num_classes)])[:10].tolist()
            raise ValueError(
                f"ground truth holds class values {bad} outside 0..{self.num_classes - 1} and ignore_index "
                f"{self.ignore_index}; check num_classes (background included) and the masks"
            )
        if prediction.numel() and (prediction.min() < 0 or prediction.max() >= self.num_classes):
            raise ValueError(f"predictions hold class values outside 0..{self.num_classes - 1}")
        # (gt, pred) pair -> one bin: gt * C + pred; counts laid out as (C, C)
        bins = torch.bincount(target * self.num_classes + prediction, minlength=self.num_classes**2)
        self.matrix += bins.reshape(self.num_classes, self.num_classes)

    def reduce(self) -> None:
        """Sum the counts over every process (no-op outside initialised torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def metrics(self) -> Dict[str, Any]:
        """:func:`segmentation_metrics` of the counts so far."""
        return segmentation_metrics(self.matrix)


def _ratio(numerator: Tensor, denominator: Tensor) -> list:
    return [float(n) / float(d) if d > 0 else math.nan for n, d in zip(numerator.tolist(), denominator.tolist())]


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def segmentation_metrics(matrix: Tensor) -> Dict[str, Any]:
    """Named metrics of a ``(C, C)`` confusion matrix (rows ground truth, columns prediction).

    Returns ``{"mIoU", "pixel_accuracy", "mean_class_accuracy", "per_class_iou",
    "per_class_accuracy", "pixels"}``: fractions in [0, 1]; the per-class lists have C
    entries (index = class, background first), ``nan`` where undefined (module docstring);
    ``pixels`` counts the valid pixels. With no valid pixel at all every metric is ``nan``.
    """
    matrix = torch.as_tensor(matrix).detach().to("cpu", torch.float64)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a confusion matrix is (C, C), got shape {tuple(matrix.shape)}")
    true_positive = matrix.diagonal()  # (C,)
    ground_truth = matrix.sum(dim=1)  # (C,) TP + FN
    predicted = matrix.sum(dim=0)  # (C,) TP + FP
    iou = _ratio(true_positive, ground_truth + predicted - true_positive)
    accuracy = _ratio(true_positive, ground_truth)
    total = float(matrix.sum())
    return {
        "mIoU": _nanmean(iou),
        "pixel_accuracy": float(true_positive.sum()) / total if total > 0 else math.nan,
        "mean_class_accuracy": _nanmean(accuracy),
        "per_class_iou": iou,
        "per_class_accuracy": accuracy,
        "pixels": int(total),
    }


def group_mean_iou(per_class_iou: Sequence[float], groups: Mapping[int, str], names: Iterable[str] = ("r", "c", "f")) -> Dict[str, float]:
    """Mean IoU of each group of classes: ``groups`` maps class index -> group (e.g. LVIS
    frequency 'r' / 'c' / 'f'; classes absent from it, such as background, are left out).
    Returns ``{"mIoU_<group>": mean}``; nan IoUs are skipped, an empty group is nan."""
    by_group: Dict[str, list] = {name: [] for name in names}
    for index, group in groups.items():
        if group not in by_group:
            raise ValueError(f"class {index} has group {group!r}; expected one of {list(by_group)}")
        by_group[group].append(per_class_iou[index])
    return {f"mIoU_{name}": _nanmean(values) for name, values in by_group.items()}


def format_per_class_iou(
    per_class_iou: Mapping[str, Sequence[float]], class_names: Sequence[str], extra: Optional[Mapping[str, Sequence[Any]]] = None
) -> str:
    """A text table of IoU in percent, one row per class, one column per model (nan as ``-``);
    ``extra`` adds columns of other per-class values (e.g. training images), shown as given::

        class       train images  teacher  student
        background          2000     97.1     95.0
        red_square          1500     80.2     61.3
    """
    columns = dict(extra or {})
    columns.update({model: ["-" if math.isnan(v) else f"{100 * v:.1f}" for v in values] for model, values in per_class_iou.items()})
    for header, values in columns.items():
        if len(values) != len(class_names):
            raise ValueError(f"column {header!r} has {len(values)} values for {len(class_names)} classes")
    table = [["class", *columns]] + [[name, *(str(columns[h][i]) for h in columns)] for i, name in enumerate(class_names)]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]).rstrip() for row in table
    )


def evaluate_segmentation(
    model: nn.Module, data_loader: Iterable[Tuple[Tensor, Tensor]], num_classes: int, ignore_index: int = 255
) -> Tuple[Dict[str, Any], float]:
    """Score a segmentation model on every batch of ``data_loader``.

    Args:
        model: returns ``(N, C, H, W)`` logits, or a dict with them under ``"out"`` (torchvision's
            segmentation models), in eval mode.
        data_loader: yields ``(images (N, 3, H, W), masks (N, H, W))`` (this rank's share under
            torch.distributed: the counts are summed over ranks).
        num_classes: C, the model's output channels (background included).
        ignore_index: mask value left out of the metrics.

    Returns:
        ``(metrics, images_per_second)``: :func:`segmentation_metrics` over the whole loader, and
        the model's throughput (forward passes only, this rank).
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    confusion = ConfusionMatrix(num_classes, ignore_index, device=device)
    was_training = model.training
    model.eval()
    images_seen, model_seconds = 0, 0.0
    try:
        with torch.inference_mode():
            for images, masks in data_loader:
                images = images.to(device, non_blocking=True)
                start = time.perf_counter()
                output = model(images)
                logits = output["out"] if isinstance(output, Mapping) else output  # (N, C, H, W)
                prediction = logits.argmax(dim=1)  # (N, C, H, W) -> (N, H, W); argmax syncs the device
                model_seconds += time.perf_counter() - start
                if logits.shape[1] != num_classes:
                    raise ValueError(f"the model outputs {logits.shape[1]} channels, expected num_classes={num_classes}")
                images_seen += images.shape[0]
                confusion.update(prediction, masks.to(device))
    finally:
        model.train(was_training)
    confusion.reduce()
    return confusion.metrics(), images_seen / max(model_seconds, 1e-9)
