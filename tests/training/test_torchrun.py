"""Two CPU ranks under torchrun (gloo): DDP keeps the ranks' weights identical, also when a
step's loss is non-finite on one rank only (every rank skips it)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HELPER = Path(__file__).with_name("training_job.py")


def test_torchrun_two_ranks_end_with_identical_weights_and_skip_the_same_steps(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(HELPER),
         "--ddp", "--out", str(tmp_path), "--iterations", "4", "--checkpoint-every", "2",
         "--nan-at", "1", "--nan-rank", "1"],  # step 2's bbox_ctrness is NaN on rank 1 only
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    hashes = dict(re.findall(r"^RANK (\d) (SUM \S+ SHA \w+ SKIPPED \d+)$", done.stdout, flags=re.M))
    assert sorted(hashes) == ["0", "1"], done.stdout
    assert hashes["0"] == hashes["1"] and hashes["0"].endswith("SKIPPED 1")
    assert done.stdout.count("it     4/4") == 1  # only rank 0 prints progress
    # rank 0's own loss was finite: it names the entry that rank 1 reported
    assert "it     2/4  skipped the step: non-finite bbox_ctrness=nan" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in records if r.get("event")] == [{"bbox_ctrness": "nan"}]
    assert (tmp_path / "run.ckpt").exists()
