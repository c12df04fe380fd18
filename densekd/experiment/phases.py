"""From an :class:`~densekd.experiment.config.ExperimentConfig` to trained models: data, teachers,
baseline and distilled students. ``tools/train_det.py`` and ``tools/train_seg.py`` are thin CLIs
over this module.

Every phase trains through :func:`densekd.training.loop.run_training`, so each one checkpoints
and resumes on its own; the teacher lives in the cache (``$DENSEKD_CACHE/teachers``)
keyed by everything that determines it, and is reused by later runs. With
``distill.teacher_cache: true`` the teachers' outputs over the training set are cached too
(``$DENSEKD_CACHE/teacher_outputs``, :mod:`densekd.detection.teacher_cache`) and the distilled student
trains offline.

The phases are task-agnostic: a :class:`Task` says how to build a model, its training data
and what trains it (:data:`densekd.detection.experiment.DETECTION`,
:data:`densekd.segmentation.experiment.SEGMENTATION`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .._cache import cache_root
from ..data import BadDatasetError, SyntheticConfig, config_hash, ensure_synthetic_dataset
from ..training import TrainingJob, run_training
from .config import (
    ConfigError,
    ExperimentConfig,
    ModelSection,
    OptimSection,
    build_terms,
    distiller_kwargs,
    parse_distillation_config,
)


@dataclass
class DataFiles:
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path
    fingerprint: str  # identifies the training data for the teacher cache


def data_files(config: ExperimentConfig) -> DataFiles:
    """The annotation files and image folders the experiment trains and evaluates on."""
    section = config.data
    if section.dataset == "synthetic":
        synthetic = SyntheticConfig(**section.synthetic)
        paths = ensure_synthetic_dataset(config=synthetic)
        return DataFiles(paths.train_ann, paths.train_images, paths.val_ann, paths.val_images, config_hash(synthetic))
    if section.dataset != "coco":
        raise ValueError(f"data.dataset must be 'synthetic' or 'coco', got {section.dataset!r}.")
    files = {key: getattr(section, key) for key in ("train_ann", "train_images", "val_ann", "val_images")}
    missing = [key for key, value in files.items() if not value or not Path(value).exists()]
    if missing:
        raise FileNotFoundError(
            f"data.dataset is 'coco' but {', '.join(f'data.{k}={files[k]!r}' for k in missing)} "
            "do not exist; pass --train-ann, --train-images, --val-ann and --val-images."
        )
    stat = Path(files["train_ann"]).stat()
    fingerprint = hashlib.sha256(f"{Path(files['train_ann']).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return DataFiles(*(Path(files[k]) for k in ("train_ann", "train_images", "val_ann", "val_images")), fingerprint)


@dataclass
class TrainingData:
    """One phase's training set with its sampler and the hooks that drive augmentation."""

    dataset: torch.utils.data.Dataset
    annotations: Any  # the unwrapped dataset (CocoDetectionDataset, ...): classes, counts, labels
    sampler: Any
    epoch_hooks: list[Callable[[int], None]] = field(default_factory=list)
    iteration_hooks: list[Callable[[int], None]] = field(default_factory=list)


def _job(
    config: ExperimentConfig, model: nn.Module, data: TrainingData, optim: OptimSection, output: Path, name: str, task: "Task"
) -> TrainingJob:
    return TrainingJob(
        model=model, dataset=data.dataset, sampler=data.sampler, batch_size=config.data.batch_size,
        optim=optim, output_dir=output, name=name, checkpoint_every=config.checkpoint_every,
        log_every=config.log_every, num_workers=config.data.num_workers, collate_fn=task.collate_fn,
        epoch_hooks=data.epoch_hooks, iteration_hooks=data.iteration_hooks,
    )  # fmt: skip


def build_distiller(
    distiller_class: type,
    student: nn.Module,
    teachers: list[nn.Module],
    config: ExperimentConfig,
    image_counts: Sequence[int],
    annotation_counts: Sequence[int],
) -> nn.Module:
    """A ``distiller_class`` (:class:`Distiller`, :class:`~densekd.SegmentationDistiller`) with the
    experiment's terms, or its self-distillation form; the counts feed per-class term weights."""
    iterations = config.optim.iterations
    distillation = parse_distillation_config(config.distill or {"terms": []})
    terms = build_terms(distillation, image_counts, annotation_counts, total_iters=iterations)
    kwargs = distiller_kwargs(distillation, total_iters=iterations)
    if "logit_resolution" in kwargs and "logit_resolution" not in inspect.signature(distiller_class).parameters:
        raise ConfigError(
            f"distill.logit_resolution is a segmentation setting; {distiller_class.__name__} compares the heads' own "
            "outputs. Remove it from this experiment's distill section."
        )
    kwargs["label_smoothing"] = config.optim.label_smoothing
    probe = dict(probe_size=config.student.image_size)
    if "mode" in kwargs:
        return distiller_class.self_distillation(student, terms, **kwargs, **probe)
    return distiller_class(student, teachers, terms, **kwargs, **probe)


