"""What tools/train_det.py and tools/train_seg.py share: the flags both take, the config overrides
those flags stand for, the student phases, the teacher lines, the report's common fields, the JSON and table formats
and the exit codes. Each tool declares only what differs (its help texts, defaults, extra flags)."""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from densekd.data import ConvertedDataset, voc_to_coco, yolo_to_coco
from densekd.evaluation import COCO_COLUMNS, LVIS_COLUMNS, format_metrics_table
from densekd.experiment.config import ConfigError
from densekd.experiment.phases import Task, train_student
from densekd.training import TrainingInterrupted, save_checkpoint

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
REAL_DATA_FLAGS = "--train-ann, --train-images, --val-ann, --val-images"
DATA_FORMATS = ("coco", "yolo", "voc")


def tool_parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_data_arguments(
    parser: argparse.ArgumentParser, default_config: Path, config_help: str, recipe_help: str, annotations: str
) -> None:
    """--config, --recipe, --quick and the four real-data flags; ``annotations`` names what the
    annotation files hold (e.g. "annotations", "instance annotations")."""
    parser.add_argument("--config", default=str(default_config), help=config_help)
    parser.add_argument("--recipe", help=recipe_help)
    parser.add_argument("--quick", action="store_true", help="tiny dataset and budget: a smoke run, little signal")
    parser.add_argument("--train-ann", help=f"COCO/LVIS-format training {annotations} (switches data to 'coco')")
    parser.add_argument("--train-images", help="folder of the training images")
    parser.add_argument("--val-ann", help=f"COCO/LVIS-format validation {annotations}")
    parser.add_argument("--val-images", help="folder of the validation images")


def add_run_arguments(parser: argparse.ArgumentParser, output: str, threads: int, threads_help: str) -> None:
    """The teacher's source, --output, --set, --resume, --retrain-teacher and --threads."""
    parser.add_argument("--teacher-ckpt", help="teacher weights (state_dict or a densekd checkpoint); skips teacher training")
    parser.add_argument("--teacher-weights", help="torchvision pretrained weights of the teacher's builder, e.g. DEFAULT")
    parser.add_argument("--output", default=output, help="folder for checkpoints, logs, metrics and weights")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=0.01")
    parser.add_argument("--resume", action="store_true", help="continue the phases checkpointed in --output")
    parser.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-format and, for YOLO and Pascal VOC data, --data-root, --train-split, --val-split and
    --class-names (the detection tools; segmentation reads COCO files only)."""
    group = parser.add_argument_group(
        "YOLO and Pascal VOC data",
        "--data-format yolo|voc reads two splits of --data-root, converts them to COCO-format files\n"
        "(in $DENSEKD_CACHE/converted, reused while the data is unchanged) and uses those instead of\n"
        "--train-ann/--val-ann; the validation split takes the training split's classes. Examples:\n"
        "  --data-format yolo --data-root datasets/coco8   (images/train, images/val, data.yaml)\n"
        "  --data-format voc --data-root VOCdevkit/VOC2007 --train-split trainval --val-split test",
    )
    group.add_argument("--data-format", choices=DATA_FORMATS, default="coco",
                       help="coco (default): the --train-ann/--val-ann files; yolo or voc: the folder --data-root")  # fmt: skip
    group.add_argument("--data-root", metavar="ROOT",
                       help="yolo: the folder with images/<split>/, labels/<split>/ and data.yaml (or classes.txt); "
                            "voc: the folder with Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt, "
                            "e.g. VOCdevkit/VOC2007")  # fmt: skip
    group.add_argument("--train-split", default="train", metavar="SPLIT",
                       help="yolo/voc: the training split: images/SPLIT/ or ImageSets/Main/SPLIT.txt (default: train)")  # fmt: skip
    group.add_argument("--val-split", default="val", metavar="SPLIT", help="yolo/voc: the validation split (default: val)")
    group.add_argument("--class-names", metavar="FILE",
                       help="yolo/voc: class names, one per line, class 0 first (default: yolo data.yaml or classes.txt; "
                            "voc the sorted names found in the training split)")  # fmt: skip


def check_format_arguments(args: argparse.Namespace) -> None:
    """The data flags given belong to --data-format: COCO files or a YOLO/VOC folder, not both."""
    if args.data_format == "coco":
        if args.data_root or args.class_names:
            raise ConfigError("--data-root and --class-names are for --data-format yolo or voc; "
                              f"COCO-format data is given by {REAL_DATA_FLAGS}.")  # fmt: skip
        return
    if not args.data_root:
        raise ConfigError(f"--data-format {args.data_format} needs --data-root (with --train-split and --val-split, "
                          "default train and val).")  # fmt: skip
    given = [flag for flag in ("train_ann", "train_images", "val_ann", "val_images") if getattr(args, flag)]
    if given:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in given)
        raise ConfigError(f"{flags} name COCO-format files, but --data-format is {args.data_format}: give the dataset "
                          "folder as --data-root and its splits as --train-split and --val-split.")  # fmt: skip


def convert_splits(args: argparse.Namespace, skip_bad: bool) -> tuple[ConvertedDataset, ConvertedDataset]:
    """--data-root's training and validation splits as COCO-format files; the validation split gets
    the training split's classes, so that both number them alike."""
    names = None
    if args.class_names:
        path = Path(args.class_names)
        if not path.is_file():
            raise FileNotFoundError(f"--class-names file not found: {path}; give a text file with one class name per line.")
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    root = Path(args.data_root)
    if args.data_format == "yolo":
        train = yolo_to_coco(root, args.train_split, names, skip_bad=skip_bad)
        return train, yolo_to_coco(root, args.val_split, train.categories, skip_bad=skip_bad)
    train = voc_to_coco(root, args.train_split, names, names_split=args.train_split, skip_bad=skip_bad)
    return train, voc_to_coco(root, args.val_split, train.categories, skip_bad=skip_bad)


