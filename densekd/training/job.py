"""A training phase as plain settings: the model, its data, the optimiser and where it writes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .._names import unknown_name_message
from ..data.coco import collate_detection
from .optim import LR_SCHEDULES, OPTIMIZERS, OptimSettings


@dataclass
class TrainingJob:
    """One resumable training phase.

    Args:
        model: a torchvision detector or a :class:`~densekd.detection.distiller.Distiller` (a loss dict in
            train mode), on the device to train on.
        dataset: yields ``(image (3, H, W) tensor, target dict)``.
        sampler: a :mod:`densekd.data.samplers` sampler (``set_epoch``/``skip``/``len``),
            already sharded for this rank.
        batch_size: images per step on this rank.
        optim: optimizer and LR schedule settings.
        output_dir: where ``<name>.ckpt`` and ``<name>.jsonl`` live.
        name: the phase's name.
        checkpoint_every: steps between checkpoints (one is also written at the end).
        log_every: steps between progress lines / JSONL records (and at the end).
        num_workers: DataLoader worker processes (resume is bitwise-exact with 0).
        collate_fn: samples -> the ``(inputs, targets)`` pair a step passes as
            ``model(inputs, targets)``: ``collate_detection`` (lists of images and target dicts)
            or e.g. ``collate_segmentation`` (stacked images (N, 3, H, W) and masks (N, H, W)).
        epoch_hooks: ``f(epoch)`` called at each epoch start (and at the resumed epoch).
        iteration_hooks: ``f(iteration)`` called before each step, before its batch is loaded,
            with the number of steps already done (0-based), e.g. an augmentation-strength
            schedule. Worker processes (``num_workers > 0``) hold copies of the dataset made
            when each epoch's iterator starts, so hooks that change the data reach the batches
            only with ``num_workers=0``.
    """

    model: nn.Module
    dataset: torch.utils.data.Dataset
    sampler: Any
    batch_size: int
    optim: OptimSettings
    output_dir: Path
    name: str
    checkpoint_every: int = 100
    log_every: int = 50
    num_workers: int = 0
    collate_fn: Callable[[list], Any] = collate_detection
    epoch_hooks: list[Callable[[int], None]] = dataclasses.field(default_factory=list)
    iteration_hooks: list[Callable[[int], None]] = dataclasses.field(default_factory=list)


def check_job(job: TrainingJob) -> None:
    for field in ("batch_size", "checkpoint_every", "log_every"):
        if getattr(job, field) < 1:
            raise ValueError(f"TrainingJob.{field} must be >= 1, got {getattr(job, field)}")
    if job.num_workers < 0:
        raise ValueError(f"TrainingJob.num_workers must be >= 0, got {job.num_workers}")
    if job.optim.iterations < 1:
        raise ValueError(f"optim.iterations must be >= 1, got {job.optim.iterations}")
    if job.optim.optimizer not in OPTIMIZERS:
        raise ValueError(unknown_name_message("optimizer", job.optim.optimizer, OPTIMIZERS))
    if job.optim.lr_schedule not in LR_SCHEDULES:
        raise ValueError(unknown_name_message("lr_schedule", job.optim.lr_schedule, LR_SCHEDULES))
