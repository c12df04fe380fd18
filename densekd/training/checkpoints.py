"""Checkpoint files of a training phase: written atomically and durably, read back with
tensors only, and checked against the settings of the run that resumes them. Every global RNG
state travels with a checkpoint as plain data, so a resumed run continues bit for bit."""
from __future__ import annotations

import dataclasses
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .output_folder import CheckpointWriteError

CHECKPOINT_FORMAT = 1


class CheckpointLoadError(ValueError):
    """A checkpoint file that cannot be loaded into the model; the message says why and what to do."""


def load_tensors_only(path: Path):
    """``torch.load(weights_only=True)``, with its refusals and read errors said plainly."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointLoadError(
            f"{path} contains a pickled Python object{what}, not only tensors and plain containers. densekd loads "
            "checkpoints with torch.load(weights_only=True), so that opening a file cannot run code. Save the "
            "weights alone (torch.save(model.state_dict(), path)); if you trust the file, extract its state_dict "
            "once with torch.load(path, weights_only=False) and save that."
        ) from error
    except (RuntimeError, EOFError, KeyError) as error:  # not a zip archive, cut short, corrupted
        raise CheckpointLoadError(
            f"{path} cannot be read as a PyTorch checkpoint ({str(error).splitlines()[0]}): the file is truncated, "
            "corrupted or not a checkpoint. Use a complete copy (densekd's own checkpoints are written atomically)."
        ) from error


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


def load_phase_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = load_tensors_only(path)
    except CheckpointLoadError as error:
        raise CheckpointLoadError(
            f"Cannot resume: {error} To train from the start instead, delete {path} or pick another output directory."
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a run_training checkpoint (format {CHECKPOINT_FORMAT}); delete it or pick another output directory.")
    return state


def resume_settings(optim: Any, batch_size: int, world_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the schedule and the per-rank sample count
    (not the non-finite step limit, which a resumed run may raise)."""
    optim = dataclasses.asdict(optim)
    optim.pop("max_nonfinite_steps")
    return {"optim": optim, "batch_size": batch_size, "world_size": world_size}


def check_resumable(path: Path, state: dict[str, Any], settings: dict[str, Any]) -> None:
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


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
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


def load_weights(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load a state_dict, or a densekd training checkpoint (``{"model": state_dict, ...}``, also
    of a :class:`~densekd.SegmentationTraining`, whose model's keys start with ``model.``), with
    ``weights_only=True`` and ``strict=True``; a mismatch names the missing and the unexpected
    keys on one line each. Files holding pickled objects, and unreadable files, raise
    :class:`CheckpointLoadError` with what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    state = load_tensors_only(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    expected = model.state_dict()
    if state and all(key.startswith("model.") for key in state) and not any(key.startswith("model.") for key in expected):
        state = {key[len("model.") :]: value for key, value in state.items()}  # a SegmentationTraining's checkpoint
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [key for key in expected if key in state and expected[key].shape != state[key].shape]
    if missing or unexpected or mismatched:
        raise CheckpointLoadError(
            f"{path} does not fit {type(model).__name__} (another architecture or class count?)\n"
            f"  missing keys ({len(missing)}): {', '.join(missing[:8])}\n"
            f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}\n"
            f"  shape mismatches ({len(mismatched)}): {', '.join(mismatched[:8])}"
        )
    model.load_state_dict(state, strict=True)
    return model
