"""Training, evaluation and checkpointing loops; no model-specific code.

:func:`run_training` runs one resumable training phase (a :class:`TrainingJob`): it builds the
optimizer, LR schedule and data loader, checkpoints atomically, resumes bitwise-exactly
(``num_workers=0``, CPU), stops cleanly on SIGINT/SIGTERM, skips non-finite steps
(:mod:`densekd.nonfinite`), checks its output folder before training
(:mod:`densekd.output_checks`) and runs under ``torchrun`` (DistributedDataParallel).
``evaluate`` takes any detector that returns torchvision-style detections in eval mode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import tempfile
import threading
import time
import warnings
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._names import unknown_name_message
from .checkpoint_files import CheckpointLoadError, load_tensors_only
from .config import OptimSection
from .data.coco import collate_detection
from .evaluation import evaluate_coco, evaluate_lvis_style, to_coco_results
from .nonfinite import (
    BufferSnapshot,
    NonFiniteGuard,
    NonFiniteTrainingError,
    agree_across_ranks,
    gradient_norm,
    nonfinite_entries,
)
from .output_checks import CheckpointWriteError, OutputFolderError, check_checkpoint_folder, checkpoint_bytes

__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "CheckpointWriteError",
    "NonFiniteTrainingError",
    "OutputFolderError",
    "TrainingInterrupted",
    "TrainingJob",
    "build_lr_lambda",
    "build_optimizer",
    "evaluate",
    "init_distributed",
    "is_main_process",
    "run_training",
    "save_checkpoint",
    "warmup_cosine",
    "warmup_step",
]

COCO_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_COLUMNS = ("APr", "APc", "APf")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "step")
INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a process ended by Ctrl-C
CHECKPOINT_FORMAT = 1
# A repeated SIGINT/SIGTERM aborts at once, unless it comes this soon after the first: torchrun
# forwards the terminal's Ctrl-C to workers that already received it from the terminal.
_REPEAT_SIGNAL_GRACE_S = 2.0


# --- learning-rate schedules and optimizers -------------------------------------------------
def warmup_cosine(iterations: int, warmup_iters: int):
    """LR multiplier at step ``i``: linear 1/(w+1) -> 1 over ``warmup_iters``, then cosine 1 -> 0."""

    def factor(step: int) -> float:
        if step < warmup_iters:
            return (step + 1) / (warmup_iters + 1)
        progress = (step - warmup_iters) / max(1, iterations - warmup_iters)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_step(warmup_iters: int, milestones: Iterable[int], gamma: float):
    """LR multiplier at step ``i`` (steps done): linear 1/(w+1) -> 1 over ``warmup_iters``, times
    ``gamma`` for every milestone ``m <= i`` (as ``MultiStepLR``: from step ``m`` on)."""
    milestones = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        warm = (step + 1) / (warmup_iters + 1) if step < warmup_iters else 1.0
        return warm * gamma ** bisect_right(milestones, step)

    return factor


def build_lr_lambda(optim: OptimSection) -> Callable[[int], float]:
    """The LR multiplier of ``optim.lr_schedule`` ("cosine" or "step"), for ``LambdaLR``."""
    if optim.lr_schedule == "cosine":
        return warmup_cosine(optim.iterations, optim.warmup_iters)
    if optim.lr_schedule == "step":
        return warmup_step(optim.warmup_iters, optim.lr_milestones, optim.lr_gamma)
    raise ValueError(unknown_name_message("lr_schedule", optim.lr_schedule, LR_SCHEDULES))


def build_optimizer(parameters: list[nn.Parameter], optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW or SGD (with ``optim.momentum``) over ``parameters``."""
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    raise ValueError(unknown_name_message("optimizer", optim.optimizer, OPTIMIZERS))


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A Distiller's ``trainable_parameters()`` (student + connectors), else every parameter with grad."""
    if hasattr(model, "trainable_parameters"):
        return list(model.trainable_parameters())
    return [p for p in model.parameters() if p.requires_grad]


