"""Stopping a training phase cleanly: SIGINT/SIGTERM end the current step, a checkpoint is
written, and :class:`TrainingInterrupted` says how to resume."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

INTERRUPTED_EXIT_CODE = 130  # what a shell reports for a process ended by Ctrl-C
# A repeated SIGINT/SIGTERM aborts at once, unless it comes this soon after the first: torchrun
# forwards the terminal's Ctrl-C to workers that already received it from the terminal.
_REPEAT_SIGNAL_GRACE_S = 2.0


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a step; a checkpoint of that step is on disk.

    A CLI should print the message (one line) and exit with :data:`INTERRUPTED_EXIT_CODE`."""

    exit_code = INTERRUPTED_EXIT_CODE

    def __init__(self, message: str, checkpoint: Path, iteration: int, signal_name: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.iteration = iteration
        self.signal_name = signal_name


class StopRequest:
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

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
