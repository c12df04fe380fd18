"""What a training phase reports: loss means over a logging window, printed, appended to a
JSONL log and (when ``torch.utils.tensorboard`` imports) written as TensorBoard scalars."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class Progress:
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
            f"lr {lr:.2e}  {session_seconds_per_iteration:.2f}s/it  eta {format_seconds(eta)}{skipped}",
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


def truncate_log(log_path: Path, last_iteration: int) -> None:
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
