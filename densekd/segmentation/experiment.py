"""Semantic-segmentation experiments: the :class:`~densekd.experiment.phases.Task` behind ``tools/train_seg.py``.

The phases (teacher trained once and cached, baseline and distilled students with identical
initial weights and batches) are :mod:`densekd.experiment.phases`'s; this module says what they
train on and with:

* data: the same ``data`` section as detection, rendered to semantic masks
  (:class:`~densekd.data.SemanticSegmentationDataset`: ``synthetic`` or ``coco``, optionally
  restricted to ``data.categories``), or ``mask_folder`` (:class:`~densekd.data.MaskFolderDataset`
  under ``data.mask_root``); one image size for teacher and students, since the data pipeline
  resizes (:mod:`densekd.data.segmentation_transforms`);
* models: :func:`~densekd.segmentation.models.build_segmenter` names;
* training: :class:`~densekd.SegmentationTraining` (cross-entropy + auxiliary head) for the
  teacher and the baseline, :class:`~densekd.SegmentationDistiller` with the experiment's terms
  for the distilled student; per-class term weights come from pixel counts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..core.schedules import build_schedule
from ..data import (
    MaskFolderDataset,
    SegmentationTransform,
    SemanticSegmentationDataset,
    build_segmentation_transforms,
    collate_segmentation,
)
from ..data.samplers import build_sampler
from ..experiment.config import ConfigError, ExperimentConfig, ModelSection, resolve_schedule
from ..experiment.phases import Task, TrainingData, build_distiller, data_files
from ..training.checkpoints import load_weights
from .distiller import SegmentationDistiller
from .models import build_pretrained_segmenter, build_segmenter
from .trainer import SegmentationTraining

__all__ = [
    "SEGMENTATION",
    "SegmentationFiles",
    "build_segmentation_model",
    "segmentation_data_files",
    "segmentation_dataset",
    "segmentation_training_data",
]

SegmentationDataset = Union[SemanticSegmentationDataset, MaskFolderDataset]


@dataclass
class SegmentationFiles:
    """Where an experiment's segmentation data lives.

    ``train_labels`` / ``val_labels`` are COCO-format annotation files (``synthetic``, ``coco``)
    or mask folders (``mask_folder``); ``class_names`` comes with mask folders."""

    dataset: str
    image_size: int
    train_images: Path
    train_labels: Path
    val_images: Path
    val_labels: Path
    categories: Any = None
    class_names: Optional[list[str]] = None
    fingerprint: str = ""  # identifies the training data (and its rendering) for the teacher cache


def _folder_fingerprint(*folders: Path) -> str:
    """Names, sizes and modification times of every file: changes when the data does."""
    listing = [
        (str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns)
        for folder in folders
        for path in sorted(folder.iterdir())
        if path.is_file()
    ]
    return hashlib.sha256(json.dumps([str(f.resolve()) for f in folders] + listing).encode()).hexdigest()[:12]


def _read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; a mask folder names its K foreground classes in classes.txt, one per line, "
            "in label order (mask value 1 is the first line)"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} names no class; write the K foreground class names, one per line")
    return names


def segmentation_data_files(config: ExperimentConfig) -> SegmentationFiles:
    """The experiment's segmentation data; checks that teacher and students share one image size."""
    sizes = {config.teacher.image_size, config.student.image_size} | {s.image_size for s in config.extra_teachers}
    if len(sizes) > 1:
        raise ConfigError(
            f"segmentation resizes the data once for every model, but the model sections ask for image sizes "
            f"{sorted(sizes)}; give teacher, extra_teachers and student the same image_size."
        )
    section = config.data
    image_size = config.student.image_size
    if section.dataset == "mask_folder":
        if not section.mask_root:
            raise ConfigError("data.dataset is 'mask_folder' but data.mask_root is not set; pass --mask-folder ROOT.")
        root = Path(section.mask_root)
        folders = {f"{split}_{kind}": root / split / kind for split in ("train", "val") for kind in ("images", "masks")}
        missing = [str(path) for path in folders.values() if not path.is_dir()]
        if missing:
            raise FileNotFoundError(
                f"mask folder {root} lacks {', '.join(missing)}; expected <root>/classes.txt and "
                "<root>/{train,val}/{images,masks}/ with masks named like their images (<stem>.png)"
            )
        if section.categories is not None:
            raise ConfigError("data.categories selects COCO categories; a mask folder's classes come from classes.txt.")
        names = _read_class_names(root / "classes.txt")
        fingerprint = _folder_fingerprint(folders["train_images"], folders["train_masks"])
        return SegmentationFiles(
            "mask_folder", image_size, folders["train_images"], folders["train_masks"], folders["val_images"],
            folders["val_masks"], class_names=names, fingerprint=f"{fingerprint}:{'|'.join(names)}",
        )  # fmt: skip
    files = data_files(config)  # synthetic or coco: COCO-format instance annotations
    payload = {"semantic_masks": files.fingerprint, "categories": section.categories}
    return SegmentationFiles(
        section.dataset, image_size, files.train_images, files.train_ann, files.val_images, files.val_ann,
        categories=section.categories, fingerprint=hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:12],
    )  # fmt: skip


