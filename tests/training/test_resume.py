"""Kill-and-resume ends bitwise where an uninterrupted run ends (CPU, num_workers=0, one thread).

Every run is a subprocess of ``training_job.py`` with ``torch.set_num_threads(1)``, so the reference
and the resumed runs use the same kernels and thread count."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HELPER = Path(__file__).with_name("training_job.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_job(out: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HELPER), "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout, env=ENV,
    )  # fmt: skip


def assert_same_state(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def log_records(out: Path) -> list[dict]:
    """The JSONL records without their wall-clock field."""
    records = [json.loads(line) for line in (out / "run.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "seconds"} for record in records]


def checkpoint_iteration(out: Path) -> int:
    """The iteration of the checkpoint in ``out`` (0 without one)."""
    if not (out / "run.ckpt").exists():
        return 0
    return int(torch.load(out / "run.ckpt", weights_only=True)["iteration"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 12-iteration runs, per model kind: (output dir, final state_dict)."""
    cache = {}

    def get(model: str):
        if model not in cache:
            out = tmp_path_factory.mktemp(f"reference_{model}")
            done = run_job(out, "--model", model, "--dump", str(out / "final.pt"))
            assert done.returncode == 0, done.stderr
            cache[model] = (out, torch.load(out / "final.pt", weights_only=True))
        return cache[model]

    return get


@pytest.mark.parametrize(
    "model, kill, resumed_from",
    [
        ("fcos", ["--kill-at", "5"], 4),  # mid-epoch (8 steps per epoch)
        ("fcos", ["--kill-at", "10"], 8),  # resumed exactly at the epoch boundary
        ("ema", ["--kill-at", "10"], 8),  # a Distiller: EMA teacher, iteration buffer, kd terms
    ],
)
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path, reference, model, kill, resumed_from):
    reference_dir, expected = reference(model)
    killed = run_job(tmp_path, "--model", model, *kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_iteration(tmp_path) == resumed_from
    resumed = run_job(tmp_path, "--model", model, "--resume", "--dump", str(tmp_path / "final.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {tmp_path / 'run.ckpt'} at iteration {resumed_from}/12" in resumed.stdout
    assert_same_state(expected, torch.load(tmp_path / "final.pt", weights_only=True))
    assert log_records(tmp_path) == log_records(reference_dir)  # no duplicate records, same loss means


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, reference):
    _, expected = reference("fcos")
    killed = run_job(tmp_path, "--kill-in-save", "8")  # dies after writing the temp file, before the rename
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = list(tmp_path.glob(".run.ckpt.*.tmp"))
    assert len(leftovers) == 1
    assert checkpoint_iteration(tmp_path) == 4  # the previous checkpoint, intact and loadable
    resumed = run_job(tmp_path, "--resume", "--dump", str(tmp_path / "final.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert "at iteration 4/12" in resumed.stdout
    assert_same_state(expected, torch.load(tmp_path / "final.pt", weights_only=True))
    assert not list(tmp_path.glob(".run.ckpt.*.tmp"))  # the stale temp file is cleaned up


def test_resume_after_finishing_returns_at_once(tmp_path, reference):
    reference_dir, expected = reference("fcos")
    again = run_job(reference_dir, "--resume", "--kill-at", "0", "--dump", str(tmp_path / "final.pt"))
    assert again.returncode == 0, again.stderr  # no step ran: the kill hook never fired
    assert "finished earlier" in again.stdout
    assert_same_state(expected, torch.load(tmp_path / "final.pt", weights_only=True))


def test_sigkills_at_random_points_in_sequence_then_resume_match_uninterrupted(tmp_path, reference):
    """Three SIGKILLs at seeded-random points -- between two steps, or part-way through writing a
    checkpoint (a truncated temporary file) -- each followed by a resume that is killed again;
    the last resume ends bitwise where an uninterrupted run ends, with the same log."""
    reference_dir, expected = reference("fcos")
    checkpoint_size = (reference_dir / "run.ckpt").stat().st_size
    every, iterations = 3, 12  # another checkpoint cadence than the reference's: it must not matter
    rng = random.Random(11)  # kills: before step 8, in the writes of checkpoints 9 and 12
    kinds = ["step", "save", rng.choice(["step", "save"])]
    rng.shuffle(kinds)
    saved = 0  # iteration of the checkpoint on disk
    for kind in kinds:
        if kind == "step":  # killed before step at + 1 (at == saved: right after resuming)
            at = rng.randint(saved, iterations - 1)
            kill = ["--kill-at", str(at)]
            last_written = at
        else:  # killed while writing the checkpoint of iteration `at`, after `cut` of its bytes
            at = rng.choice([i for i in range(every, iterations + 1, every) if i > saved])
            cut = rng.randrange(1, checkpoint_size)
            kill = ["--kill-in-save", str(at), "--kill-after-bytes", str(cut)]
            last_written = at - 1
        killed = run_job(tmp_path, "--resume", "--checkpoint-every", str(every), *kill)
        assert killed.returncode == -signal.SIGKILL, (kind, at, killed.stderr)
        if saved:
            assert f"resuming from {tmp_path / 'run.ckpt'} at iteration {saved}/{iterations}" in killed.stdout
        saved = max([saved] + [i for i in range(every, last_written + 1, every)])
        assert checkpoint_iteration(tmp_path) == saved, (kind, at)  # the latest complete checkpoint, loadable
        if kind == "save":
            (partial,) = tmp_path.glob(".run.ckpt.*.tmp")
            assert partial.stat().st_size == cut
    resumed = run_job(tmp_path, "--resume", "--checkpoint-every", str(every), "--dump", str(tmp_path / "final.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(expected, torch.load(tmp_path / "final.pt", weights_only=True))
    assert log_records(tmp_path) == log_records(reference_dir)
    assert not list(tmp_path.glob(".run.ckpt.*.tmp"))