# --- one step, progress logging (shared by run_training and train) ----------------------------
def _training_step(
    model: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    parameters: list[nn.Parameter],
    clip_grad_norm: Optional[float],
    autocast: Callable[[], Any] = contextlib.nullcontext,
    agree: Callable[[dict[str, float]], dict[str, float]] = lambda entries: entries,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """Forward (under ``autocast``), backward, clip, then the optimizer step unless a loss entry
    or the gradient norm is not finite; the scheduler steps either way (see
    :mod:`densekd.nonfinite`). ``agree`` merges the ranks' verdicts under DDP. Returns
    ``(loss_dict, loss, nonfinite)``: ``nonfinite`` is empty for a step that was taken, else
    names the entries (or :data:`~densekd.nonfinite.GRADIENT`) that were not finite."""
    with autocast():
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # on every rank, finite or not: DDP all-reduces gradients inside backward
    if clip_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
    else:
        grad_norm = gradient_norm(parameters)
    nonfinite = agree(nonfinite_entries(loss_dict, loss, grad_norm))
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # the LR schedule follows the iteration, stepped or not
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()
    else:
        optimizer.step()
        scheduler.step()
    return loss_dict, loss, nonfinite


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class _Progress:
    """Loss means over a logging window: a one-line print, a JSONL record and (when
    ``torch.utils.tensorboard`` imports) TensorBoard scalars every ``log_every`` steps and at
    the last. ``enabled=False`` (non-main ranks) keeps the means but writes nothing."""

    def __init__(
        self,
        iterations: int,
        log_every: int,
        log_file: Union[str, os.PathLike, None],
        log_mode: str = "a",
        tensorboard_dir: Optional[Path] = None,
        first_iteration: int = 0,
        enabled: bool = True,
    ) -> None:
        self.iterations = iterations
        self.log_every = log_every
        self.enabled = enabled
        self.window: dict[str, float] = {}
        self.window_steps = 0
        self.final_losses: Optional[dict[str, float]] = None
        self.log = open(log_file, log_mode, encoding="utf-8") if enabled and log_file is not None else None
        self.writer = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(tensorboard_dir), purge_step=first_iteration + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"window": dict(self.window), "window_steps": self.window_steps, "final_losses": self.final_losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = {k: float(v) for k, v in state["window"].items()}
        self.window_steps = int(state["window_steps"])
        self.final_losses = state["final_losses"]

    def note(self, line: str, record: dict[str, Any]) -> None:
        """An event outside the logging window (a skipped step): printed and in the JSONL log."""
        if not self.enabled:
            return
        print(line, flush=True)
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def add(self, loss_dict: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        for name, value in loss_dict.items():
            self.window[name] = self.window.get(name, 0.0) + float(value.detach())
        self.window["loss"] = self.window.get("loss", 0.0) + float(loss.detach())
        self.window_steps += 1

    def maybe_log(
        self,
        iteration: int,
        lr: float,
        total_seconds: float,
        session_seconds_per_iteration: float,
        last_terms: Optional[dict[str, dict[str, torch.Tensor]]],
        skipped_steps: int = 0,
    ) -> None:
        """``iteration``: steps done (1-based number of the step just taken); ``skipped_steps``:
        non-finite steps skipped so far (the window's means leave them out)."""
        if iteration % self.log_every != 0 and iteration != self.iterations:
            return
        means = {name: total / max(self.window_steps, 1) for name, total in self.window.items()}
        self.final_losses, self.window, self.window_steps = means, {}, 0
        if not self.enabled:
            return
        eta = session_seconds_per_iteration * (self.iterations - iteration)
        kd = "".join(f" {k}={v:.4f}" for k, v in means.items() if k.startswith("kd_"))
        skipped = f"  skipped {skipped_steps}" if skipped_steps else ""
        print(
            f"  it {iteration:>5d}/{self.iterations}  loss {means.get('loss', float('nan')):.4f}{kd}  "
            f"lr {lr:.2e}  {session_seconds_per_iteration:.2f}s/it  eta {_format_seconds(eta)}{skipped}",
            flush=True,
        )
        record: dict[str, Any] = {
            "iteration": iteration, "lr": lr, "seconds": round(total_seconds, 3), "losses": means,
            "skipped_steps": skipped_steps,
        }  # fmt: skip
        if last_terms:
            record["kd_terms_last_step"] = {
                key: {"unscaled": float(v["unscaled"]), "weight": float(v["weight"])} for key, v in last_terms.items()
            }
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"loss/{name}", value, iteration)
            for key, term in (record.get("kd_terms_last_step") or {}).items():
                self.writer.add_scalar(f"unscaled/{key}", term["unscaled"], iteration)
            self.writer.add_scalar("lr", lr, iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.writer is not None:
            self.writer.close()


def evaluate(
    model: nn.Module, data_loader, dataset, category_frequency: Optional[Mapping[int, str]] = None
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Detect on every image of ``data_loader`` and score with COCO and LVIS-style metrics.

    Args:
        model: a detector returning torchvision detections (``boxes``, ``scores``, ``labels``
            with labels 1..K) in eval mode.
        data_loader: yields ``(images, targets)``; each target carries ``image_id``.
        dataset: a :class:`~densekd.data.CocoDetectionDataset` (``coco``, ``label_to_category_id``).
        category_frequency: category id -> LVIS group for APr / APc / APf, normally the training
            split's ``lvis_frequencies()``. Default: the file's ``frequency``; when the file has
            none either (plain COCO), APr / APc / APf are nan.

    Returns:
        ``(metrics, results, images_per_second)``: ``metrics`` holds AP, AP50, AP75, APs, APm,
        APl (pycocotools) and APr, APc, APf (LVIS-style), fractions in [0, 1], plus
        ``dropped_detections``: detections whose label has no category (e.g. an unused
        background channel), left out of the results; ``results`` the COCO result records;
        ``images_per_second`` the model's throughput (forward passes only).
    """
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    known = set(dataset.label_to_category_id)
    dropped = 0
    images_seen, model_seconds = 0, 0.0
    with torch.inference_mode():
        for images, targets in data_loader:
            start = time.perf_counter()
            predictions = model(images)
            model_seconds += time.perf_counter() - start
            images_seen += len(images)
            kept = []
            for prediction in predictions:
                valid = torch.tensor([int(label) in known for label in prediction["labels"]], dtype=torch.bool)
                dropped += int((~valid).sum())
                kept.append({key: prediction[key][valid] for key in ("boxes", "scores", "labels")})
            results += to_coco_results(kept, [t["image_id"] for t in targets], dataset.label_to_category_id)
    model.train(was_training)
    coco = evaluate_coco(dataset.coco, results)
    metrics: dict[str, Any] = {name: coco[name] for name in COCO_COLUMNS}
    if category_frequency is None and dataset.frequency_groups is None:
        metrics.update({name: math.nan for name in LVIS_COLUMNS})  # no groups to split by
    else:
        lvis = evaluate_lvis_style(dataset.coco.dataset, results, category_frequency=category_frequency)
        metrics.update({name: lvis[name] for name in LVIS_COLUMNS})
    metrics["dropped_detections"] = dropped
    metrics["per_class_ap"] = coco["per_class_ap"]  # category id -> AP (COCO .50:.95)
    return metrics, results, images_seen / max(model_seconds, 1e-9)


# --- distributed helpers -------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """``(rank, world_size)``. Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set)
    initialise the default process group -- NCCL with one GPU per local rank when CUDA is
    available, else gloo on CPU -- once; otherwise a no-op returning ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("Launched by torchrun, but this torch build has no torch.distributed.")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", init_method="env://")
    else:
        dist.init_process_group("gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True outside distributed training and on rank 0 inside it."""
    return not _distributed() or dist.get_rank() == 0


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --- checkpoints, RNG states ---------------------------------------------------------------
def save_checkpoint(path: Union[str, os.PathLike], state: dict[str, Any]) -> None:
    """``torch.save(state)`` atomically and durably: a temporary file in the same folder,
    fsynced, then ``os.replace``, so a crash never leaves a truncated checkpoint where a complete
    one is expected. A write that fails (e.g. a full disk) removes the temporary file, leaves
    the previous checkpoint as it was and raises :class:`CheckpointWriteError`, naming the path
    and the cause."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise CheckpointWriteError(path, error) from error
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        cause = _os_error_in(error)
        if cause is not None:  # torch.save reports a failed write as a RuntimeError around it
            raise CheckpointWriteError(path, cause) from error
        raise
    _fsync_folder(path.parent)  # the rename itself survives a power cut


def _os_error_in(error: BaseException) -> Optional[OSError]:
    """``error`` itself, or the exception it was raised from or during, if one is an OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: folders cannot be opened
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on folders; the data itself is synced
    finally:
        os.close(handle)


def _rng_state() -> dict[str, Any]:
    """Every global RNG as plain data that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),  # (5056,) uint8
        # The current device only: get_rng_state_all() would create a context on every GPU.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,) uint32 as int64
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))


def _gathered_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective under DDP)."""
    state = _rng_state()
    if not _distributed():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


# --- run_training ---------------------------------------------------------------------------
class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a step; a checkpoint of that step is on disk.

    A CLI should print the message (one line) and exit with :data:`INTERRUPTED_EXIT_CODE`."""

    exit_code = INTERRUPTED_EXIT_CODE

    def __init__(self, message: str, checkpoint: Path, iteration: int, signal_name: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.iteration = iteration
        self.signal_name = signal_name


@dataclass
class TrainingJob:
    """One resumable training phase.

    Args:
        model: a torchvision detector or a :class:`~densekd.distiller.Distiller` (a loss dict in
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
    optim: OptimSection
    output_dir: Path
    name: str
    checkpoint_every: int = 100
    log_every: int = 50
    num_workers: int = 0
    collate_fn: Callable[[list], Any] = collate_detection
    epoch_hooks: list[Callable[[int], None]] = dataclasses.field(default_factory=list)
    iteration_hooks: list[Callable[[int], None]] = dataclasses.field(default_factory=list)


class _StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads after each step (main thread only).
    A repeated signal, after a short grace period, aborts at once with KeyboardInterrupt."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.first_at = 0.0
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
        elif time.monotonic() - self.first_at > _REPEAT_SIGNAL_GRACE_S:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors, possibly inside lists, tuples and dicts (a detection batch's images and
    targets, a segmentation batch's stacked tensors), moved to ``device``; the rest as is."""
    if device.type == "cpu":
        return batch
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _check_job(job: TrainingJob) -> None:
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


def _resume_settings(job: TrainingJob, world_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the schedule and the per-rank sample count
    (not the non-finite step limit, which a resumed run may raise)."""
    optim = dataclasses.asdict(job.optim)
    optim.pop("max_nonfinite_steps")
    return {"optim": optim, "batch_size": job.batch_size, "world_size": world_size}


def _check_resumable(path: Path, state: dict[str, Any], settings: dict[str, Any]) -> None:
    stored = {"optim": state["optim"], "batch_size": state["batch_size"], "world_size": state["world_size"]}
    differences = [
        f"optim.{key}: {stored['optim'].get(key)!r} -> {settings['optim'].get(key)!r}"
        for key in sorted(set(stored["optim"]) | set(settings["optim"]))
        if stored["optim"].get(key) != settings["optim"].get(key)
    ]
    differences += [f"{key}: {stored[key]!r} -> {settings[key]!r}" for key in ("batch_size", "world_size") if stored[key] != settings[key]]
    if differences:
        raise ValueError(
            f"Cannot resume from {path}: it was written with different settings ({'; '.join(differences)}); "
            "continuing would silently change the LR schedule or the data order. Restore the original "
            "settings, or start over: delete the checkpoint or pick another output directory."
        )


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = load_tensors_only(path)
    except CheckpointLoadError as error:
        raise CheckpointLoadError(
            f"Cannot resume: {error} To train from the start instead, delete {path} or pick another output directory."
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a run_training checkpoint (format {CHECKPOINT_FORMAT}); delete it or pick another output directory.")
    return state


def _truncate_log(log_path: Path, last_iteration: int) -> None:
    """Drop JSONL records past the checkpoint (written by the run that was interrupted after it)."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["iteration"]) <= last_iteration:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _loader_seed(sampler: Any, epoch: int) -> int:
    """Seed of the loader's own generator (worker seeds), so the loader never draws from the
    global torch RNG: a resumed run must see the global RNG exactly as the checkpoint left it."""
    return (int(getattr(sampler, "seed", 0)) * 1_000_003 + epoch) % (2**63)


def run_training(job: TrainingJob, resume: bool = False) -> dict[str, Any]:
    """Train ``job.model`` for ``job.optim.iterations`` steps; checkpointed, resumable, interruptible.

    * Optimizer ``optim.optimizer`` ("adamw", "sgd") over ``trainable_parameters()`` (a
      Distiller) or the parameters with ``requires_grad``; LR: linear warm-up over
      ``warmup_iters``, then "cosine" to 0 or "step" (times ``lr_gamma`` at each of
      ``lr_milestones``); gradients clipped to ``clip_grad_norm`` unless None; ``amp``:
      bfloat16 autocast, CUDA only.
    * Data: a DataLoader over ``job.dataset`` with ``job.sampler`` (``drop_last``); at each epoch
      start ``sampler.set_epoch(epoch)`` and every epoch hook; before each step every iteration
      hook with the steps done so far.
    * Checkpoint ``<output_dir>/<name>.ckpt`` (atomic) every ``checkpoint_every`` steps, on
      SIGINT/SIGTERM and at the end: model, optimizer, scheduler, position (iteration, epoch,
      samples this rank consumed in the epoch), every RNG state of every rank, the logging
      window, the settings, and ``finished``. ``resume=True`` continues from it (nothing to
      resume: start from scratch; finished: load the weights and return the stored summary);
      different iterations / optimizer settings / batch size / world size are refused.
      Without ``resume`` an existing checkpoint is overwritten. Before any step, the output
      folder must be writable with room for the checkpoint (:class:`OutputFolderError`); a
      checkpoint write that fails raises :class:`CheckpointWriteError` and keeps the previous one.
    * SIGINT/SIGTERM (main thread): the current step finishes, a checkpoint is written, and
      :class:`TrainingInterrupted` is raised; the previous handlers are restored.
    * Non-finite steps (:mod:`densekd.nonfinite`): a step whose loss entries or gradient norm
      are NaN/inf is skipped (no update; the iteration and LR schedule advance), printed and
      logged with the entries' names; more than ``optim.max_nonfinite_steps`` in a row write a
      checkpoint of the last good weights and raise :class:`NonFiniteTrainingError`.
    * Logging (rank 0): a progress line every ``log_every`` steps and at the end, a JSONL record
      in ``<output_dir>/<name>.jsonl`` (records past a resumed checkpoint are dropped), and
      TensorBoard scalars under ``<output_dir>/tensorboard/<name>`` when tensorboard is installed.
    * Distributed (``torch.distributed`` initialised, see :func:`init_distributed`): the model is
      wrapped in DistributedDataParallel, ranks agree on stopping, rank 0 writes the files.

    Determinism: with ``num_workers=0`` an interrupted-and-resumed run ends with the same
    weights, bit for bit, as an uninterrupted one (same device, same thread count).

    Returns:
        ``{"iterations", "seconds", "seconds_per_iteration", "final_losses", "skipped_steps",
        "skipped_by_entry"}``: ``seconds`` counts every session; ``final_losses`` the loss means
        of the last logging window (this rank's, skipped steps left out); ``skipped_steps`` the
        non-finite steps skipped, ``skipped_by_entry`` how often each entry was non-finite.
    """
    _check_job(job)
    optim = job.optim
    distributed = _distributed()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main = rank == 0
    model = _unwrap(job.model)
    device = _model_device(model)
    if optim.amp and device.type != "cuda":
        raise ValueError(f"amp needs a CUDA device, but the model is on {device}; set optim.amp=false.")
    output_dir = Path(job.output_dir)
    path = output_dir / f"{job.name}.ckpt"
    log_path = output_dir / f"{job.name}.jsonl"
    settings = _resume_settings(job, world_size)

    state = _load_checkpoint(path) if resume and path.exists() else None
    if state is not None:
        _check_resumable(path, state, settings)
        if state["finished"]:
            model.load_state_dict(state["model"])
            if main:
                print(f"  {job.name}: finished earlier ({path}); loaded its weights", flush=True)
            return state["summary"]

    parameters = _trainable_parameters(model)
    if main:
        for stale in output_dir.glob(f".{path.name}.*.tmp"):  # left by a kill during a checkpoint write
            stale.unlink(missing_ok=True)
    check_checkpoint_folder(path, checkpoint_bytes(model, parameters, optim.optimizer), main, device)  # before any step
    optimizer = build_optimizer(parameters, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(optim))
    iteration, epoch, consumed, previous_seconds = 0, 0, 0, 0.0
    nonfinite = NonFiniteGuard(optim.max_nonfinite_steps)
    if state is not None:
        nonfinite.load_state_dict(state.get("nonfinite"))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        iteration, epoch, consumed = int(state["iteration"]), int(state["epoch"]), int(state["samples_in_epoch"])
        previous_seconds = float(state["seconds"])
    if main and state is not None:
        _truncate_log(log_path, iteration)
        print(f"  {job.name}: resuming from {path} at iteration {iteration}/{optim.iterations}", flush=True)
    progress = _Progress(
        optim.iterations, job.log_every, log_path, "a" if state is not None else "w",
        output_dir / "tensorboard" / job.name, iteration, enabled=main,
    )  # fmt: skip
    if state is not None:
        progress.load_state_dict(state["progress"])

    train_model: nn.Module = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # A Distiller's connectors get no gradient while its kd warm-up lasts.
            find_unused_parameters=getattr(model, "warmup_iters", 0) > 0,
        )
    loader_generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        job.dataset,
        batch_size=job.batch_size,
        sampler=job.sampler,
        num_workers=job.num_workers,
        collate_fn=job.collate_fn,
        drop_last=True,
        generator=loader_generator,
        pin_memory=device.type == "cuda",
    )
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if optim.amp else contextlib.nullcontext
    stop = _StopRequest()
    session_start, session_start_iteration = time.perf_counter(), iteration

    def elapsed() -> float:
        return previous_seconds + time.perf_counter() - session_start

    def summary() -> dict[str, Any]:
        seconds = elapsed()
        return {
            "iterations": optim.iterations,
            "seconds": seconds,
            "seconds_per_iteration": seconds / optim.iterations,
            "final_losses": progress.final_losses,
            **nonfinite.summary(),
        }

    def checkpoint(finished: bool) -> None:
        rng_states = _gathered_rng_states()  # collective: every rank calls checkpoint()
        if main:
            save_checkpoint(
                path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "iteration": iteration,
                    "epoch": epoch,
                    "samples_in_epoch": consumed,
                    "rng": rng_states,
                    "progress": progress.state_dict(),
                    "nonfinite": nonfinite.state_dict(),
                    "seconds": elapsed(),
                    "finished": finished,
                    "summary": summary() if finished else None,
                    "name": job.name,
                    **settings,
                },
            )
        if distributed:
            dist.barrier()

    def stop_requested() -> bool:
        if not distributed:
            return stop.signum is not None
        flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # all ranks stop after the same step
        return bool(flag.item())

    if state is not None:
        _set_rng_state(state["rng"][rank])  # last, right before the first step
    train_model.train()
    buffers = BufferSnapshot(model)
    hooked_iteration = -1
    stop.install()
    try:
        while iteration < optim.iterations:
            job.sampler.set_epoch(epoch)
            if consumed:
                job.sampler.skip(consumed)
            for hook in job.epoch_hooks:
                hook(epoch)
            loader_generator.manual_seed(_loader_seed(job.sampler, epoch))
            batches = iter(loader)
            yielded = False
            while True:
                if hooked_iteration != iteration:  # before the batch is loaded, once per step
                    for hook in job.iteration_hooks:
                        hook(iteration)
                    hooked_iteration = iteration
                try:
                    images, targets = next(batches)
                except StopIteration:
                    break
                yielded = True
                images, targets = _to_device((images, targets), device)
                buffers.take()
                loss_dict, loss, bad = _training_step(
                    train_model, images, targets, optimizer, scheduler, parameters, optim.clip_grad_norm, autocast,
                    lambda entries: agree_across_ranks(entries, device),
                )  # fmt: skip
                iteration += 1
                consumed += job.batch_size
                if bad:  # skipped: no update, and the batch leaves no trace in the running statistics
                    buffers.restore()
                    nonfinite.skipped_step(iteration, bad)
                    line = nonfinite.skip_line(iteration, optim.iterations, bad)
                    progress.note(line, nonfinite.skip_record(iteration, bad))
                else:
                    nonfinite.good_step()
                    progress.add(loss_dict, loss)
                session_rate = (time.perf_counter() - session_start) / (iteration - session_start_iteration)
                last_terms = None if bad else getattr(model, "last_terms", None)
                progress.maybe_log(
                    iteration, optimizer.param_groups[0]["lr"], elapsed(), session_rate, last_terms, nonfinite.total
                )
                finished = iteration == optim.iterations
                interrupted = stop_requested()
                if finished or interrupted or nonfinite.should_stop or iteration % job.checkpoint_every == 0:
                    checkpoint(finished)
                if nonfinite.should_stop:  # every rank agreed on every skip, so all stop here
                    raise nonfinite.stop_error(job.name, iteration, optim.iterations, path)
                if finished:
                    break
                if interrupted:
                    name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal on another rank"
                    raise TrainingInterrupted(
                        f"{job.name}: stopped by {name} at iteration {iteration}/{optim.iterations}; checkpoint "
                        f"saved to {path}. Run the same command again with resume (e.g. --resume) to continue.",
                        path, iteration, name,
                    )  # fmt: skip
            if iteration >= optim.iterations:
                break
            if not yielded and consumed == 0:
                raise ValueError(
                    f"The data loader yields no batch: {len(job.sampler)} samples per epoch on this rank, "
                    f"batch_size {job.batch_size} with drop_last. Use a smaller batch_size or more data."
                )
            epoch, consumed = epoch + 1, 0
    finally:
        stop.restore()
        progress.close()
    if distributed:
        # DDP syncs buffers (BatchNorm statistics) at the start of a forward; after the last one
        # each rank holds its own. Return rank 0's, the ones in the checkpoint, on every rank.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return summary()