def segmentation_dataset(files: SegmentationFiles, split: str, transforms: Optional[SegmentationTransform]) -> SegmentationDataset:
    """The ``split`` ("train" or "val") dataset of ``files``."""
    images, labels = (files.train_images, files.train_labels) if split == "train" else (files.val_images, files.val_labels)
    if files.dataset == "mask_folder":
        return MaskFolderDataset(images, labels, files.class_names or [], transforms=transforms)
    return SemanticSegmentationDataset(images, labels, transforms=transforms, categories=files.categories)


def segmentation_training_data(
    config: ExperimentConfig, files: SegmentationFiles, iterations: int, rank: int = 0, world_size: int = 1, augment: bool = True
) -> TrainingData:
    """Training set, sampler and augmentation for a phase of ``iterations`` steps (the
    ``augment`` section's flip, zoom and colour jitter with its strength schedule)."""
    section = config.augment
    if section.mixup_prob or section.cutmix_prob:
        raise ConfigError(
            "augment.mixup_prob / cutmix_prob mix detection targets; densekd has no segmentation MixUp/CutMix. Set them to 0."
        )
    augmenting = augment and bool(section.hflip or section.scale_jitter or section.color_jitter)
    strength_at = build_schedule(resolve_schedule(section.strength, iterations, "augment.strength"))
    transform = build_segmentation_transforms(
        files.image_size, strength=strength_at(0) if augmenting else 0.0, hflip=section.hflip,
        scale_jitter=section.scale_jitter, color_jitter=section.color_jitter, seed=config.seed,
    )  # fmt: skip
    dataset = segmentation_dataset(files, "train", transform)
    sampler = build_sampler(
        config.data.sampler, dataset, seed=config.seed, num_replicas=world_size, rank=rank,
        rfs_threshold=config.data.rfs_threshold,
    )  # fmt: skip
    iteration_hooks: list[Callable[[int], None]] = []
    if augmenting:
        iteration_hooks.append(lambda iteration: transform.set_strength(strength_at(iteration)))
    return TrainingData(dataset, dataset, sampler, [transform.set_epoch], iteration_hooks)


def build_segmentation_model(section: ModelSection, num_classes: int) -> nn.Module:
    """The section's segmentation model with K + 1 channels: from scratch, with torchvision
    weights (``weights``) or loaded from ``checkpoint``."""
    if section.weights:
        if section.checkpoint:
            raise ValueError(f"{section.name}: give either weights or checkpoint, not both.")
        return build_pretrained_segmenter(section.name, section.weights, num_classes)
    model = build_segmenter(section.name, num_classes)
    if section.checkpoint:
        load_weights(model, section.checkpoint)
    return model


def _segmentation_distiller(
    student: nn.Module, teachers: list[nn.Module], config: ExperimentConfig, data: TrainingData
) -> nn.Module:
    """A :class:`SegmentationDistiller` with the experiment's terms; a term's ``class_weights``
    (one per class channel, background included) come from the training set's pixel counts
    (image counts for ``lvis_groups``)."""
    counts = data.annotations
    return build_distiller(
        SegmentationDistiller, student, teachers, config, counts.channel_image_counts, counts.channel_pixel_counts
    )


SEGMENTATION = Task(
    build_model=build_segmentation_model,
    training_data=segmentation_training_data,
    trainer=lambda model: SegmentationTraining(model),
    distiller=_segmentation_distiller,
    collate_fn=collate_segmentation,
)


def validation_loader(files: SegmentationFiles, batch_size: int = 16, rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:
    """The val split at the experiment's image size, unaugmented; under ``world_size`` processes
    each rank gets every ``world_size``-th image (no padding: every image counts once)."""
    dataset = segmentation_dataset(files, "val", build_segmentation_transforms(files.image_size, strength=0.0))
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(shard, batch_size=batch_size, collate_fn=collate_segmentation)
