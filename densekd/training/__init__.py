"""The training loop and what it stands on: one resumable, interruptible, data-parallel phase
(:func:`run_training` over a :class:`TrainingJob`), its checkpoints, optimizer and logs."""
from .checkpoints import CheckpointLoadError, load_tensors_only, save_checkpoint
from .distributed import init_distributed, is_main_process
from .interrupts import INTERRUPTED_EXIT_CODE, TrainingInterrupted
from .job import TrainingJob
from .loop import run_training
from .nonfinite import NonFiniteTrainingError
from .optim import LR_SCHEDULES, OPTIMIZERS, OptimSettings, build_lr_lambda, build_optimizer, warmup_cosine, warmup_step
from .output_folder import CheckpointWriteError, OutputFolderError

__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "CheckpointLoadError",
    "CheckpointWriteError",
    "NonFiniteTrainingError",
    "OptimSettings",
    "OutputFolderError",
    "TrainingInterrupted",
    "TrainingJob",
    "build_lr_lambda",
    "build_optimizer",
    "init_distributed",
    "is_main_process",
    "load_tensors_only",
    "run_training",
    "save_checkpoint",
    "warmup_cosine",
    "warmup_step",
]
