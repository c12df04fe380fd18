"""Two CPU ranks under torchrun (gloo): DDP keeps the ranks' weights identical."""
import os
import re
import subprocess
import sys
from pathlib import Path

HELPER = Path(__file__).with_name("engine_job.py")


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(HELPER),
         "--ddp", "--out", str(tmp_path), "--iterations", "4", "--checkpoint-every", "2"],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    hashes = dict(re.findall(r"^RANK (\d) (SUM \S+ SHA \w+)$", done.stdout, flags=re.M))
    assert sorted(hashes) == ["0", "1"], done.stdout
    assert hashes["0"] == hashes["1"]
    assert done.stdout.count("it     4/4") == 1  # only rank 0 prints progress
    assert (tmp_path / "run.ckpt").exists() and (tmp_path / "run.jsonl").exists()