def converted_overrides(train: ConvertedDataset, val: ConvertedDataset) -> list[str]:
    """The config overrides that point data.* at converted splits (as the four COCO flags do)."""
    return ["data.dataset=coco", f"data.train_ann={train.annotation_file}", f"data.train_images={train.image_dir}",
            f"data.val_ann={val.annotation_file}", f"data.val_images={val.image_dir}"]  # fmt: skip


def real_data_given(args: argparse.Namespace) -> bool:
    return any([args.train_ann, args.train_images, args.val_ann, args.val_images])


def data_overrides(args: argparse.Namespace, data_name: str) -> list[str]:
    """--quick, --recipe and the real-data flags as config overrides; ``data_name`` opens the
    error for an incomplete set of real-data flags (e.g. "real data")."""
    overrides = list(QUICK_OVERRIDES) if args.quick else []
    if args.recipe:
        overrides.append(f"recipe={args.recipe}")
    if real_data_given(args):
        if not all([args.train_ann, args.train_images, args.val_ann, args.val_images]):
            raise ConfigError(f"{data_name} needs all four of {REAL_DATA_FLAGS}.")
        overrides += ["data.dataset=coco", f"data.train_ann={args.train_ann}", f"data.train_images={args.train_images}",
                      f"data.val_ann={args.val_ann}", f"data.val_images={args.val_images}"]  # fmt: skip
    return overrides


def run_overrides(args: argparse.Namespace) -> list[str]:
    """--teacher-ckpt, --teacher-weights and the --set values, last so that they win."""
    overrides = []
    if args.teacher_ckpt:
        overrides.append(f"teacher.checkpoint={args.teacher_ckpt}")
    if args.teacher_weights:
        overrides.append(f"teacher.weights={args.teacher_weights}")
    return overrides + list(args.set)


def train_students(
    config, files, num_classes: int, teachers: list, output: Path, args: argparse.Namespace,
    rank: int, world_size: int, task: Task, timings: dict[str, float],
    after: Callable[[str, object, dict], None] = lambda name, student, summary: None,
) -> tuple[dict, dict]:
    """The baseline and the distilled student (self-distilled when the recipe says so), each
    saved as a plain state_dict ``student_<name>.pth``; ``after(name, student, summary)`` runs
    on the main process once a student is saved. Returns ``(students, summaries)`` by name."""
    main = rank == 0
    self_distilled = bool((config.distill or {}).get("self_distillation"))
    students, summaries = {}, {}
    for name, phase_teachers in (("baseline", None), ("distilled", [] if self_distilled else teachers)):
        started = time.perf_counter()
        if main:
            print(f"[{name}] training {config.student.name} for {config.optim.iterations} iterations", flush=True)
        students[name], summaries[name] = train_student(
            config, files, num_classes, phase_teachers, output, name, args.resume, rank, world_size, task=task
        )
        if main:
            save_checkpoint(output / f"student_{name}.pth", students[name].state_dict())
            after(name, students[name], summaries[name])
        timings[f"{name}_train"] = time.perf_counter() - started
    return students, summaries


def print_teacher_sources(teacher_info: list[dict]) -> None:
    for index, info in enumerate(teacher_info):
        source = (
            f"loaded from {info['checkpoint']}" if "checkpoint" in info
            else f"torchvision weights {info['weights']}" if "weights" in info
            else f"trained or reused from {info['cache']}"
        )  # fmt: skip
        print(f"[teacher {index}] {source}", flush=True)


def report_header(overrides: list[str], config, world_size: int) -> dict:
    """The fields every tool's metrics.json opens with: how it was run and on what budget."""
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "overrides": overrides,
        "config": json.loads(json.dumps(config, default=lambda section: section.__dict__)),
        "regime": f"students trained {config.optim.iterations} iterations (batch {config.data.batch_size} x {world_size})",
    }


def frequency_summary(frequencies: dict[int, str], dataset) -> str:
    """``r: a, b; c: ...; f: ...``: category names per LVIS group (category id -> group)."""
    names = {dataset.label_to_category_id[label]: name for label, name in enumerate(dataset.categories, start=1)}
    groups = {g: [names[cid] for cid, group in frequencies.items() if group == g and cid in names] for g in "rcf"}
    return "; ".join(f"{g}: {', '.join(members) if members else '-'}" for g, members in groups.items())


def format_percent_gain(value: float) -> str:
    """A gain in percent points, ``-`` when undefined (e.g. APr with no rare category)."""
    return "-" if not math.isfinite(value) else f"{100 * value:+.1f}"


def print_gain_and_timings(gain: dict[str, float], timings: dict[str, float]) -> None:
    print("\ndistilled vs baseline: " + ", ".join(f"{m} {format_percent_gain(g)}" for m, g in gain.items()))
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


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


def run_tool(
    tool: str,
    run: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    input_errors: tuple[type[BaseException], ...],
    environment_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """``run(args)`` with ``args.threads`` torch threads; an error it raises becomes one line on
    stderr and an exit code: 2 for ``input_errors`` (config, data, checkpoints), 1 for
    ``environment_errors`` (disk, numerics), 130 for an interrupted training."""
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    except input_errors as error:
        print(f"{tool}: {error}", file=sys.stderr)
        return 2
    except environment_errors as error:
        print(f"{tool}: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as interrupted:
        print(f"{tool}: {interrupted}", file=sys.stderr)
        return 130
