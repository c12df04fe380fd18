"""How much densekd itself costs: a distillation step against the two forwards it needs.

    python tools/bench_overhead.py                      # all families, realistic sizes (minutes)
    python tools/bench_overhead.py --quick              # tiny sizes, a smoke run (under 2 minutes)
    python tools/bench_overhead.py --threads 4 --families fcos retinanet --json bench.json
    python tools/bench_overhead.py --json               # the JSON report on stdout, the table on stderr
    python tools/bench_overhead.py --device cuda --teacher-dtype bfloat16
    python tools/bench_overhead.py --families deeplabv3 --seg-logit-resolution input   # logits at the input size

For each detector family (FasterRCNN, RetinaNet, FCOS), with a ResNet-34 / 128-channel FPN
teacher and a ResNet-18 / 64-channel FPN student (the demo's pair), and for a segmentation
family (DeepLabV3 with an aux head on the same bodies, 128- and 64-channel ASPP), on the same
batch, it times
in one process, rows interleaved round-robin so that machine noise hits them alike, and prints
the median after warm-up of:

  (a) student step: the plain student's forward with its torchvision losses, backward and
      SGD step;
  (b) teacher forward: the teacher's own full forward in eval mode under no_grad (transform,
      backbone + FPN, heads, box decoding and NMS to detections; a segmenter's backbone,
      classifier and aux classifier to upsampled logits), the usual price of a teacher's opinion;
  (c) distill step: ``distiller(images, targets)`` with the family's full recipe
      (configs/recipes/full_detection_kd.yaml adapted to the family, plus spatial attention;
      for DeepLabV3 pixel KD and CWD on its logits, pixel KD on its aux logits, pairwise
      affinity, CWD and attention on its features), backward through student and connectors,
      SGD step;

and the overhead ratio c / (a + b): 1.00 means densekd costs nothing beyond the two forwards.
DeepLabV3's logit terms compare at the SegmentationDistiller's ``logit_resolution`` (default:
the heads' own resolution; ``--seg-logit-resolution input``: upsampled to the input size).
Also: (t) the teacher work the recipe needs, alone (backbone (+ FPN) and the compared heads on
the student's batch, without post-processing), (k) densekd's own work alone (the terms with
their connectors, forward and backward) and c / (a + t); a feature-only distillation step, the
teacher's backbone + FPN (a segmenter's backbone) alone and how many times the teacher's heads
run in that step (0: it stops after its FPN); the peak memory of (a), (b) and (c) (the method is printed);
pycocotools against faster-coco-eval on the same detections.

Timings on a shared machine are noisy: compare ratios from one run, not runs.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from bench import coco_eval_speed, memory  # noqa: E402
from bench.families import DEFAULT_SCALE, FAMILIES, QUICK_SCALE, Family, Scale  # noqa: E402
from bench.internals import SegmentationInternals  # noqa: E402
from bench.workload import MEMORY_ROWS, ROWS, Workload, teacher_head_runs  # noqa: E402
from train_det import jsonable  # noqa: E402  (NaN -> null, as the other tools write JSON)

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (warm-up runs, timed runs) per row, and the evaluation check's (val images, detections per
# image, repeats); --quick shrinks both.
DEFAULT_RUNS, QUICK_RUNS = (3, 15), (1, 3)
DEFAULT_EVAL, QUICK_EVAL = (300, 30, 3), (48, 10, 1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and few runs: a smoke run, noisy figures")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES), help="families to measure")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--teacher-dtype", choices=sorted(TEACHER_DTYPES), default="float32", help="bfloat16: CUDA only")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--image-size", type=int, help=f"image side in px (default {DEFAULT_SCALE.image_size}, quick {QUICK_SCALE.image_size})")
    parser.add_argument("--batch-size", type=int, help=f"images per batch (default {DEFAULT_SCALE.batch_size}, quick {QUICK_SCALE.batch_size})")
    parser.add_argument("--warmup", type=int, help="untimed runs of every row first")
    parser.add_argument("--repeats", type=int, help="timed runs of every row (the median is reported)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-eval", action="store_true", help="skip the COCO evaluation speed check")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH", help="also write the report as JSON (no PATH: stdout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seg-logit-resolution", choices=("head", "input"),
        help="where the segmentation family's logit terms compare (SegmentationDistiller's logit_resolution; "
        "default: its default)",
    )  # fmt: skip
    return parser.parse_args(argv)


class UsageError(ValueError):
    pass


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:index], got {args.device!r}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; run with --device cpu.")
    if args.teacher_dtype != "float32" and device.type != "cuda":
        raise UsageError(
            f"--teacher-dtype {args.teacher_dtype} needs --device cuda: CPUs run bfloat16 convolutions "
            "slower than float32, so a bfloat16 teacher would measure nothing useful here."
        )
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}.")
    scale = QUICK_SCALE if args.quick else DEFAULT_SCALE
    scale = replace(scale, image_size=args.image_size or scale.image_size, batch_size=args.batch_size or scale.batch_size)
    if scale.image_size < 32 or scale.batch_size < 1:
        raise UsageError(f"need --image-size >= 32 and --batch-size >= 1, got {scale.image_size}, {scale.batch_size}.")
    warmup, repeats = QUICK_RUNS if args.quick else DEFAULT_RUNS
    warmup = warmup if args.warmup is None else args.warmup
    repeats = repeats if args.repeats is None else args.repeats
    if warmup < 0 or repeats < 1:
        raise UsageError(f"need --warmup >= 0 and --repeats >= 1, got {warmup}, {repeats}.")
    return {
        "device": device,
        "teacher_dtype": TEACHER_DTYPES[args.teacher_dtype],
        "scale": scale,
        "warmup": warmup,
        "repeats": repeats,
        "eval": QUICK_EVAL if args.quick else DEFAULT_EVAL,
        "seg_logit_resolution": args.seg_logit_resolution,
    }


def family_of(name: str, settings: dict) -> Family:
    """The family ``name`` with the run's distiller options (a segmenter's logit resolution)."""
    family = FAMILIES[name]
    if family.internals is SegmentationInternals and settings["seg_logit_resolution"]:
        family = replace(family, distiller_options={"logit_resolution": settings["seg_logit_resolution"]})
    return family


# --- measuring ---------------------------------------------------------------------------
def _synchronize(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def median_times(workload: Workload, warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall-clock and process CPU seconds per row. Rows run round-robin, the starting
    row rotating every round, so that slow phases of a shared machine spread over all of them.
    CPU time (all threads of this process) is less disturbed by other processes; it means
    nothing on CUDA, where only wall-clock time is kept."""
    names = list(ROWS)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    sync = _synchronize(workload.device)
    for round_index in range(warmup + repeats):
        gc.collect()
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            ROWS[name](workload)
            sync()
            if round_index >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    medians = {"wall": {name: statistics.median(values) for name, values in wall.items()}}
    if workload.device.type == "cpu":
        medians["cpu"] = {name: statistics.median(values) for name, values in cpu.items()}
    return medians


