"""``tools/bench_overhead.py --quick --json`` runs end to end and reports every family, positive
ratios, peak memory and agreeing COCO evaluators. Timings are never asserted."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "bench_overhead.py"
FAMILIES = {"faster_rcnn": "FasterRCNN", "retinanet": "RetinaNet", "fcos": "FCOS", "deeplabv3": "DeepLabV3"}
ROWS = ("student_step", "teacher_forward", "distill_step", "distill_step_features", "teacher_backbone_fpn", "teacher_distill_work")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_family_memory_and_agreeing_evaluators(tmp_path):
    env = {**os.environ, "DENSEKD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--warmup", "0", "--repeats", "1", "--json", str(output)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(output.read_text())

    assert report["machine"]["torch"] == __import__("torch").__version__
    assert {"date", "cores", "torch_threads", "device"} <= set(report["machine"])
    assert set(report["families"]) == set(FAMILIES)
    for name, family in report["families"].items():
        assert family["title"] == FAMILIES[name]
        assert all(_positive(family["times_ms"][row]) for row in ROWS), family["times_ms"]
        assert _positive(family["overhead_ratio"]) and _positive(family["overhead_ratio_cpu"])
        assert family["feature_only"]["teacher_head_runs"] == 0  # the teacher stops after its FPN
        assert len(family["terms"]) > len(family["feature_terms"]) >= 1
        if sys.platform.startswith("linux"):  # peak RSS through /proc elsewhere unavailable, and said so
            memory = report["memory"]["families"][name]
            assert all(_positive(memory[row]) for row in ("student_step", "teacher_forward", "distill_step"))
            assert _positive(memory["ratio"])
    assert "VmHWM" in report["memory"]["method"] or not sys.platform.startswith("linux")

    evaluation = report["evaluation"]
    backends = evaluation["backends"]
    assert set(backends) == {"pycocotools", "faster_coco_eval"}
    assert 0.0 < backends["pycocotools"]["metrics"]["AP"] < 1.0
    assert abs(backends["pycocotools"]["metrics"]["AP"] - backends["faster_coco_eval"]["metrics"]["AP"]) < 1e-6
    assert evaluation["max_abs_difference"] < 1e-6 and _positive(evaluation["speedup"])

    for title in FAMILIES.values():  # the human-readable table is printed too
        assert any(line.startswith(title) for line in done.stdout.splitlines()), done.stdout


def test_bfloat16_teacher_is_refused_on_cpu(capsys):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_overhead
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert bench_overhead.main(["--teacher-dtype", "bfloat16", "--device", "cpu"]) == 2
    assert "--teacher-dtype bfloat16 needs --device cuda" in capsys.readouterr().err


def _bench_modules():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from bench import families, workload
    finally:
        sys.path.remove(str(REPO / "tools"))
    return families, workload


@pytest.mark.parametrize(
    "family_name, options", [("fcos", {}), ("deeplabv3", {}), ("deeplabv3", {"logit_resolution": "input"})]
)
def test_rows_k_and_t_compute_what_the_distiller_computes(family_name, options):
    """Rows (k) and (t) time the distiller's own terms and teacher work: evaluated on the
    recorded outputs, the terms equal the distiller's kd entries for the same batch (a
    segmenter's logits at the distiller's resolution)."""
    families, workload = _bench_modules()
    torch.set_num_threads(1)
    family = dataclasses.replace(families.FAMILIES[family_name], distiller_options=options)
    w = workload.Workload(family, families.QUICK_SCALE, torch.device("cpu"), torch.float32)
    distiller, _ = w.full
    torch.manual_seed(0)  # the same dropout draws (DeepLabV3's ASPP and aux head) in both student forwards
    losses = distiller(w.images, w.targets)  # iteration 0, as the recorded context
    torch.manual_seed(0)
    student, teacher = w.recorded_step
    context, term_loss = w.family.internals.term_losses(distiller, student, teacher)
    assert len(distiller.terms) >= 4
    if family_name == "deeplabv3":  # 64 px, "out" at stride 16: 4 x 4 logits at the head's resolution
        side = 64 if options.get("logit_resolution") == "input" else 4
        assert student.seg_logits.shape[-2:] == teacher.seg_logits.shape[-2:] == (side, side)
    for term in distiller.terms:
        expected = losses[term.key].detach()
        assert expected.abs() > 0, term.key
        torch.testing.assert_close(float(term.weight_at(0)) * term_loss(term, context).detach(), expected, rtol=1e-4, atol=1e-6, msg=term.key)


def test_the_segmentation_logit_resolution_option_reaches_the_segmentation_family_only():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_overhead
    finally:
        sys.path.remove(str(REPO / "tools"))
    settings = {"seg_logit_resolution": "input"}
    assert bench_overhead.family_of("deeplabv3", settings).distiller_options == {"logit_resolution": "input"}
    assert bench_overhead.family_of("fcos", settings).distiller_options == {}
    assert bench_overhead.family_of("deeplabv3", {"seg_logit_resolution": None}).distiller_options == {}  # the default
    assert bench_overhead.parse_args(["--seg-logit-resolution", "head"]).seg_logit_resolution == "head"
