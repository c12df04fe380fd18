"""Datasets for densekd: COCO / LVIS-format detection data (YOLO txt folders and Pascal VOC XML
converted to it), semantic-segmentation data (COCO instances rendered to masks, mask folders),
the embedded synthetic long-tail set, albumentations pipelines, MixUp / CutMix and training samplers.

``densekd.data`` imports nothing from the rest of densekd except the leaf modules
``densekd.core.weighting`` (repeat factors, for the samplers) and ``densekd._names`` (error wording).
"""

from densekd.data.coco import CocoDetectionDataset, collate_detection
from densekd.data.conversion import ConvertedDataset
from densekd.data.long_tail import (
    FREQUENCY_THRESHOLDS,
    LVIS_FREQUENCIES,
    class_counts_from_labels,
    lvis_frequency,
    lvis_frequency_of_counts,
    repeat_factors,
)
from densekd.data.mixing import MixedDetectionDataset, cutmix, mixup
from densekd.data.samplers import (
    SAMPLERS,
    ClassAwareSampler,
    RandomSampler,
    RepeatFactorSampler,
    build_sampler,
)
from densekd.data.segmentation import (
    IGNORE_INDEX,
    VOC_COCO_CATEGORY_NAMES,
    MaskFolderDataset,
    SemanticSegmentationDataset,
    collate_segmentation,
)
from densekd.data.segmentation_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationTransform,
    build_segmentation_transforms,
)
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
    plan_split,
    render_image,
    train_image_targets,
    val_image_targets,
)
from densekd.data.transforms import DetectionTransform, build_detection_transforms
from densekd.data.validation import BadDatasetError, DatasetFileNotFoundError, DatasetReport, validate_coco_file
from densekd.data.voc import voc_class_names, voc_to_coco
from densekd.data.yolo import yolo_class_names, yolo_to_coco

__all__ = [
    "CocoDetectionDataset",
    "collate_detection",
    "BadDatasetError",
    "DatasetFileNotFoundError",
    "DatasetReport",
    "validate_coco_file",
    "ConvertedDataset",
    "yolo_to_coco",
    "yolo_class_names",
    "voc_to_coco",
    "voc_class_names",
    "DetectionTransform",
    "build_detection_transforms",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MaskFolderDataset",
    "SegmentationTransform",
    "SemanticSegmentationDataset",
    "VOC_COCO_CATEGORY_NAMES",
    "build_segmentation_transforms",
    "collate_segmentation",
    "MixedDetectionDataset",
    "mixup",
    "cutmix",
    "SAMPLERS",
    "RandomSampler",
    "RepeatFactorSampler",
    "ClassAwareSampler",
    "build_sampler",
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
    "FREQUENCY_THRESHOLDS",
    "LVIS_FREQUENCIES",
    "lvis_frequency",
    "lvis_frequency_of_counts",
    "class_counts_from_labels",
    "repeat_factors",
    "plan_split",
    "render_image",
    "train_image_targets",
    "val_image_targets",
]
