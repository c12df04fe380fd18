"""Reading checkpoint files safely: tensors and plain containers only, every refusal and read
error said with what to do."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch


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