@dataclass(frozen=True)
class Task:
    """What differs between experiments of two tasks; the phases themselves are shared.

    Attributes:
        build_model: ``(model section, K) -> plain torchvision model`` (weights or checkpoint loaded).
        training_data: ``(config, files, iterations, rank, world_size, augment) -> TrainingData``.
        trainer: ``plain model -> module whose train-mode forward returns the loss dict`` (the
            teacher's and the baseline's training); detection models do that themselves.
        distiller: ``(student, teachers, config, training data) -> distiller`` for the distilled student.
        collate_fn: batches samples into the ``(inputs, targets)`` the trainers take.
        teacher_outputs: ``(distiller, dataset, folder, dtype, batch size) -> caches`` of the
            teachers' outputs over the training set (``distill.teacher_cache``), built in
            ``folder`` or found there; None where the task has no such cache.
    """

    build_model: Callable[[ModelSection, int], nn.Module]
    training_data: Callable[..., TrainingData]
    trainer: Callable[[nn.Module], nn.Module]
    distiller: Callable[[nn.Module, list[nn.Module], ExperimentConfig, TrainingData], nn.Module]
    collate_fn: Callable[[list], Any]
    teacher_outputs: Optional[Callable[..., list]] = None


def check_training_set(config: ExperimentConfig, files: Any, rank: int = 0, world_size: int = 1, *, task: Task) -> None:
    """Before any phase trains: the training set (after ``data.skip_bad``) fills at least one batch
    of ``data.batch_size`` on every process. The loader drops an incomplete batch, so a smaller
    set would train on nothing; this raises :class:`~densekd.data.BadDatasetError` (one line)
    saying what to change instead."""
    data = task.training_data(config, files, config.optim.iterations, rank, world_size, augment=False)
    samples, batch_size = len(data.sampler), config.data.batch_size
    if samples >= batch_size:
        return
    source = getattr(files, "train_ann", None) or getattr(files, "train_labels", None) or "the training set"
    per_process = f"{samples} sample(s) per epoch" + (f" on each of {world_size} processes" if world_size > 1 else "")
    fix = "add training images"
    if samples:
        fewer = " or use fewer processes" if world_size > 1 else ""
        fix = f"set data.batch_size to at most {samples} (--set data.batch_size={samples}){fewer}, or {fix}"
    raise BadDatasetError(
        f"{source}: the training set has {len(data.dataset)} image(s), {per_process}: not one full batch of "
        f"data.batch_size={batch_size} (incomplete batches are dropped, so nothing would train); {fix}."
    )


def check_terms_pair(config: ExperimentConfig, files: Any, num_classes: int, *, task: Task) -> None:
    """Before any phase trains: the experiment's terms pair between its student and teachers.
    Builds them untrained (the global RNG is left as it was) and constructs the distiller, so a
    recipe that cannot run on these models (an output one of them lacks, anchors that differ,
    another label space) is refused now with the distiller's message, as a
    :class:`~densekd.experiment.config.ConfigError`, not after the teacher has trained."""
    if not config.distill:
        return
    with torch.random.fork_rng(devices=[]):
        sections = [config.teacher, *config.extra_teachers]
        teachers = [task.build_model(section, num_classes) for section in sections]
        student = task.build_model(config.student, num_classes)
        data = task.training_data(config, files, config.optim.iterations, augment=False)
        try:
            task.distiller(student, teachers, config, data)
        except (ValueError, TypeError) as error:
            names = ", ".join(section.name for section in sections)
            raise ConfigError(
                f"recipe {config.recipe or '(distill section)'}: its terms cannot distil {config.student.name} from {names}: "
                f"{error}"
            ) from error


