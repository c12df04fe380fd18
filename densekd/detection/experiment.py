"""Detection experiments: the :class:`~densekd.experiment.phases.Task` behind ``tools/train_det.py``.

The phases (teacher trained once and cached, baseline and distilled students with identical
initial weights and batches) are :mod:`densekd.experiment.phases`'s; this module says what they
do for a torchvision detector:

* models: :func:`densekd.detection.models.build_detector` (or a torchvision builder with
  pretrained weights), with a checkpoint loaded when the section names one;
* training data: a COCO-format dataset with the experiment's augmentation, MixUp/CutMix and
  sampler;
* the teacher and the baseline train themselves (a detector returns its loss dict), the
  distilled student trains through :class:`~densekd.Distiller`;
* ``distill.teacher_cache``: the teachers' outputs over the training set, cached once
  (:mod:`densekd.detection.teacher_cache`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.schedules import build_schedule
from ..data import CocoDetectionDataset, collate_detection
from ..data.mixing import MixedDetectionDataset
from ..data.samplers import build_sampler
from ..data.transforms import build_detection_transforms
from ..experiment.config import ExperimentConfig, ModelSection, resolve_schedule
from ..experiment.phases import DataFiles, Task, TrainingData, build_distiller
from ..training.checkpoints import load_weights
from .distiller import Distiller
from .models import build_detector, build_pretrained
from .teacher_cache import teacher_caches_for


def training_data(
    config: ExperimentConfig, files: DataFiles, iterations: int, rank: int = 0, world_size: int = 1, augment: bool = True
) -> TrainingData:
    """Training set, sampler and augmentation for a phase of ``iterations`` steps."""
    section = config.augment
    transform = None
    iteration_hooks: list[Callable[[int], None]] = []
    epoch_hooks: list[Callable[[int], None]] = []
    if augment and (section.hflip or section.scale_jitter or section.color_jitter):
        strength_at = build_schedule(resolve_schedule(section.strength, iterations, "augment.strength"))
        transform = build_detection_transforms(
            strength=strength_at(0),
            hflip=section.hflip,
            scale_jitter=section.scale_jitter,
            color_jitter=section.color_jitter,
            seed=config.seed,
        )
        epoch_hooks.append(transform.set_epoch)
        iteration_hooks.append(lambda iteration: transform.set_strength(strength_at(iteration)))
    annotations = CocoDetectionDataset(
        files.train_images, files.train_ann, transforms=transform, skip_bad=config.data.skip_bad
    )
    dataset: torch.utils.data.Dataset = annotations
    if augment and (section.mixup_prob or section.cutmix_prob):
        dataset = MixedDetectionDataset(
            annotations, mixup_prob=section.mixup_prob, mixup_alpha=section.mixup_alpha,
            cutmix_prob=section.cutmix_prob, seed=config.seed,
        )  # fmt: skip
        epoch_hooks.append(dataset.set_epoch)
    sampler = build_sampler(
        config.data.sampler, annotations, seed=config.seed, num_replicas=world_size, rank=rank,
        rfs_threshold=config.data.rfs_threshold,
    )  # fmt: skip
    return TrainingData(dataset, annotations, sampler, epoch_hooks, iteration_hooks)


def _model(section: ModelSection, num_classes: int) -> nn.Module:
    if section.weights:
        if section.checkpoint:
            raise ValueError(f"{section.name}: give either weights or checkpoint, not both.")
        return build_pretrained(section.name, section.weights)
    model = build_detector(section.name, num_classes, section.image_size)
    if section.checkpoint:
        load_weights(model, section.checkpoint)
    return model


def _detection_distiller(
    student: nn.Module, teachers: list[nn.Module], config: ExperimentConfig, data: TrainingData
) -> nn.Module:
    counts = data.annotations
    return build_distiller(Distiller, student, teachers, config, counts.image_counts, counts.annotation_counts)


DETECTION = Task(
    build_model=_model, training_data=training_data, trainer=lambda model: model,
    distiller=_detection_distiller, collate_fn=collate_detection, teacher_outputs=teacher_caches_for,
)  # fmt: skip
