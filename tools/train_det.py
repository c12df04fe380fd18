"""Distil a detector and say, with COCO and LVIS-style metrics, what it gained.

    python tools/train_det.py                       # the demo on the embedded long-tailed dataset
    python tools/train_det.py --quick               # the same pipeline on a tiny budget (smoke run)
    python tools/train_det.py --recipe long_tail    # any recipe of configs/recipes/
    python tools/train_det.py --set distill.teacher_cache=true   # offline: teacher outputs cached once
    python tools/train_det.py --config FILE --train-ann A.json --train-images DIR \\
        --val-ann B.json --val-images DIR [--teacher-ckpt T.pth] [--output DIR] [--skip-bad]
    python tools/train_det.py --data-format yolo --data-root DIR [--train-split train --val-split val]
    python tools/train_det.py --data-format voc --data-root VOCdevkit/VOC2007 --train-split trainval --val-split test
    torchrun --nproc_per_node 2 tools/train_det.py ...   # data-parallel (gloo on CPU, nccl on GPU)

It trains (or reuses from the cache) the teacher, trains a baseline and a distilled student
with the same budget, seed and batches, evaluates all three and prints one table. Each phase
checkpoints; ``--resume`` continues an interrupted run where it stopped. Before any training
it checks the annotation files (a bad record stops the run with one message naming it, unless
``--skip-bad`` drops bad records and prints how many of each kind went), that the training set
fills at least one batch, that ``--output`` is
writable with room for the run's checkpoints, and that teacher or student checkpoints list the
dataset's categories in the same order (the ``<checkpoint>.categories.json`` it writes next to
every checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from densekd.data import BadDatasetError, CocoDetectionDataset, collate_detection
from densekd.data.categories import CategoryOrderError, categories_path, check_categories, write_categories
from densekd.detection.experiment import DETECTION
from densekd.detection.models import build_detector
from densekd.evaluation import evaluate, plot_per_class_ap, save_results
from densekd.experiment.config import ConfigError, ExperimentConfig, load_experiment_config
from densekd.experiment.phases import check_terms_pair, check_training_set, data_files, prepare_teachers
from densekd.training import CheckpointLoadError, init_distributed, is_main_process
from densekd.training.nonfinite import NonFiniteTrainingError
from densekd.training.output_folder import (
    CheckpointWriteError,
    OutputFolderError,
    bytes_needed,
    check_output_folder,
    checkpoint_bytes,
    state_bytes,
)

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tools") not in sys.path:  # the shared CLI parts, also when this file is imported
    sys.path.insert(0, str(REPO / "tools"))
from _cli import (  # noqa: E402
    QUICK_OVERRIDES,  # noqa: F401  (bench_recipes and eval_det import it, jsonable and results_table from here)
    add_data_arguments,
    add_format_arguments,
    add_run_arguments,
    check_format_arguments,
    convert_splits,
    converted_overrides,
    data_overrides,
    frequency_summary,
    jsonable,
    print_gain_and_timings,
    print_teacher_sources,
    report_header,
    results_table,
    run_overrides,
    run_tool,
    tool_parser,
    train_students,
)

DEFAULT_CONFIG = REPO / "configs" / "experiments" / "demo.yaml"
MODELS = ("teacher", "baseline", "distilled")


def parse_args(argv=None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    add_data_arguments(parser, DEFAULT_CONFIG, "experiment YAML (default: the demo)",
                       "a recipe of configs/recipes/ (replaces the config's recipe)", "annotations")  # fmt: skip
    parser.add_argument("--skip-bad", action="store_true", help="drop bad images/annotations (reported) instead of stopping")
    add_run_arguments(parser, "runs/train_det", 2, "torch CPU threads per process")
    add_format_arguments(parser)
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> list[str]:
    check_format_arguments(args)
    overrides = data_overrides(args, "real data")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    return overrides + run_overrides(args)


def planned_outputs(config: ExperimentConfig, num_classes: int, output: Path) -> dict[Path, int]:
    """Estimated sizes of the files the student phases write into ``output``: the baseline and
    distilled checkpoints and the students' weights. A Distiller's state holds a self-distillation
    teacher but no external one; its connectors (and their optimizer state) are not known before
    it is built, so the teachers' size stands in for them: a generous bound."""
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


