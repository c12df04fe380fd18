"""End to end: ``tools/train_det.py --quick`` trains, evaluates and writes loadable weights."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from densekd.models import build_detector

REPO = Path(__file__).resolve().parents[2]
MODELS = ("teacher", "baseline", "distilled")


def test_quick_demo_runs_end_to_end(tmp_path):
    output = tmp_path / "out"
    env = {**os.environ, "DENSEKD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_det.py"), "--quick", "--output", str(output)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model "))
    assert {"AP", "APr"} <= set(header.split())
    for name in MODELS:
        assert any(line.split()[:1] == [name] for line in lines), f"no table row for {name}"

    report = json.loads((output / "metrics.json").read_text())
    assert report["regime"]["quick"] is True
    for name in MODELS:
        metrics = report["models"][name]
        # APl is undefined (null) on 96 px images: no object is "large" (> 96^2 px).
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APr", "APc", "APf", "params_millions", "images_per_second"):
            assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), (name, key, metrics[key])
        assert json.loads((output / f"detections_{name}.json").read_text()) is not None

    num_classes = report["regime"]["dataset"]["shapes"].__len__() * report["regime"]["dataset"]["colours"].__len__()
    image_size = report["regime"]["dataset"]["image_size"]
    for file in ("student_distilled.pth", "student_baseline.pth"):
        student = build_detector("fcos_resnet18_fpn64", num_classes, image_size)
        student.load_state_dict(torch.load(output / file, weights_only=True), strict=True)
