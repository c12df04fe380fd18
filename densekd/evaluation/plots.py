"""Per-class AP (detection) or IoU (segmentation) bars for several models, classes sorted from
frequent to rare, so a reader sees at a glance where distillation helped and whether the tail
came along; and gains over a baseline with their seed error bars, per recipe."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence, Union

if TYPE_CHECKING:
    from densekd.evaluation.gains import PairedGain


def _save(figure, path: Union[str, Path]) -> Path:
    """Lay out ``figure``, write it to ``path`` (PNG, parent folders created) and free it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


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
    return _save(figure, path)


def plot_gains(
    gains: Mapping[str, Mapping[str, Mapping[str, "PairedGain"]]],
    metrics: Sequence[str],
    path: Union[str, Path],
    title: str = "",
) -> Path:
    """Write a PNG of gains over a baseline with seed error bars: one panel per metric, side by
    side (e.g. APr | APf), one row per recipe, one bar per schedule.

    Args:
        gains: schedule -> recipe -> metric -> :class:`~densekd.evaluation.gains.PairedGain`
            (fractions; plotted in percent). A recipe missing from a schedule (it failed) gets
            no bar; a gain without spread (one seed) no error bar.
        metrics: the metrics to plot, one panel each, in order.
        path: PNG file to write.

    Error bars are the std of the paired per-seed differences; ``*`` marks a significant gain.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    schedules = list(gains)
    recipes = list(dict.fromkeys(r for schedule in schedules for r in gains[schedule]))
    height = 0.8 / max(len(schedules), 1)
    figure, axes = plt.subplots(
        1, len(metrics), figsize=(4.2 * len(metrics) + 1.5, 0.45 * len(recipes) * max(len(schedules), 1) / 2 + 1.6),
        sharey=True, squeeze=False,
    )  # fmt: skip
    for axis, metric in zip(axes[0], metrics):
        for index, schedule in enumerate(schedules):
            rows, values, errors, stars = [], [], [], []
            for row, recipe in enumerate(recipes):
                gain = gains[schedule].get(recipe, {}).get(metric)
                if gain is None or gain.n == 0:
                    y = row + (index - (len(schedules) - 1) / 2) * height
                    axis.text(0.0, y, " no result", va="center", ha="left", fontsize=7, color="grey")
                    continue
                rows.append(row + (index - (len(schedules) - 1) / 2) * height)
                values.append(100 * gain.mean)
                errors.append(0.0 if gain.n < 2 else 100 * gain.std)
                stars.append(gain.significant)
            axis.barh(rows, values, height, xerr=errors, capsize=2, label=schedule)
            for y, value, error, star in zip(rows, values, errors, stars):
                if star:
                    axis.text(value + math.copysign(error, value), y, " *", va="center", ha="left" if value >= 0 else "right")
        axis.axvline(0.0, color="black", linewidth=0.8)
        axis.set_xlabel(f"{metric} gain over baseline (AP points)")
        axis.set_title(metric)
    axes[0][0].set_yticks(range(len(recipes)))
    axes[0][0].set_yticklabels(recipes, fontsize=8)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(title="schedule", fontsize=8)
    figure.suptitle(title or "Gain over baseline (mean ± std of paired seeds; * significant)", fontsize=10)
    return _save(figure, path)


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