def peak_memory(family_name: str, settings: dict) -> dict[str, float]:
    """MiB per row of MEMORY_ROWS (see bench/memory.py for the method)."""
    family = family_of(family_name, settings)
    build = lambda: Workload(family, settings["scale"], settings["device"], settings["teacher_dtype"], settings["seed"])
    if settings["device"].type == "cuda":
        workload = build()
        return {row: memory.cuda_peak_bytes(workload, ROWS[row]) / memory.MiB for row in MEMORY_ROWS}
    return {row: memory.cpu_peak_bytes(build, ROWS[row]) / memory.MiB for row in MEMORY_ROWS}


def measure_family(family_name: str, settings: dict) -> dict[str, Any]:
    family = family_of(family_name, settings)
    workload = Workload(family, settings["scale"], settings["device"], settings["teacher_dtype"], settings["seed"])
    head_runs = teacher_head_runs(workload)  # also builds the lazily made distillers
    workload.student_records  # noqa: B018  (recorded before the timing)
    medians = median_times(workload, settings["warmup"], settings["repeats"])
    ms = {name: 1000 * value for name, value in medians["wall"].items()}
    a, b, c = ms["student_step"], ms["teacher_forward"], ms["distill_step"]
    result = {
        "title": family.title,
        "logit_resolution": getattr(workload.full[0], "logit_resolution", None),  # a segmenter's: head or input
        "parameters_millions": workload.parameters_millions(),
        "terms": [term.name for term in workload.full[0].terms],
        "feature_terms": [term.name for term in workload.features_only[0].terms],
        "times_ms": ms,
        "overhead_ratio": c / (a + b),
        "overhead_ratio_needed_teacher": c / (a + ms["teacher_distill_work"]),
        "kd_share": ms["kd_terms"] / c,
        "densekd_own_ms": c - a - ms["teacher_distill_work"],  # noisier than kd_terms: a difference of large times
        "feature_only": {
            "distill_step_minus_student_step_ms": ms["distill_step_features"] - a,
            "teacher_backbone_fpn_ms": ms["teacher_backbone_fpn"],
            "teacher_forward_ms": b,
            "backbone_fpn_share_of_teacher_forward": ms["teacher_backbone_fpn"] / b,
            "teacher_head_runs": head_runs,
        },
    }
    if "cpu" in medians:
        cpu_ms = {name: 1000 * value for name, value in medians["cpu"].items()}
        result["cpu_times_ms"] = cpu_ms
        result["overhead_ratio_cpu"] = cpu_ms["distill_step"] / (cpu_ms["student_step"] + cpu_ms["teacher_forward"])
    return result


