"""End to end: ``tools/train_seg.py`` trains teacher, baseline and distilled student, evaluates
them and writes loadable weights; mask folders and teacher checkpoints work from the command line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densekd.segmentation.models import build_segmenter

REPO = Path(__file__).resolve().parents[2]
MODELS = ("teacher", "baseline", "distilled")
# --quick with an even smaller budget: a smoke run of every phase
TINY = ["data.synthetic={num_train: 40, num_val: 12, image_size: 64, max_object_size: 32}", "teacher.image_size=64",
        "student.image_size=64", "teacher_optim.iterations=2", "teacher_optim.warmup_iters=0", "optim.iterations=2",
        "optim.warmup_iters=0", "data.batch_size=4", "log_every=1"]  # fmt: skip


def _sets(overrides):
    return [arg for item in overrides for arg in ("--set", item)]


def test_quick_run_prints_every_model_and_writes_metrics_plot_and_students(tmp_path):
    output = tmp_path / "out"
    env = {**os.environ, "DENSEKD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "tools" / "train_seg.py"), "--quick", "--threads", "1", "--output", str(output)]
    done = subprocess.run(command + _sets(TINY), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model "))
    assert header.split()[:7] == ["model", "mIoU", "pixAcc", "mAcc", "IoUr", "IoUc", "IoUf"]
    for name in MODELS:
        row = next(line for line in lines if line.split()[:1] == [name])
        assert float(row.split()[1]) >= 0.0  # its mIoU, in percent
    assert any(line.startswith("distilled vs baseline: mIoU") for line in lines)

    report = json.loads((output / "metrics.json").read_text())
    assert report["classes"][0] == "background" and len(report["classes"]) == 13
    for name in MODELS:
        metrics = report["models"][name]
        for key in ("mIoU", "pixel_accuracy", "mean_class_accuracy", "params_millions", "images_per_second"):
            assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (name, key)
        assert len(metrics["per_class_iou"]) == 13
    assert report["training"]["distilled"]["final_losses"].keys() >= {"loss_seg", "kd_seg_logits_pixel_kl"}
    assert (output / "per_class_iou.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for file in ("student_baseline.pth", "student_distilled.pth"):
        student = build_segmenter("lraspp_mobilenet_v3_small", 12)
        student.load_state_dict(torch.load(output / file, weights_only=True), strict=True)


def _mask_folder(root: Path) -> None:
    """classes.txt with 2 classes; 6 train and 3 val 32 px images whose masks mark a bright square."""
    root.mkdir()
    (root / "classes.txt").write_text("square\nstripe\n")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for index in range(count):
            image = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            mask = np.zeros((32, 32), np.uint8)
            y, x = rng.integers(0, 20, 2)
            mask[y : y + 12, x : x + 12], image[y : y + 12, x : x + 12] = 1, 220
            mask[30:, :] = 2
            mask[0, :] = 255
            Image.fromarray(image).save(root / split / "images" / f"im{index}.jpg")
            Image.fromarray(mask).save(root / split / "masks" / f"im{index}.png")


def test_mask_folder_and_teacher_checkpoint_from_the_command_line(tmp_path, monkeypatch, capsys):
    """In process (no interpreter start-up): a mask folder, a DeepLabV3 teacher checkpoint
    distilled into the LRASPP student, and a clear error for a folder that is not there."""
    sys.path.insert(0, str(REPO / "tools"))
    import train_seg

    monkeypatch.setenv("DENSEKD_CACHE", str(tmp_path / "cache"))
    _mask_folder(tmp_path / "data")
    teacher = build_segmenter("deeplabv3_resnet18_aspp128", 2)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    tiny = ["teacher.name=deeplabv3_resnet18_aspp128", "teacher.image_size=32", "student.image_size=32",
            "optim.iterations=1", "optim.warmup_iters=0", "data.batch_size=3", "log_every=1"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        code = train_seg.main(["--threads", "1", "--output", str(tmp_path / "out"), "--mask-folder", str(tmp_path / "data"),
                               "--teacher-ckpt", str(tmp_path / "teacher.pth"), *_sets(tiny)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "[teacher 0] loaded from" in stdout  # not trained
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["classes"] == ["background", "square", "stripe"]
    assert report["config"]["data"]["dataset"] == "mask_folder"
    assert report["training"]["teachers"] == [{"checkpoint": str(tmp_path / "teacher.pth")}]
    # the scored teacher is the checkpoint: scoring it directly gives the same numbers
    from densekd.evaluation import evaluate_segmentation
    from densekd.experiment.config import load_experiment_config
    from densekd.segmentation.experiment import segmentation_data_files, validation_loader

    config = load_experiment_config(train_seg.DEFAULT_CONFIG, ["data.dataset=mask_folder", f"data.mask_root={tmp_path / 'data'}", *tiny])
    metrics, _ = evaluate_segmentation(teacher, validation_loader(segmentation_data_files(config)), 3)
    assert metrics["pixels"] == 3 * 31 * 32  # the ignored top row left out
    assert report["models"]["teacher"]["mIoU"] == metrics["mIoU"]

    assert train_seg.main(["--mask-folder", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 2
    assert "lacks" in capsys.readouterr().err
