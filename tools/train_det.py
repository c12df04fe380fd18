"""Train a teacher, a baseline student and a distilled student on densekd's embedded
synthetic long-tailed dataset, evaluate all three and print one table.

    python tools/train_det.py            # the demo (about 15 min on 2 free CPU cores; the teacher is cached)
    python tools/train_det.py --quick    # the same pipeline on a tiny budget (< 3 min; little signal)

The teacher is cached under ``$DENSEKD_CACHE/teachers`` (default ``~/.cache/densekd``), keyed by
a hash of its training config and of the dataset, so a second run trains only the students.
Baseline and distilled students start from identical weights and see the same batches in the
same order; the only difference is the distillation terms.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from densekd import Distiller, Term
from densekd.data import CocoDetectionDataset, SyntheticConfig, collate_detection, config_hash, ensure_synthetic_dataset
from densekd.engine import COCO_COLUMNS, LVIS_COLUMNS, evaluate, save_checkpoint, train
from densekd.evaluation import format_metrics_table, save_results
from densekd.models import build_detector

TEACHER = "fcos_resnet34_fpn128"
STUDENT = "fcos_resnet18_fpn64"
MODELS = ("teacher", "baseline", "distilled")

# Budgets: (teacher iterations, student iterations, synthetic dataset config).
# The teacher budget was cut from 1000 to 500 iterations to keep the first (uncached) run
# near 15 minutes on a shared 2-core CPU.
FULL = dict(teacher_iters=500, student_iters=300, data=SyntheticConfig())
QUICK = dict(teacher_iters=60, student_iters=30, data=SyntheticConfig(num_train=300, num_val=48))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/train_det", help="folder for metrics, detections and weights")
    parser.add_argument("--quick", action="store_true", help="tiny budget and dataset: a smoke run, little signal")
    parser.add_argument("--teacher-iters", type=int, default=None, help="default: 500 (quick: 60)")
    parser.add_argument("--student-iters", type=int, default=None, help="default: 300 (quick: 30)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=None, help="default: 50 (quick: 10)")
    parser.add_argument("--clip-grad-norm", type=float, default=10.0)
    parser.add_argument("--logit-kd-weight", type=float, default=1.0, help="weight of binary KD on cls_logits")
    parser.add_argument("--cwd-weight", type=float, default=0.2, help="weight of CWD on FPN levels 0, 1, 2, p6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=None, help="default: 50 (quick: 10)")
    parser.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    args.teacher_iters = args.teacher_iters or budget["teacher_iters"]
    args.student_iters = args.student_iters or budget["student_iters"]
    args.log_every = args.log_every or (10 if args.quick else 50)
    args.warmup_iters = (10 if args.quick else 50) if args.warmup_iters is None else args.warmup_iters
    args.data = budget["data"]
    return args


def cache_root() -> Path:
    cache = os.environ.get("DENSEKD_CACHE")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "densekd"


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    # num_workers=0: decoding a 96 px PNG costs ~1 ms, a training step hundreds; a worker
    # process would only compete with the model for the 2 cores.
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
        num_workers=0, collate_fn=collate_detection, drop_last=shuffle,
    )  # fmt: skip


def optimizer_settings(args) -> dict:
    return dict(
        lr=args.lr, weight_decay=args.weight_decay, warmup_iters=args.warmup_iters,
        clip_grad_norm=args.clip_grad_norm, log_every=args.log_every,
    )  # fmt: skip


def teacher_key(args, num_classes: int) -> str:
    """Hash of everything that determines the trained teacher."""
    payload = {
        "model": TEACHER, "num_classes": num_classes, "image_size": args.data.image_size,
        "iterations": args.teacher_iters, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "warmup_iters": args.warmup_iters,
        "clip_grad_norm": args.clip_grad_norm, "seed": args.seed, "dataset": config_hash(args.data),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def get_teacher(args, train_set, output: Path) -> tuple[torch.nn.Module, dict]:
    num_classes, image_size = train_set.num_classes, args.data.image_size
    path = cache_root() / "teachers" / f"{TEACHER}-{teacher_key(args, num_classes)}.pth"
    torch.manual_seed(args.seed)
    teacher = build_detector(TEACHER, num_classes, image_size)
    if path.is_file() and not args.retrain_teacher:
        print(f"[teacher] reusing cached {path}", flush=True)
        state = torch.load(path, weights_only=True, map_location="cpu")
        teacher.load_state_dict(state["model"], strict=True)
        return teacher, {"cached": str(path), "train": state.get("train")}
    print(f"[teacher] training {TEACHER} for {args.teacher_iters} iterations", flush=True)
    loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed)
    summary = train(teacher, loader, args.teacher_iters, **optimizer_settings(args), log_file=output / "train_teacher.jsonl")
    save_checkpoint(path, {"model": teacher.state_dict(), "train": _jsonable(summary)})
    print(f"[teacher] cached at {path}", flush=True)
    return teacher, {"cached": None, "train": _jsonable(summary)}


def build_student(args, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(args.seed + 1)  # identical initial weights for baseline and distilled
    return build_detector(STUDENT, num_classes, args.data.image_size)


def distillation_terms(args) -> list[Term]:
    return [
        Term("binary_kd", on="cls_logits", temperature=2.0, confidence_weighting=True, weight=args.logit_kd_weight),
        Term("cwd", on="features", temperature=4.0, levels=["0", "1", "2", "p6"], weight=args.cwd_weight),
    ]


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no nan; undefined metrics are null
    return value


def results_table(rows: dict[str, dict]) -> str:
    """Metrics in percent (format_metrics_table), then params (M) and images/s as plain numbers."""
    metric_lines = format_metrics_table(rows, list(COCO_COLUMNS + LVIS_COLUMNS)).split("\n")
    width = max(len(line) for line in metric_lines)
    extra = [("params (M)", "params_millions", "{:.2f}"), ("img/s", "images_per_second", "{:.1f}")]
    cells = [[header for header, _, _ in extra]] + [[fmt.format(m[key]) for _, key, fmt in extra] for m in rows.values()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(extra))]
    return "\n".join(
        line.ljust(width) + "".join("  " + cell.rjust(w) for cell, w in zip(row, widths))
        for line, row in zip(metric_lines, cells)
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    mode = "QUICK smoke run: tiny dataset and budget, expect little or no signal" if args.quick else "full demo"
    print(
        f"densekd train_det ({mode}): teacher {TEACHER} {args.teacher_iters} it, students {STUDENT} "
        f"{args.student_iters} it, batch {args.batch_size}, {args.threads} threads",
        flush=True,
    )

    t = time.perf_counter()
    paths = ensure_synthetic_dataset(config=args.data)
    train_set = CocoDetectionDataset(paths.train_images, paths.train_ann)
    val_set = CocoDetectionDataset(paths.val_images, paths.val_ann)
    val_loader = make_loader(val_set, 16, shuffle=False, seed=args.seed)
    timings["data"] = time.perf_counter() - t
    print(f"[data] {len(train_set)} train / {len(val_set)} val images, {train_set.num_classes} classes, {paths.root}")

    t = time.perf_counter()
    teacher, teacher_info = get_teacher(args, train_set, output)
    timings["teacher_train"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[baseline] training {STUDENT} for {args.student_iters} iterations", flush=True)
    baseline = build_student(args, train_set.num_classes)
    loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed + 2)
    baseline_summary = train(baseline, loader, args.student_iters, **optimizer_settings(args), log_file=output / "train_baseline.jsonl")
    save_checkpoint(output / "student_baseline.pth", baseline.state_dict())
    timings["baseline_train"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[distilled] training {STUDENT} for {args.student_iters} iterations with KD from the teacher", flush=True)
    student = build_student(args, train_set.num_classes)
    terms = distillation_terms(args)
    distiller = Distiller(student, teacher, terms, probe_size=args.data.image_size)
    loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed + 2)  # same batches as the baseline
    distilled_summary = train(distiller, loader, args.student_iters, **optimizer_settings(args), log_file=output / "train_distilled.jsonl")
    save_checkpoint(output / "student_distilled.pth", distiller.student.state_dict())
    timings["distilled_train"] = time.perf_counter() - t

    rows: dict[str, dict] = {}
    for name, model in zip(MODELS, (teacher, baseline, distiller.student)):
        t = time.perf_counter()
        metrics, results, images_per_second = evaluate(model, val_loader, val_set)
        metrics["params_millions"] = sum(p.numel() for p in model.parameters()) / 1e6
        metrics["images_per_second"] = images_per_second
        rows[name] = metrics
        save_results(results, output / f"detections_{name}.json")
        timings[f"{name}_eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    table = results_table(rows)
    print(f"\nval split ({len(val_set)} images), AP in percent; students trained {args.student_iters} iterations\n")
    print(table)
    beat = {m: rows["distilled"][m] > rows["baseline"][m] for m in ("AP", "APr")}
    print(f"\ndistilled vs baseline: AP {100 * (rows['distilled']['AP'] - rows['baseline']['AP']):+.1f}, "
          f"APr {100 * (rows['distilled']['APr'] - rows['baseline']['APr']):+.1f}")  # fmt: skip
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "regime": {
            "note": f"students trained {args.student_iters} iterations (batch {args.batch_size}); "
            f"teacher {args.teacher_iters} iterations" + (" (QUICK smoke run)" if args.quick else ""),
            "quick": args.quick, "teacher": TEACHER, "student": STUDENT,
            "teacher_iterations": args.teacher_iters, "student_iterations": args.student_iters,
            "batch_size": args.batch_size, "threads": args.threads, "seed": args.seed,
            "optimizer": {"name": "AdamW", **optimizer_settings(args), "schedule": "linear warm-up + cosine"},
            "terms": [
                {"loss": t.loss, "on": t.on, "weight": t.weight, "temperature": t.temperature, "levels": t.levels,
                 "confidence_weighting": t.confidence_weighting}
                for t in terms
            ],
            "dataset": {"config_hash": config_hash(args.data), **dataclasses.asdict(args.data)},
        },  # fmt: skip
        "models": rows,
        "distilled_beats_baseline": beat,
        "training": {"teacher": teacher_info, "baseline": baseline_summary, "distilled": distilled_summary},
        "timings_seconds": timings,
        "table": table,
    }
    (output / "metrics.json").write_text(json.dumps(_jsonable(report), indent=2))
    print(f"wrote {output}/metrics.json, detections_*.json, student_baseline.pth, student_distilled.pth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
