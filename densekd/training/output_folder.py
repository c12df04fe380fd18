"""Is the output folder usable for a whole run? Checked at start-up, before any training, so a
long run does not die at its first checkpoint: the folder can be created, a probe file can be
written, fsynced and removed, and the free space covers the checkpoints the run will write
(each one's model and optimizer state, plus one temporary copy during the atomic write).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "CheckpointWriteError",
    "OutputFolderError",
    "bytes_needed",
    "check_checkpoint_folder",
    "check_output_folder",
    "checkpoint_bytes",
    "format_bytes",
    "state_bytes",
]

# Slots per trainable parameter that the optimizer keeps (AdamW: exp_avg, exp_avg_sq; SGD: momentum).
_OPTIMIZER_SLOTS = {"adamw": 2, "sgd": 1}
_MARGIN_BYTES = 1 << 20  # RNG states, the logging window, settings, zip headers


class OutputFolderError(OSError):
    """The output folder cannot be created or written, or has too little free space."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is intact."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        previous = "The previous checkpoint there is intact." if path.exists() else "No earlier checkpoint is there."
        super().__init__(
            f"Could not write the checkpoint {path}: {cause}. {previous} Free some space in {path.parent} "
            "(or fix the folder), then run the same command again with resume (e.g. --resume) to continue "
            "from the last checkpoint."
        )
        self.errno = getattr(cause, "errno", None)  # (not .filename: OSError would print it instead of the message)
        self.path = path
        self.cause = cause


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def state_bytes(module: nn.Module) -> int:
    """Bytes of the module's ``state_dict`` tensors (works on the meta device, without memory)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if torch.is_tensor(t))


def checkpoint_bytes(model: nn.Module, parameters: Sequence[nn.Parameter] = (), optimizer: str = "adamw") -> int:
    """Estimated size of a run_training checkpoint: the model's state, the optimizer's slots
    for ``parameters`` (the trainable ones; none: a file of weights alone) and a small margin."""
    slots = _OPTIMIZER_SLOTS.get(optimizer, 2)
    return state_bytes(model) + slots * sum(p.numel() * p.element_size() for p in parameters) + _MARGIN_BYTES


def bytes_needed(planned: Mapping[Path, int]) -> int:
    """Free bytes needed to write files of the planned sizes: what each adds over the file it
    replaces (if any), plus one temporary copy of the largest (atomic writes, one at a time)."""
    if not planned:
        return 0
    growth = sum(max(0, size - (path.stat().st_size if path.is_file() else 0)) for path, size in planned.items())
    return growth + max(planned.values())


def check_output_folder(folder: Union[str, os.PathLike], needed: int, what: str = "checkpoints") -> None:
    """Create ``folder``, write + fsync + remove a probe file there, and check that ``needed``
    bytes are free; :class:`OutputFolderError` says which check failed and what to do."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputFolderError(
            f"Cannot create the output folder {folder}: {error}. Choose another output folder (e.g. --output) "
            "or fix the path or its permissions."
        ) from error
    probe = folder / f".densekd-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as file:
            file.write(b"densekd write probe\n")
            file.flush()
            os.fsync(file.fileno())
        probe.unlink()
    except OSError as error:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        raise OutputFolderError(
            f"Cannot write to the output folder {folder}: {error}. Choose another output folder (e.g. --output), "
            "fix its permissions, or free some space."
        ) from error
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputFolderError(
            f"Not enough free space in {folder}: {what} need about {format_bytes(needed)} ({needed} bytes), "
            f"only {format_bytes(free)} ({free} bytes) are free. Free some space there or choose an output "
            "folder on another disk (e.g. --output)."
        )


def check_checkpoint_folder(checkpoint: Path, estimate: int, main: bool, device: torch.device) -> None:
    """:func:`check_output_folder` for one checkpoint of about ``estimate`` bytes, run by the
    main rank (the one that writes); under torch.distributed every rank raises if it fails."""
    error: Optional[OutputFolderError] = None
    if main:
        try:
            check_output_folder(checkpoint.parent, bytes_needed({checkpoint: estimate}), f"checkpoints of {checkpoint.name}")
        except OutputFolderError as caught:
            error = caught
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([0.0 if error is None else 1.0], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and error is None:
            error = OutputFolderError(f"Rank 0 cannot write checkpoints to {checkpoint.parent}; see its error message.")
    if error is not None:
        raise error
