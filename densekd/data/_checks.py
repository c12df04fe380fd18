"""Argument checks shared by the seeded, epoch-driven data components (samplers,
transforms, mixing), so they reject bad input with one wording."""
from __future__ import annotations

from typing import Any

import numpy as np


def checked_seed(seed: Any) -> int:
    """A non-negative int seed, or ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def checked_epoch(epoch: Any) -> int:
    """A non-negative epoch index, or ValueError."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return int(epoch)
