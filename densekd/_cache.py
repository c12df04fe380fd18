"""Where densekd keeps what it builds once (teachers, their outputs, the embedded dataset,
converted annotation files): ``$DENSEKD_CACHE``, else ``~/.cache/densekd``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    cache = os.environ.get("DENSEKD_CACHE")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "densekd"
