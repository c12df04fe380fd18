"""End to end: ``tools/train_det.py --quick`` trains, evaluates and writes loadable weights,
and ``tools/eval_det.py`` reproduces the distilled student's numbers from its checkpoint."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from densekd.detection.models import build_detector

REPO = Path(__file__).resolve().parents[2]
MODELS = ("teacher", "baseline", "distilled")


def _run(args, env):
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_quick_demo_runs_end_to_end_and_eval_det_agrees(tmp_path):
    output = tmp_path / "out"
    env = {**os.environ, "DENSEKD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # --quick's pipeline on a third of its budget (the suite's slowest test): every phase still
    # trains, checkpoints and evaluates
    shorter = ["teacher_optim.iterations=20", "teacher_optim.warmup_iters=5", "optim.iterations=10", "optim.warmup_iters=2",
               "checkpoint_every=5", "log_every=5"]  # fmt: skip
    stdout = _run([str(REPO / "tools" / "train_det.py"), "--quick", "--threads", "1", "--output", str(output),
                   *[a for item in shorter for a in ("--set", item)]], env)  # fmt: skip

    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("model "))
    assert {"AP", "APr", "APc", "APf"} <= set(header.split())
    for name in MODELS:
        assert any(line.split()[:1] == [name] for line in lines), f"no table row for {name}"

    report = json.loads((output / "metrics.json").read_text())
    for name in MODELS:
        metrics = report["models"][name]
        # APl is undefined (null) on 96 px images: no object is "large" (> 96^2 px).
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APr", "APc", "APf", "params_millions", "images_per_second"):
            assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), (name, key, metrics[key])
        assert isinstance(json.loads((output / f"detections_{name}.json").read_text()), list)

    assert (output / "per_class_ap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (teacher_folder,) = (tmp_path / "cache" / "teachers").iterdir()  # the cached teacher knows its categories
    assert len(json.loads((teacher_folder / "teacher.ckpt.categories.json").read_text())["categories"]) == 12
    assert set(report["per_class_ap"]) == set(MODELS) and len(report["per_class_ap"]["teacher"]) == 12
    for file in ("student_distilled.pth", "student_baseline.pth"):
        student = build_detector("fcos_resnet18_fpn64", 12, 96)
        student.load_state_dict(torch.load(output / file, weights_only=True), strict=True)

    quick = [arg for item in ("data.synthetic={num_train: 300, num_val: 48}",) for arg in ("--set", item)]
    stdout = _run([str(REPO / "tools" / "eval_det.py"), "--ckpt", str(output / "student_distilled.pth"), *quick,
                   "--output", str(tmp_path / "eval"), "--per-class"], env)  # fmt: skip
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert abs(evaluated["AP"] - report["models"]["distilled"]["AP"]) < 1e-9
    assert "student_distilled" in stdout
    # --per-class: one row per category with its group and AP, also stored in metrics.json
    assert "| category | group | AP | top score: with / without |" in stdout and "| red_ring | r |" in stdout
    assert [row["name"] for row in evaluated["per_class"]][:2] == ["red_square", "blue_square"]


def test_real_data_flags_and_a_teacher_checkpoint(tmp_path):
    """COCO-format files given on the command line (here: a tiny generated set with
    non-contiguous category ids and, like every plain COCO file, no LVIS 'frequency') and a
    teacher checkpoint instead of teacher training."""
    from densekd.data import SyntheticConfig, generate_synthetic_dataset

    paths = generate_synthetic_dataset(tmp_path / "data", SyntheticConfig(num_train=24, num_val=12, image_size=64, max_object_size=32))
    for ann in (paths.train_ann, paths.val_ann):  # category ids 1..12 -> 10, 20, ..., 120
        data = json.loads(Path(ann).read_text())
        for record in data["categories"]:
            record["id"] *= 10
            del record["frequency"], record["image_count"], record["instance_count"]
        for record in data["annotations"]:
            record["category_id"] *= 10
        for record in data["images"]:
            record["neg_category_ids"] = [c * 10 for c in record.get("neg_category_ids", [])]
        Path(ann).write_text(json.dumps(data))
    teacher = build_detector("fcos_resnet34_fpn128", 12, 64)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    env = {**os.environ, "DENSEKD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    tiny = ["teacher.image_size=64", "student.image_size=64", "optim.iterations=2", "optim.warmup_iters=0",
            "data.batch_size=2", "log_every=1"]  # fmt: skip
    output = tmp_path / "out"
    stdout = _run([str(REPO / "tools" / "train_det.py"), "--threads", "1", "--output", str(output),
                   "--train-ann", str(paths.train_ann), "--train-images", str(paths.train_images),
                   "--val-ann", str(paths.val_ann), "--val-images", str(paths.val_images),
                   "--teacher-ckpt", str(tmp_path / "teacher.pth"), *[a for s in tiny for a in ("--set", s)]], env)  # fmt: skip
    assert "[teacher 0] loaded" in stdout  # not trained
    assert f"note: {tmp_path / 'teacher.pth'} has no teacher.pth.categories.json" in stdout
    for file in ("student_distilled.pth", "student_baseline.pth", "distilled.ckpt"):  # label order, original ids
        categories = json.loads((output / f"{file}.categories.json").read_text())["categories"]
        assert [(c["label"], c["id"]) for c in categories] == [(k, 10 * k) for k in range(1, 13)]
    detections = json.loads((output / "detections_distilled.json").read_text())
    assert {d["category_id"] for d in detections} <= {10 * k for k in range(1, 13)}
    # The LVIS groups come from the 24 training images: every class is in <= 10 of them, so rare.
    assert f"groups from the image counts of {Path(paths.train_ann).name}" in stdout
    assert "distilled vs baseline: AP " in stdout and "APf -" in stdout  # no frequent class: '-', not '+nan'
    report = json.loads((output / "metrics.json").read_text())
    for name in MODELS:
        assert isinstance(report["models"][name]["APr"], float) and report["models"][name]["APf"] is None
    assert report["config"]["data"]["dataset"] == "coco"
    assert report["training"]["teachers"][0] == {"checkpoint": str(tmp_path / "teacher.pth")}
