"""SIGTERM mid-run: the step finishes, a checkpoint is written, the process exits 130; resuming
completes and matches an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from densekd.training import INTERRUPTED_EXIT_CODE

HELPER = Path(__file__).with_name("training_job.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(HELPER), "--out", str(out), *args]


def test_sigterm_writes_checkpoint_exits_130_and_resumes_exactly(tmp_path):
    reference = subprocess.run(
        command(tmp_path / "reference", "--dump", str(tmp_path / "reference.pt")), capture_output=True, text=True,
        timeout=120, env=ENV,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        command(out, "--print-iterations", "--sleep", "0.2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, f"the job ended early: {process.stderr.read()}"
        if line.strip() == "ITER 5":  # 5 steps done, the 6th about to run
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED_EXIT_CODE == 130, stderr
    message = stderr.strip().splitlines()[-1]
    assert "SIGTERM" in message and "resume" in message and str(out / "run.ckpt") in message
    stopped_at = int(torch.load(out / "run.ckpt", weights_only=True)["iteration"])
    assert 6 <= stopped_at < 12 and f"iteration {stopped_at}/12" in message  # not a periodic checkpoint

    resumed = subprocess.run(
        command(out, "--resume", "--dump", str(tmp_path / "resumed.pt")), capture_output=True, text=True,
        timeout=120, env=ENV,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    expected, actual = torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "resumed.pt")
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
