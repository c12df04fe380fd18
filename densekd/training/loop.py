"""The training loop: :func:`run_training` runs one resumable phase (a :class:`TrainingJob`).

It builds the optimizer, LR schedule and data loader, checkpoints atomically
(:mod:`~densekd.training.checkpoints`), resumes bitwise-exactly (``num_workers=0``, CPU),
stops cleanly on SIGINT/SIGTERM (:mod:`~densekd.training.interrupts`), skips non-finite steps
(:mod:`~densekd.training.nonfinite`), checks its output folder before training
(:mod:`~densekd.training.output_folder`) and runs under ``torchrun``
(:mod:`~densekd.training.distributed`). No model-specific code.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoints import (
    CHECKPOINT_FORMAT,
    check_resumable,
    load_phase_checkpoint,
    resume_settings,
    save_checkpoint,
    set_rng_state,
)
from .distributed import (
    any_rank,
    barrier,
    data_parallel,
    gathered_rng_states,
    rank_and_world_size,
    share_rank0_buffers,
    unwrap,
)
from .interrupts import StopRequest, TrainingInterrupted
from .job import TrainingJob, check_job
from .nonfinite import BufferSnapshot, NonFiniteGuard, agree_across_ranks
from .optim import build_lr_lambda, build_optimizer, trainable_parameters
from .output_folder import check_checkpoint_folder, checkpoint_bytes
from .progress import Progress, truncate_log
from .step import loader_seed, to_device, training_step


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
    * Non-finite steps (:mod:`densekd.training.nonfinite`): a step whose loss entries or gradient norm
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
    check_job(job)
    phase = _Phase(job)
    state = phase.checkpoint_to_resume() if resume else None
    if state is not None and state["finished"]:
        return phase.finished_earlier(state)
    phase.prepare(state)
    phase.train(rng=state["rng"][phase.rank] if state is not None else None)
    share_rank0_buffers(phase.model)
    return phase.summary()


class _Phase:
    """The state of one :func:`run_training` call: model, optimizer, schedule, position in the
    data, logs, and the checkpoint that holds them all."""

    def __init__(self, job: TrainingJob) -> None:
        self.job, self.optim = job, job.optim
        self.rank, self.world_size = rank_and_world_size()
        self.main = self.rank == 0
        self.model = unwrap(job.model)
        parameter = next(self.model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        if self.optim.amp and self.device.type != "cuda":
            raise ValueError(f"amp needs a CUDA device, but the model is on {self.device}; set optim.amp=false.")
        output_dir = Path(job.output_dir)
        self.output_dir = output_dir
        self.path = output_dir / f"{job.name}.ckpt"
        self.log_path = output_dir / f"{job.name}.jsonl"
        self.settings = resume_settings(self.optim, job.batch_size, self.world_size)
        self.iteration, self.epoch, self.consumed, self.previous_seconds = 0, 0, 0, 0.0

    # --- before training ---------------------------------------------------------------------
    def checkpoint_to_resume(self) -> Optional[dict[str, Any]]:
        """The phase's checkpoint, checked against this run's settings; None if there is none."""
        if not self.path.exists():
            return None
        state = load_phase_checkpoint(self.path)
        check_resumable(self.path, state, self.settings)
        return state

    def finished_earlier(self, state: dict[str, Any]) -> dict[str, Any]:
        self.model.load_state_dict(state["model"])
        if self.main:
            print(f"  {self.job.name}: finished earlier ({self.path}); loaded its weights", flush=True)
        return state["summary"]

    def prepare(self, state: Optional[dict[str, Any]]) -> None:
        """Optimizer, schedule, guard and logs, restored from ``state`` when resuming."""
        self.parameters = trainable_parameters(self.model)
        if self.main:
            for stale in self.output_dir.glob(f".{self.path.name}.*.tmp"):  # left by a kill during a checkpoint write
                stale.unlink(missing_ok=True)
        estimate = checkpoint_bytes(self.model, self.parameters, self.optim.optimizer)
        check_checkpoint_folder(self.path, estimate, self.main, self.device)  # before any step
        self.optimizer = build_optimizer(self.parameters, self.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, build_lr_lambda(self.optim))
        self.nonfinite = NonFiniteGuard(self.optim.max_nonfinite_steps)
        if state is not None:
            self._restore(state)
        self.progress = Progress(
            self.optim.iterations, self.job.log_every, self.log_path, "a" if state is not None else "w",
            self.output_dir / "tensorboard" / self.job.name, self.iteration, enabled=self.main,
        )  # fmt: skip
        if state is not None:
            self.progress.load_state_dict(state["progress"])

    def _restore(self, state: dict[str, Any]) -> None:
        self.nonfinite.load_state_dict(state.get("nonfinite"))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration, self.epoch = int(state["iteration"]), int(state["epoch"])
        self.consumed = int(state["samples_in_epoch"])
        self.previous_seconds = float(state["seconds"])
        if self.main:
            truncate_log(self.log_path, self.iteration)
            print(f"  {self.job.name}: resuming from {self.path} at iteration {self.iteration}/{self.optim.iterations}", flush=True)

    # --- training ------------------------------------------------------------------------------
    def train(self, rng: Optional[dict[str, Any]]) -> None:
        """Epochs until ``optim.iterations`` steps are done; ``rng`` (a resumed run's RNG states)
        is set last, right before the first step."""
        job = self.job
        self.train_model = data_parallel(self.model, self.device)
        self.loader_generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            job.dataset, batch_size=job.batch_size, sampler=job.sampler, num_workers=job.num_workers,
            collate_fn=job.collate_fn, drop_last=True, generator=self.loader_generator,
            pin_memory=self.device.type == "cuda",
        )  # fmt: skip
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.optim.amp else contextlib.nullcontext
        self.stop = StopRequest()
        self.session_start, self.session_start_iteration = time.perf_counter(), self.iteration
        if rng is not None:
            set_rng_state(rng)
        self.train_model.train()
        self.buffers = BufferSnapshot(self.model)
        self.hooked_iteration = -1
        self.stop.install()
        try:
            while self.iteration < self.optim.iterations:
                yielded = self._epoch()
                if self.iteration >= self.optim.iterations:
                    break
                if not yielded and self.consumed == 0:
                    raise ValueError(
                        f"The data loader yields no batch: {len(job.sampler)} samples per epoch on this rank, "
                        f"batch_size {job.batch_size} with drop_last. Use a smaller batch_size or more data."
                    )
                self.epoch, self.consumed = self.epoch + 1, 0
        finally:
            self.stop.restore()
            self.progress.close()

    def _epoch(self) -> bool:
        """Steps through the rest of the epoch (or until the last step); whether a batch came."""
        job = self.job
        job.sampler.set_epoch(self.epoch)
        if self.consumed:
            job.sampler.skip(self.consumed)
        for hook in job.epoch_hooks:
            hook(self.epoch)
        self.loader_generator.manual_seed(loader_seed(job.sampler, self.epoch))
        batches = iter(self.loader)
        yielded = False
        while True:
            if self.hooked_iteration != self.iteration:  # before the batch is loaded, once per step
                for hook in job.iteration_hooks:
                    hook(self.iteration)
                self.hooked_iteration = self.iteration
            try:
                images, targets = next(batches)
            except StopIteration:
                return yielded
            yielded = True
            if self._step(images, targets):
                return yielded

    def _step(self, images: Any, targets: Any) -> bool:
        """One optimizer step, its log line and checkpoint; True once the phase is finished."""
        images, targets = to_device((images, targets), self.device)
        self.buffers.take()
        loss_dict, loss, bad = training_step(
            self.train_model, images, targets, self.optimizer, self.scheduler, self.parameters,
            self.optim.clip_grad_norm, self.autocast, lambda entries: agree_across_ranks(entries, self.device),
        )  # fmt: skip
        self.iteration += 1
        self.consumed += self.job.batch_size
        self._record(loss_dict, loss, bad)
        finished = self.iteration == self.optim.iterations
        interrupted = any_rank(self.stop.signum is not None, self.device)  # all ranks stop after the same step
        if finished or interrupted or self.nonfinite.should_stop or self.iteration % self.job.checkpoint_every == 0:
            self.checkpoint(finished)
        if self.nonfinite.should_stop:  # every rank agreed on every skip, so all stop here
            raise self.nonfinite.stop_error(self.job.name, self.iteration, self.optim.iterations, self.path)
        if interrupted and not finished:
            raise TrainingInterrupted(
                f"{self.job.name}: stopped by {self.stop.signal_name} at iteration {self.iteration}/{self.optim.iterations}; "
                f"checkpoint saved to {self.path}. Run the same command again with resume (e.g. --resume) to continue.",
                self.path, self.iteration, self.stop.signal_name,
            )  # fmt: skip
        return finished

    def _record(self, loss_dict: dict[str, torch.Tensor], loss: torch.Tensor, bad: dict[str, float]) -> None:
        iteration, total = self.iteration, self.optim.iterations
        if bad:  # skipped: no update, and the batch leaves no trace in the running statistics
            self.buffers.restore()
            self.nonfinite.skipped_step(iteration, bad)
            self.progress.note(self.nonfinite.skip_line(iteration, total, bad), self.nonfinite.skip_record(iteration, bad))
        else:
            self.nonfinite.good_step()
            self.progress.add(loss_dict, loss)
        session_rate = (time.perf_counter() - self.session_start) / (iteration - self.session_start_iteration)
        last_terms = None if bad else getattr(self.model, "last_terms", None)
        lr = self.optimizer.param_groups[0]["lr"]
        self.progress.maybe_log(iteration, lr, self.elapsed(), session_rate, last_terms, self.nonfinite.total)

    # --- checkpoint and summary ---------------------------------------------------------------
    def elapsed(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.session_start

    def summary(self) -> dict[str, Any]:
        seconds = self.elapsed()
        return {
            "iterations": self.optim.iterations,
            "seconds": seconds,
            "seconds_per_iteration": seconds / self.optim.iterations,
            "final_losses": self.progress.final_losses,
            **self.nonfinite.summary(),
        }

    def checkpoint(self, finished: bool) -> None:
        rng_states = gathered_rng_states()  # collective: every rank calls checkpoint()
        if self.main:
            save_checkpoint(
                self.path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "iteration": self.iteration,
                    "epoch": self.epoch,
                    "samples_in_epoch": self.consumed,
                    "rng": rng_states,
                    "progress": self.progress.state_dict(),
                    "nonfinite": self.nonfinite.state_dict(),
                    "seconds": self.elapsed(),
                    "finished": finished,
                    "summary": self.summary() if finished else None,
                    "name": self.job.name,
                    **self.settings,
                },
            )
        barrier()