def experiment_config(args: argparse.Namespace) -> tuple[list[str], ExperimentConfig]:
    """The overrides and the config they give. With --data-format yolo|voc the two splits are
    converted first (dropping bad records if the config's data.skip_bad says so) and data.*
    points at the COCO-format files, as --train-ann and the other COCO flags would."""
    overrides = overrides_from(args)
    config = load_experiment_config(args.config, overrides)
    if args.data_format != "coco":
        overrides += converted_overrides(*convert_splits(args, config.data.skip_bad))
        config = load_experiment_config(args.config, overrides)
    return overrides, config


def report_teacher_output_caches(name: str, summary: dict) -> None:
    """One line per offline teacher-output cache the student trained from (distill.teacher_cache)."""
    for cache in summary.get("teacher_cache", []):
        how = f"built in {cache['build_seconds']:.1f} s" if cache["built_now"] else "reused"
        print(f"[{name}] offline: teacher outputs {cache['folder']} ({cache['size_bytes'] / 1e6:.1f} MB, {how})", flush=True)


def run(args: argparse.Namespace) -> int:
    overrides, config = experiment_config(args)
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
        if args.data_format != "coco":
            print(f"{args.data_format} data {args.data_root} as COCO-format files: {args.train_split} -> "
                  f"{config.data.train_ann}, {args.val_split} -> {config.data.val_ann}", flush=True)  # fmt: skip

    t = time.perf_counter()
    files = data_files(config)
    val_set = CocoDetectionDataset(files.val_images, files.val_ann, skip_bad=config.data.skip_bad)
    train_counts = CocoDetectionDataset(files.train_images, files.train_ann, skip_bad=config.data.skip_bad)
    num_classes = val_set.num_classes
    frequencies = train_counts.lvis_frequencies()  # APr/APc/APf groups, checked before anything trains
    if main and val_set.frequency_groups is None:
        print(f"note: {files.val_ann.name} has no LVIS 'frequency'; rare/common/frequent groups from "
              f"{train_counts.frequency_source}: {frequency_summary(frequencies, val_set)}", flush=True)  # fmt: skip
    timings["data"] = time.perf_counter() - t
    check_model_checkpoints(config, val_set, main)
    check_training_set(config, files, rank, world_size, task=DETECTION)  # at least one full batch, before any phase trains
    check_terms_pair(config, files, num_classes, task=DETECTION)  # a recipe that cannot pair fails now, not after the teacher
    if main:
        needed = bytes_needed(planned_outputs(config, num_classes, output))
        check_output_folder(output, needed, "this run's checkpoints and weights")

    t = time.perf_counter()
    teachers, teacher_info = prepare_teachers(
        config, files, num_classes, rank, world_size, retrain=args.retrain_teacher, task=DETECTION
    )
    timings["teacher"] = time.perf_counter() - t
    if main:
        write_category_sidecars([Path(info["cache"]) / "teacher.ckpt" for info in teacher_info if "cache" in info], val_set)
        print_teacher_sources(teacher_info)

    def after_student(name: str, student, summary: dict) -> None:
        report_teacher_output_caches(name, summary)
        write_category_sidecars([output / f"student_{name}.pth", output / f"{name}.ckpt"], val_set)

    students, summaries = train_students(
        config, files, num_classes, teachers, output, args, rank, world_size, DETECTION, timings, after_student
    )
    if not main:
        return 0

    loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate_detection)
    rows: dict[str, dict] = {}
    for name, model in zip(MODELS, (teachers[0], students["baseline"], students["distilled"])):
        t = time.perf_counter()
        metrics, results, images_per_second = evaluate(model, loader, val_set, frequencies)
        metrics["params_millions"] = sum(p.numel() for p in model.parameters()) / 1e6
        metrics["images_per_second"] = images_per_second
        rows[name] = metrics
        save_results(results, output / f"detections_{name}.json")
        timings[f"{name}_eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    per_class = {name: rows[name].pop("per_class_ap") for name in MODELS}
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
    print_gain_and_timings(gain, timings)
    report = {
        **report_header(overrides, config, world_size),
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
    return run_tool(
        "train_det", run, parse_args(argv),
        input_errors=(ConfigError, BadDatasetError, FileNotFoundError, CategoryOrderError, CheckpointLoadError),
        environment_errors=(OutputFolderError, CheckpointWriteError, NonFiniteTrainingError),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
