"""In-process checks of run_training's settings, refusals and signal handling (tiny FCOS, one thread)."""
import json
import os
import signal

import pytest
import torch
from training_job import TinyDetectionData, tiny_job

from densekd.training import (
    OptimSettings,
    TrainingInterrupted,
    build_lr_lambda,
    build_optimizer,
    init_distributed,
    is_main_process,
    run_training,
    warmup_step,
)


def lrs(out) -> list[float]:
    return [json.loads(line)["lr"] for line in (out / "run.jsonl").read_text().splitlines()]


def test_warmup_step_schedule_values():
    factor = warmup_step(warmup_iters=2, milestones=[5, 3], gamma=0.1)
    assert [factor(i) for i in range(7)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert build_lr_lambda(OptimSettings(lr_schedule="step", warmup_iters=0, lr_milestones=[2]))(2) == pytest.approx(0.1)


def test_sgd_with_step_schedule_trains_and_checkpoints_momentum(tmp_path):
    job = tiny_job(tmp_path, iterations=4, checkpoint_every=10, log_every=1, optimizer="sgd", lr=0.01,
                   lr_schedule="step", lr_milestones=[2, 3], lr_gamma=0.5, warmup_iters=0)  # fmt: skip
    summary = run_training(job)
    assert summary["iterations"] == 4 and set(summary["final_losses"]) >= {"loss", "classification"}
    # the lr logged after step i is the one step i+1 uses: 0.01 * factor(i)
    assert lrs(tmp_path) == pytest.approx([0.01, 0.005, 0.0025, 0.0025])
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert state["finished"] and state["iteration"] == 4 and state["optim"]["optimizer"] == "sgd"
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    assert isinstance(build_optimizer([torch.nn.Parameter(torch.ones(1))], job.optim), torch.optim.SGD)


def test_unknown_optimizer_and_schedule_list_valid_names(tmp_path):
    with pytest.raises(ValueError, match="valid names: adamw, sgd. Did you mean 'adamw'"):
        run_training(tiny_job(tmp_path, optimizer="adamW"))
    with pytest.raises(ValueError, match="valid names: cosine, step"):
        run_training(tiny_job(tmp_path, lr_schedule="linear"))


def test_amp_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="amp needs a CUDA device.*set optim.amp=false"):
        run_training(tiny_job(tmp_path, amp=True))


def test_resume_refuses_changed_iterations_and_optimizer_settings(tmp_path):
    run_training(tiny_job(tmp_path, iterations=2, checkpoint_every=1))
    with pytest.raises(ValueError, match=r"optim.iterations: 2 -> 3.*delete the checkpoint"):
        run_training(tiny_job(tmp_path, iterations=3), resume=True)
    with pytest.raises(ValueError, match=r"optim.lr: 0.001 -> 0.002"):
        run_training(tiny_job(tmp_path, iterations=2, lr=2e-3), resume=True)


def test_resume_without_checkpoint_starts_from_scratch(tmp_path):
    seen = []
    job = tiny_job(tmp_path, iterations=2, checkpoint_every=5)
    job.iteration_hooks.append(seen.append)
    job.epoch_hooks.append(lambda epoch: seen.append(f"epoch {epoch}"))
    run_training(job, resume=True)
    assert seen == ["epoch 0", 0, 1]
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["finished"]


def test_sigint_finishes_the_step_checkpoints_and_restores_handlers(tmp_path):
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    job = tiny_job(tmp_path, iterations=6, checkpoint_every=100)
    job.iteration_hooks.append(lambda i: os.kill(os.getpid(), signal.SIGINT) if i == 2 else None)
    with pytest.raises(TrainingInterrupted, match=r"SIGINT at iteration 3/6.*resume") as interrupted:
        run_training(job)
    assert interrupted.value.exit_code == 130 and interrupted.value.iteration == 3
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert state["iteration"] == 3 and not state["finished"] and state["samples_in_epoch"] == 6
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    seen = []
    resumed = tiny_job(tmp_path, iterations=6, checkpoint_every=100)
    resumed.iteration_hooks.append(seen.append)
    assert run_training(resumed, resume=True)["iterations"] == 6
    assert seen == [3, 4, 5]  # iteration hooks see the global iteration


def test_empty_loader_is_an_error(tmp_path):
    job = tiny_job(tmp_path)
    job.batch_size = 32  # 16 images, drop_last
    with pytest.raises(ValueError, match="yields no batch"):
        run_training(job)


def test_init_distributed_is_a_noop_outside_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed() == (0, 1)
    assert is_main_process()


class RecordingData(TinyDetectionData):
    """Records, per loaded item, the value the iteration hook last set."""

    def __init__(self):
        super().__init__()
        self.current, self.loaded = None, []

    def __getitem__(self, index):
        self.loaded.append(self.current)
        return super().__getitem__(index)


def test_iteration_hooks_run_before_their_batch_is_loaded(tmp_path):
    job = tiny_job(tmp_path, iterations=10, checkpoint_every=100)  # 8 steps per epoch: crosses an epoch
    job.dataset = data = RecordingData()
    job.iteration_hooks.append(lambda i: setattr(data, "current", i))
    run_training(job)
    assert data.loaded == [i for i in range(10) for _ in range(2)]  # batch_size 2


def test_tensorboard_scalars_when_it_imports(tmp_path, monkeypatch):
    """tensorboard is optional (not installed here): a stand-in module receives the scalars."""
    import sys
    import types

    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    run_training(tiny_job(tmp_path, iterations=2, log_every=1, checkpoint_every=10))
    assert ("loss/loss", 1) in scalars and ("lr", 2) in scalars and ("loss/classification", 2) in scalars
