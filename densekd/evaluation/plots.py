"""Per-class AP (detection) or IoU (segmentation) bars for several models, classes sorted from
frequent to rare, so a reader sees at a glance where distillation helped and whether the tail
came along."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence, Union


def plot_per_class_ap(
    per_class_ap: Mapping[str, Mapping[int, float]],
    category_names: Mapping[int, str],
    training_images: Mapping[int, int],
    path: Union[str, Path],
    title: str = "",
    metric: str = "AP",
) -> Path:
    """Write a grouped bar chart (PNG) of AP per category for each model.

    Args:
        per_class_ap: model name -> {category id: AP in [0, 1]} (NaN for classes without GT).
        category_names: category id -> name.
        training_images: category id -> number of training images; sets the order
            (most frequent first) and labels each class with its count.
        path: PNG file to write.
        metric: the metric's name on the axis and in the default title.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    categories: Sequence[int] = sorted(category_names, key=lambda c: (-training_images.get(c, 0), c))
    models = list(per_class_ap)
    width = 0.8 / max(len(models), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.6 * len(categories) * len(models) / 2 + 2), 4.2))
    for index, model in enumerate(models):
        values = [100 * per_class_ap[model].get(c, math.nan) for c in categories]
        positions = [i + (index - (len(models) - 1) / 2) * width for i in range(len(categories))]
        axes.bar(positions, [0 if math.isnan(v) else v for v in values], width, label=model)
    axes.set_xticks(range(len(categories)))
    axes.set_xticklabels([f"{category_names[c]}\n({training_images.get(c, 0)})" for c in categories], rotation=60, fontsize=7)
    axes.set_ylabel(f"{metric} (%)")
    axes.set_xlabel("category (training images), most frequent first")
    axes.set_title(title or f"{metric} per category")
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_per_class_iou(
    per_class_iou: Mapping[str, Mapping[int, float]],
    class_names: Mapping[int, str],
    training_images: Mapping[int, int],
    path: Union[str, Path],
    title: str = "",
) -> Path:
    """:func:`plot_per_class_ap` for segmentation: ``per_class_iou`` maps model name ->
    {class index: IoU in [0, 1]} (nan for classes absent from ground truth and predictions)."""
    return plot_per_class_ap(per_class_iou, class_names, training_images, path, title=title, metric="IoU")
