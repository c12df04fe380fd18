"""Datasets for densekd: COCO / LVIS-format detection data and the embedded synthetic long-tail set.

``densekd.data`` imports nothing from the rest of densekd.
"""

from densekd.data.coco import CocoDetectionDataset, collate_detection
from densekd.data.synthetic import (
    PlannedImage,
    PlannedObject,
    SyntheticConfig,
    SyntheticPaths,
    category_table,
    config_hash,
    count_images_per_category,
    default_synthetic_root,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    lvis_frequency,
    plan_split,
    render_image,
    train_image_targets,
    val_image_targets,
)

__all__ = [
    "CocoDetectionDataset",
    "collate_detection",
    "PlannedImage",
    "PlannedObject",
    "SyntheticConfig",
    "SyntheticPaths",
    "category_table",
    "config_hash",
    "count_images_per_category",
    "default_synthetic_root",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
    "lvis_frequency",
    "plan_split",
    "render_image",
    "train_image_targets",
    "val_image_targets",
]