def machine_info(settings: dict, threads: int) -> dict[str, Any]:
    device = settings["device"]
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "teacher_dtype": str(settings["teacher_dtype"]).replace("torch.", ""),
    }


# --- reporting ----------------------------------------------------------------------------
def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
    return "\n".join(fmt(row) for row in [header, *rows])


def text_report(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"densekd overhead benchmark, {m['date']}",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, torchvision {m['torchvision']}, device {m['device_name']}, teacher {m['teacher_dtype']}",
        f"sizes: {s['image_size']} px, batch {s['batch_size']}; teacher {s['teacher']}, student {s['student']}; "
        f"median of {s['repeats']} timed runs after {s['warmup']} warm-up, rows interleaved"
        + (" (QUICK: tiny models, noisy)" if s["quick"] else ""),
        "",
        "(a) student step: plain student forward + losses, backward, SGD step",
        "(b) teacher forward: the teacher's full eval forward under no_grad, to detections (NMS included) "
        "or a segmenter's upsampled logits",
        "(c) distill step: densekd with the family's full recipe, backward, SGD step",
        "(t) teacher work: what the recipe needs of the teacher (backbone + FPN, or a segmenter's backbone; "
        "compared heads), alone",
        "(k) kd terms: densekd's own work, the recipe's terms (connectors included) forward + backward, alone",
        "",
    ]
    families = report["families"]
    cpu_column = all("overhead_ratio_cpu" in f for f in families.values())
    header = ["family", "(a) ms", "(b) ms", "(c) ms", "c/(a+b)"] + (["cpu c/(a+b)"] if cpu_column else [])
    header += ["(t) ms", "(k) ms", "k/c", "c/(a+t)"]
    rows = []
    for f in families.values():
        t = f["times_ms"]
        row = [f["title"], *(f"{t[k]:.1f}" for k in MEMORY_ROWS), f"{f['overhead_ratio']:.3f}"]
        row += [f"{f['overhead_ratio_cpu']:.3f}"] if cpu_column else []
        row += [f"{t['teacher_distill_work']:.1f}", f"{t['kd_terms']:.1f}", f"{f['kd_share']:.3f}"]
        row += [f"{f['overhead_ratio_needed_teacher']:.3f}"]
        rows.append(row)
    lines.append(_table(header, rows))
    lines.append("median wall-clock times; c/(a+t) near 1 + k/c when the rest of the step costs nothing extra")
    if cpu_column:
        lines.append("cpu c/(a+b): the same ratio from this process's CPU time, less disturbed by other processes")
    memory_rows = report.get("memory")
    if memory_rows and memory_rows["families"]:
        lines += ["", "peak memory (MiB):"]
        header = ["family", "(a)", "(b)", "(c)", "c/(a+b)"]
        rows = [
            [families[name]["title"], *(f"{mem[k]:.1f}" for k in MEMORY_ROWS), f"{mem['ratio']:.3f}"]
            for name, mem in memory_rows["families"].items()
        ]
        lines.append(_table(header, rows))
    if memory_rows:
        lines.append(f"method: {memory_rows['method']}")
    lines += ["", "feature-only distillation (" + ", ".join(next(iter(families.values()))["feature_terms"]) + "):"]
    header = ["family", "step - (a) ms", "teacher backbone(+FPN) ms", "teacher forward ms", "teacher head runs"]
    rows = [
        [
            f["title"],
            f"{f['feature_only']['distill_step_minus_student_step_ms']:.1f}",
            f"{f['feature_only']['teacher_backbone_fpn_ms']:.1f}",
            f"{f['feature_only']['teacher_forward_ms']:.1f}",
            str(f["feature_only"]["teacher_head_runs"]),
        ]
        for f in families.values()
    ]
    lines.append(_table(header, rows))
    lines.append(
        "teacher head runs: calls of the teacher's submodules after its FPN (a segmenter's backbone) in one "
        "feature-only step (0: it stops there)"
    )
    at = lambda f: f" (logits at {f['logit_resolution']} resolution)" if f.get("logit_resolution") else ""
    lines += ["", "terms of (c):"] + [f"  {f['title']}{at(f)}: {', '.join(f['terms'])}" for f in families.values()]
    evaluation = report.get("evaluation")
    if evaluation:
        py, fast = (evaluation["backends"][b]["metrics"]["AP"] for b in ("pycocotools", "faster_coco_eval"))
        times = {b: evaluation["backends"][b]["seconds"] for b in evaluation["backends"]}
        lines += [
            "",
            f"COCO evaluation ({evaluation['ground_truth']}, {evaluation['detections']} noisy detections, "
            f"median of {evaluation['repeats']}):",
            f"  pycocotools {times['pycocotools']:.2f} s, faster-coco-eval {times['faster_coco_eval']:.2f} s: "
            f"{evaluation['speedup']:.1f}x faster",
            f"  AP {py:.6f} vs {fast:.6f} (difference {evaluation['ap_difference']:.1e}); "
            f"largest difference over the 12 COCO metrics {evaluation['max_abs_difference']:.1e}",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from(args)
    settings["seed"] = args.seed
    scale: Scale = settings["scale"]
    necks = "/".join(dict.fromkeys(FAMILIES[name].neck for name in args.families))  # FPN, ASPP or FPN/ASPP
    describe = lambda spec: f"{spec.body} {necks} {spec.fpn_channels}"
    report: dict[str, Any] = {
        "machine": machine_info(settings, torch.get_num_threads()),
        "settings": {
            "quick": args.quick,
            "image_size": scale.image_size,
            "batch_size": scale.batch_size,
            "teacher": describe(scale.teacher),
            "student": describe(scale.student),
            "warmup": settings["warmup"],
            "repeats": settings["repeats"],
            "command": " ".join([sys.executable, *sys.argv]),
        },
    }
    log = lambda message: print(message, file=sys.stderr, flush=True)
    if not args.no_memory:  # first: forked children must start from a parent that ran no model yet
        unavailable = None if settings["device"].type == "cuda" else memory.cpu_method_available()
        if unavailable:
            log(f"peak memory skipped: {unavailable}")
            report["memory"] = {"method": f"unavailable: {unavailable}", "families": {}}
        else:
            method = memory.CUDA_METHOD if settings["device"].type == "cuda" else memory.CPU_METHOD
            report["memory"] = {"method": method, "families": {}}
            for name in args.families:
                log(f"[memory] {FAMILIES[name].title}")
                mib = peak_memory(name, settings)
                mib["ratio"] = mib["distill_step"] / (mib["student_step"] + mib["teacher_forward"])
                report["memory"]["families"][name] = mib
    report["families"] = {}
    for name in args.families:
        log(f"[time] {FAMILIES[name].title}")
        report["families"][name] = measure_family(name, settings)
    if not args.no_eval:
        log("[eval] pycocotools vs faster-coco-eval")
        report["evaluation"] = coco_eval_speed.measure(*settings["eval"], seed=args.seed)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        report = run(args)
    except UsageError as error:
        print(f"bench_overhead: {error}", file=sys.stderr)
        return 2
    text = text_report(report)
    document = json.dumps(jsonable(report), indent=2)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(document)
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(document + "\n")
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
