"""The output folder is checked before any step (creatable, writable, room for the checkpoint),
and a checkpoint write that fails half-way (a full disk) keeps the previous checkpoint."""
import collections
import errno
import os

import pytest
import torch
from training_job import tiny_job

import densekd.training.output_folder as output_checks
from densekd.training import CheckpointWriteError, OutputFolderError, run_training, save_checkpoint
from densekd.training.checkpoints import CheckpointLoadError
from densekd.training.output_folder import bytes_needed, check_output_folder, checkpoint_bytes


def regressor_job(out, iterations=6, **settings):
    job = tiny_job(out, iterations=iterations, model="regressor", **settings)
    job.iteration_hooks.append(lambda i: job.steps_started.append(i))
    job.steps_started = []
    return job


def test_an_output_folder_that_cannot_be_created_is_refused_before_any_step(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    job = regressor_job(tmp_path / "a_file" / "run")
    folder = tmp_path / "a_file" / "run"
    with pytest.raises(OutputFolderError, match=rf"Cannot create the output folder {folder}: .*--output"):
        run_training(job)
    assert job.steps_started == []


def test_too_little_free_space_is_refused_with_bytes_needed_and_free(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output_checks.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 5000, 5000))
    job = regressor_job(tmp_path)
    with pytest.raises(OutputFolderError) as refused:
        run_training(job)
    needed = 2 * checkpoint_bytes(job.model, list(job.model.parameters()), "adamw")  # nothing to replace yet
    message = str(refused.value)
    assert f"Not enough free space in {tmp_path}" in message and f"({needed} bytes)" in message
    assert "only 4.9 KiB (5000 bytes) are free" in message and "another disk" in message
    assert job.steps_started == [] and not (tmp_path / "run.ckpt").exists()


def test_checkpoint_estimate_covers_the_real_checkpoint(tmp_path):
    job = regressor_job(tmp_path, iterations=2)
    run_training(job)
    actual = (tmp_path / "run.ckpt").stat().st_size
    estimate = checkpoint_bytes(job.model, list(job.model.parameters()), "adamw")
    assert actual <= estimate <= actual + (2 << 20)  # the estimate's margin is 1 MiB
    # Replacing that checkpoint needs room for one more copy only.
    assert bytes_needed({tmp_path / "run.ckpt": actual}) == actual


def test_a_folder_that_refuses_writes_is_named(tmp_path, monkeypatch):
    def read_only(fd):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(output_checks.os, "fsync", read_only)
    with pytest.raises(OutputFolderError, match=rf"Cannot write to the output folder {tmp_path}: \[Errno 30\] Read-only"):
        check_output_folder(tmp_path, 0)
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


class _FullDisk:
    """A real file that fails with ENOSPC once ``budget`` bytes are written."""

    def __init__(self, file, budget):
        self.file, self.budget, self.written = file, budget, 0

    def write(self, data):
        self.written += memoryview(data).nbytes
        if self.written > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):  # flush, fileno, close
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_checkpoint_write_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    reference = regressor_job(tmp_path / "reference")
    run_training(reference)

    fdopen, writes = os.fdopen, []

    def filling_fdopen(fd, mode="r", *args, **kwargs):
        file = fdopen(fd, mode, *args, **kwargs)
        if mode == "wb":
            writes.append(fd)
            if len(writes) == 2:  # the disk fills up during the second checkpoint
                return _FullDisk(file, budget=1000)
        return file

    monkeypatch.setattr(os, "fdopen", filling_fdopen)
    job = regressor_job(tmp_path / "run", checkpoint_every=2)
    path = tmp_path / "run" / "run.ckpt"
    with pytest.raises(CheckpointWriteError) as failed:
        run_training(job)
    assert str(failed.value).startswith(f"Could not write the checkpoint {path}: [Errno 28] No space left on device.")
    assert "The previous checkpoint there is intact" in str(failed.value) and failed.value.errno == errno.ENOSPC
    assert torch.load(path, weights_only=True)["iteration"] == 2
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []

    monkeypatch.setattr(os, "fdopen", fdopen)  # space freed: resuming ends where an uninterrupted run ends
    resumed = regressor_job(tmp_path / "run", checkpoint_every=2)
    run_training(resumed, resume=True)
    assert resumed.steps_started == [2, 3, 4, 5]
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_save_checkpoint_names_a_folder_it_cannot_create(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(CheckpointWriteError, match=rf"Could not write the checkpoint {tmp_path / 'a_file' / 'x.pth'}: "):
        save_checkpoint(tmp_path / "a_file" / "x.pth", {"w": torch.ones(1)})


def test_a_corrupt_checkpoint_refuses_to_resume_and_names_the_file_and_the_fix(tmp_path):
    job = regressor_job(tmp_path, iterations=2)
    run_training(job)
    path = tmp_path / "run.ckpt"
    path.write_bytes(path.read_bytes()[:2000])  # cut short, e.g. copied from a disk that filled up
    with pytest.raises(CheckpointLoadError) as refused:
        run_training(regressor_job(tmp_path, iterations=4), resume=True)
    message = str(refused.value)
    assert message.startswith(f"Cannot resume: {path} cannot be read as a PyTorch checkpoint")
    assert f"delete {path} or pick another output directory" in message
