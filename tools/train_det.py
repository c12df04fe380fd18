"""Distil a detector and say, with COCO and LVIS-style metrics, what it gained.

    python tools/train_det.py                       # the demo on the embedded long-tailed dataset
    python tools/train_det.py --quick               # the same pipeline on a tiny budget (smoke run)
    python tools/train_det.py --recipe long_tail    # any recipe of configs/recipes/
    python tools/train_det.py --set distill.teacher_cache=true   # offline: teacher outputs cached once
    python tools/train_det.py --config FILE --train-ann A.json --train-images DIR \\
        --val-ann B.json --val-images DIR [--teacher-ckpt T.pth] [--output DIR] [--skip-bad]
    torchrun --nproc_per_node 2 tools/train_det.py ...   # data-parallel (gloo on CPU, nccl on GPU)

It trains (or reuses from the cache) the teacher, trains a baseline and a distilled student
with the same budget, seed and batches, evaluates all three and prints one table. Each phase
checkpoints; ``--resume`` continues an interrupted run where it stopped. Before any training
it checks the annotation files (a bad record stops the run with one message naming it, unless
``--skip-bad`` drops bad records and prints how many of each kind went), that ``--output`` is
writable with room for the run's checkpoints, and that teacher or student checkpoints list the
dataset's categories in the same order (the ``<checkpoint>.categories.json`` it writes next to
every checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from densekd.categories import CategoryOrderError, categories_path, check_categories, write_categories
from densekd.config import ConfigError, ExperimentConfig, load_experiment_config
from densekd.data import BadDatasetError, CocoDetectionDataset, collate_detection
from densekd.engine import COCO_COLUMNS, LVIS_COLUMNS, TrainingInterrupted, evaluate, init_distributed, is_main_process, save_checkpoint
from densekd.evaluation import format_metrics_table, plot_per_class_ap, save_results
from densekd.experiment import data_files, prepare_teachers, train_student
from densekd.models import CheckpointLoadError, build_detector
from densekd.nonfinite import NonFiniteTrainingError
from densekd.output_checks import (
    CheckpointWriteError,
    OutputFolderError,
    bytes_needed,
    check_output_folder,
    checkpoint_bytes,
    state_bytes,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "experiments" / "demo.yaml"
MODELS = ("teacher", "baseline", "distilled")
# --quick: the same pipeline on a tiny dataset and budget, for smoke tests (little signal).
QUICK_OVERRIDES = [
    "data.synthetic={num_train: 300, num_val: 48}",
    "teacher_optim.iterations=60",
    "teacher_optim.warmup_iters=10",
    "optim.iterations=30",
    "optim.warmup_iters=10",
    "log_every=10",
    "checkpoint_every=10",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: the demo)")
    parser.add_argument("--recipe", help="a recipe of configs/recipes/ (replaces the config's recipe)")
    parser.add_argument("--quick", action="store_true", help="tiny dataset and budget: a smoke run, little signal")
    parser.add_argument("--train-ann", help="COCO/LVIS-format training annotations (switches data to 'coco')")
    parser.add_argument("--train-images", help="folder of the training images")
    parser.add_argument("--val-ann", help="COCO/LVIS-format validation annotations")
    parser.add_argument("--val-images", help="folder of the validation images")
    parser.add_argument("--skip-bad", action="store_true", help="drop bad images/annotations (reported) instead of stopping")
    parser.add_argument("--teacher-ckpt", help="teacher weights (state_dict or a densekd checkpoint); skips teacher training")
    parser.add_argument("--teacher-weights", help="torchvision pretrained weights of the teacher's builder, e.g. DEFAULT")
    parser.add_argument("--output", default="runs/train_det", help="folder for checkpoints, logs, metrics and weights")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=0.01")
    parser.add_argument("--resume", action="store_true", help="continue the phases checkpointed in --output")
    parser.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> list[str]:
    overrides = list(QUICK_OVERRIDES) if args.quick else []
    if args.recipe:
        overrides.append(f"recipe={args.recipe}")
    real_data = [args.train_ann, args.train_images, args.val_ann, args.val_images]
    if any(real_data):
        if not all(real_data):
            raise ConfigError("real data needs all four of --train-ann, --train-images, --val-ann, --val-images.")
        overrides += ["data.dataset=coco", f"data.train_ann={args.train_ann}", f"data.train_images={args.train_images}",
                      f"data.val_ann={args.val_ann}", f"data.val_images={args.val_images}"]  # fmt: skip
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    if args.teacher_ckpt:
        overrides.append(f"teacher.checkpoint={args.teacher_ckpt}")
    if args.teacher_weights:
        overrides.append(f"teacher.weights={args.teacher_weights}")
    return overrides + list(args.set)


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN: undefined metrics are null
    if isinstance(value, Path):
        return str(value)
    return value


def results_table(rows: dict[str, dict], columns: tuple = COCO_COLUMNS + LVIS_COLUMNS) -> str:
    """Metrics ``columns`` in percent (format_metrics_table), then params (M) and images/s."""
    metric_lines = format_metrics_table(rows, list(columns)).split("\n")
    width = max(len(line) for line in metric_lines)
    extra = [("params (M)", "params_millions", "{:.2f}"), ("img/s", "images_per_second", "{:.1f}")]
    cells = [[header for header, _, _ in extra]] + [[fmt.format(m[key]) for _, key, fmt in extra] for m in rows.values()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(extra))]
    return "\n".join(
        line.ljust(width) + "".join("  " + cell.rjust(w) for cell, w in zip(row, widths))
        for line, row in zip(metric_lines, cells)
    )


def planned_outputs(config: ExperimentConfig, num_classes: int, output: Path) -> dict[Path, int]:
    """Estimated sizes of the files the student phases write into ``output``: the baseline and
    distilled checkpoints (a Distiller's state holds its teachers) and the students' weights."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        student = build_detector(config.student.name, num_classes, config.student.image_size)
        teachers = [build_detector(s.name, num_classes, s.image_size) for s in (config.teacher, *config.extra_teachers)]
    if (config.distill or {}).get("self_distillation"):
        teachers = [student]  # the teacher is a copy of the student
    baseline = checkpoint_bytes(student, list(student.parameters()), config.optim.optimizer)
    distilled = baseline + sum(state_bytes(teacher) for teacher in teachers)
    weights = checkpoint_bytes(student)  # the state_dict alone
    return {
        output / "baseline.ckpt": baseline, output / "distilled.ckpt": distilled,
        output / "student_baseline.pth": weights, output / "student_distilled.pth": weights,
    }  # fmt: skip


def check_model_checkpoints(config: ExperimentConfig, dataset: CocoDetectionDataset, main: bool) -> None:
    """Every teacher/student checkpoint exists and, where it has a categories sidecar, lists the
    dataset's categories in the same order (before anything trains)."""
    sections = {"teacher": config.teacher, "student": config.student}
    sections.update({f"extra_teachers[{i}]": section for i, section in enumerate(config.extra_teachers)})
    for where, section in sections.items():
        if not section.checkpoint:
            continue
        if not Path(section.checkpoint).is_file():
            raise FileNotFoundError(f"{where}.checkpoint {section.checkpoint} does not exist.")
        if not check_categories(section.checkpoint, dataset.categories) and main:
            print(f"note: {section.checkpoint} has no {categories_path(section.checkpoint).name}; the order of its "
                  "classes cannot be checked against this dataset's", flush=True)  # fmt: skip


def write_category_sidecars(paths: list[Path], dataset: CocoDetectionDataset) -> None:
    ids = [dataset.label_to_category_id[label] for label in range(1, dataset.num_classes + 1)]
    for path in paths:
        if path.is_file():
            write_categories(path, dataset.categories, ids)


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from(args)
    config = load_experiment_config(args.config, overrides)
    rank, world_size = init_distributed()
    main = is_main_process()
    output = Path(args.output)
    if main:
        check_output_folder(output, 0)  # creatable and writable; the space once the models are known
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if main:
        mode = "QUICK smoke run: tiny dataset and budget, expect little or no signal" if args.quick else "full run"
        print(
            f"densekd train_det ({mode}): recipe {config.recipe}, teacher {config.teacher.name} "
            f"{config.teacher_optim.iterations} it, students {config.student.name} {config.optim.iterations} it, "
            f"batch {config.data.batch_size} x {world_size} process(es), {args.threads} threads",
            flush=True,
        )

    t = time.perf_counter()
    files = data_files(config)
    val_set = CocoDetectionDataset(files.val_images, files.val_ann, skip_bad=config.data.skip_bad)
    num_classes = val_set.num_classes
    timings["data"] = time.perf_counter() - t
    check_model_checkpoints(config, val_set, main)
    if main:
        needed = bytes_needed(planned_outputs(config, num_classes, output))
        check_output_folder(output, needed, "this run's checkpoints and weights")

    t = time.perf_counter()
    teachers, teacher_info = prepare_teachers(config, files, num_classes, rank, world_size, retrain=args.retrain_teacher)
    timings["teacher"] = time.perf_counter() - t
    if main:
        write_category_sidecars([Path(info["cache"]) / "teacher.ckpt" for info in teacher_info if "cache" in info], val_set)
        for index, info in enumerate(teacher_info):
            source = (
                f"loaded from {info['checkpoint']}" if "checkpoint" in info
                else f"torchvision weights {info['weights']}" if "weights" in info
                else f"trained or reused from {info['cache']}"
            )  # fmt: skip
            print(f"[teacher {index}] {source}", flush=True)
    self_distilled = bool((config.distill or {}).get("self_distillation"))

    students, summaries = {}, {}
    for name, phase_teachers in (("baseline", None), ("distilled", [] if self_distilled else teachers)):
        t = time.perf_counter()
        if main:
            print(f"[{name}] training {config.student.name} for {config.optim.iterations} iterations", flush=True)
        students[name], summaries[name] = train_student(
            config, files, num_classes, phase_teachers, output, name, args.resume, rank, world_size
        )
        if main:
            save_checkpoint(output / f"student_{name}.pth", students[name].state_dict())
            for cache in summaries[name].get("teacher_cache", []):
                how = f"built in {cache['build_seconds']:.1f} s" if cache["built_now"] else "reused"
                print(f"[{name}] offline: teacher outputs {cache['folder']} ({cache['size_bytes'] / 1e6:.1f} MB, {how})", flush=True)
            write_category_sidecars([output / f"student_{name}.pth", output / f"{name}.ckpt"], val_set)
        timings[f"{name}_train"] = time.perf_counter() - t
    if not main:
        return 0

    loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate_detection)
    rows: dict[str, dict] = {}
    for name, model in zip(MODELS, (teachers[0], students["baseline"], students["distilled"])):
        t = time.perf_counter()
        metrics, results, images_per_second = evaluate(model, loader, val_set)
        metrics["params_millions"] = sum(p.numel() for p in model.parameters()) / 1e6
        metrics["images_per_second"] = images_per_second
        rows[name] = metrics
        save_results(results, output / f"detections_{name}.json")
        timings[f"{name}_eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    per_class = {name: rows[name].pop("per_class_ap") for name in MODELS}
    train_counts = CocoDetectionDataset(files.train_images, files.train_ann, skip_bad=config.data.skip_bad)
    plot_per_class_ap(
        per_class,
        {val_set.label_to_category_id[label]: name for label, name in enumerate(val_set.categories, start=1)},
        {train_counts.label_to_category_id[label]: n for label, n in enumerate(train_counts.image_counts, start=1)},
        output / "per_class_ap.png",
        title=f"AP per category, students trained {config.optim.iterations} iterations",
    )
    table = results_table(rows)
    print(f"\nval split ({len(val_set)} images), AP in percent; students trained {config.optim.iterations} iterations\n")
    print(table)
    gain = {m: rows["distilled"][m] - rows["baseline"][m] for m in ("AP", "APr", "APf")}
    print("\ndistilled vs baseline: " + ", ".join(f"{m} {100 * g:+.1f}" for m, g in gain.items()))
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "overrides": overrides,
        "config": json.loads(json.dumps(config, default=lambda section: section.__dict__)),
        "regime": f"students trained {config.optim.iterations} iterations (batch {config.data.batch_size} x {world_size})",
        "models": rows,
        "per_class_ap": per_class,
        "distilled_minus_baseline": gain,
        "training": {"teachers": teacher_info, **summaries},
        "timings_seconds": timings,
        "table": table,
    }
    (output / "metrics.json").write_text(json.dumps(jsonable(report), indent=2))
    print(f"wrote {output}/metrics.json, per_class_ap.png, detections_*.json, student_baseline.pth, student_distilled.pth")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    except (ConfigError, BadDatasetError, FileNotFoundError, CategoryOrderError, CheckpointLoadError) as error:
        print(f"train_det: {error}", file=sys.stderr)
        return 2
    except (OutputFolderError, CheckpointWriteError, NonFiniteTrainingError) as error:
        print(f"train_det: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as interrupted:
        print(f"train_det: {interrupted}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