def teacher_cache_key(config: ExperimentConfig, section: ModelSection, seed: int, files: DataFiles, num_classes: int) -> str:
    """Everything that determines a teacher trained here (not the non-finite step limit: a
    teacher that finished is the same whatever it was)."""
    optim = {k: v for k, v in dataclasses.asdict(config.teacher_optim).items() if k != "max_nonfinite_steps"}
    payload = {
        "model": dataclasses.asdict(section), "optim": optim,
        "seed": seed, "data": files.fingerprint, "num_classes": num_classes,
        "batch_size": config.data.batch_size, "sampler": config.data.sampler,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def prepare_teachers(
    config: ExperimentConfig,
    files: DataFiles,
    num_classes: int,
    rank: int = 0,
    world_size: int = 1,
    retrain: bool = False,
    *,
    task: Task,
) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    """The experiment's teachers: loaded from their checkpoints, or trained once (without the
    student's augmentation) and cached. Extra teacher i trains with seed ``seed + 1 + i``."""
    sections = [config.teacher] + list(config.extra_teachers)
    teachers, infos = [], []
    for index, section in enumerate(sections):
        seed = config.seed + index if index == 0 else config.seed + 1 + index
        torch.manual_seed(seed)
        model = task.build_model(section, num_classes)
        if section.checkpoint or section.weights:
            teachers.append(model)
            infos.append({"checkpoint": section.checkpoint} if section.checkpoint else {"weights": section.weights})
            continue
        key = teacher_cache_key(config, section, seed, files, num_classes)
        folder = cache_root() / "teachers" / f"{section.name}-{key}"
        phase_config = dataclasses.replace(config, seed=seed)
        data = task.training_data(phase_config, files, config.teacher_optim.iterations, rank, world_size, augment=False)
        job = _job(phase_config, task.trainer(model), data, config.teacher_optim, folder, "teacher", task)
        summary = run_training(job, resume=not retrain)
        teachers.append(model)
        infos.append({"cache": str(folder), "train": summary})
    return teachers, infos


def train_student(
    config: ExperimentConfig,
    files: DataFiles,
    num_classes: int,
    teachers: Optional[list[nn.Module]],
    output: Path,
    name: str,
    resume: bool,
    rank: int = 0,
    world_size: int = 1,
    *,
    task: Task,
    trained: Optional[Callable[[nn.Module], None]] = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a student from the seed's initial weights: plainly (``teachers=None``) or distilled
    with the experiment's terms. Baseline and distilled students share initial weights, the
    data pipeline (augmentation, mixing, sampler) and the batches, so the distillation terms
    (and the recipe's label smoothing) are the only difference. Returns the plain torchvision
    student and the training summary; ``trained``, if given, is first called with the trainer
    or distiller that trained it (e.g. to evaluate a self-distillation teacher)."""
    torch.manual_seed(config.seed + 1000)  # identical initial weights for every student
    student = task.build_model(config.student, num_classes)
    data = task.training_data(config, files, config.optim.iterations, rank, world_size)
    model = task.trainer(student) if teachers is None else task.distiller(student, teachers, config, data)
    distillation = parse_distillation_config(config.distill) if teachers is not None and config.distill else None
    caches = None
    if distillation is not None and distillation.teacher_cache:
        if task.teacher_outputs is None or not hasattr(model, "use_teacher_cache"):
            raise ValueError(
                f"distill.teacher_cache is supported for detection distillers only, not {type(model).__name__}; "
                "set distill.teacher_cache=false to distill online."
            )
        caches = _teacher_caches(task, model, data.dataset, distillation.teacher_cache_dtype, config.data.batch_size, rank)
        model.use_teacher_cache(caches)
    summary = run_training(_job(config, model, data, config.optim, output, name, task), resume=resume)
    if trained is not None:
        trained(model)
    if caches is not None:
        summary["teacher_cache"] = [
            {"folder": str(c.folder), "size_bytes": c.size_bytes, "build_seconds": c.build_seconds, "built_now": c.built}
            for c in caches
        ]
    return student, summary


def _teacher_caches(task: Task, distiller: nn.Module, dataset, dtype: str, batch_size: int, rank: int) -> list:
    """The teachers' outputs over the training set, from ``$DENSEKD_CACHE/teacher_outputs``
    (built there once, by rank 0, and reused by every later student and seed)."""
    root = cache_root() / "teacher_outputs"
    if rank == 0:
        caches = task.teacher_outputs(distiller, dataset, root, dtype, batch_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        caches = task.teacher_outputs(distiller, dataset, root, dtype, batch_size)  # finds rank 0's
    return caches
