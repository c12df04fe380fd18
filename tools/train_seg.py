"""Distil a semantic-segmentation model and say, with mIoU per frequency group, what it gained.

    python tools/train_seg.py                          # the demo on the embedded long-tailed dataset
    python tools/train_seg.py --quick                  # the same pipeline on a tiny budget (smoke run)
    python tools/train_seg.py --recipe seg_long_tail   # any seg_* recipe of configs/recipes/
    python tools/train_seg.py --set optim.iterations=600 --set optim.lr=0.004
    python tools/train_seg.py --config FILE --train-ann A.json --train-images DIR \\
        --val-ann B.json --val-images DIR [--categories voc] [--teacher-ckpt T.pth] [--output DIR]
    python tools/train_seg.py --mask-folder ROOT [--teacher-ckpt T.pth]
    python tools/train_seg.py --resume --output runs/train_seg   # continue an interrupted run
    torchrun --nproc_per_node 2 tools/train_seg.py ...  # data-parallel (gloo on CPU, nccl on GPU)

It trains (or reuses from the cache, ``$DENSEKD_CACHE/teachers``) the teacher, trains a
baseline and a distilled student with the same budget, seed, initial weights and batches,
evaluates all three on the val split and prints one table: mIoU, pixel accuracy, mean class
accuracy, the mean IoU of the rare / common / frequent classes (LVIS groups by training
images: <= 10, 11-100, > 100), parameters and images/s. Each phase checkpoints; ``--resume``
continues an interrupted run where it stopped.

The demo: torchvision's LRASPP on MobileNetV3-Large as the teacher (600 iterations) and on
MobileNetV3-Small as the students (300 iterations), from scratch on 96 px images; the recipe
``seg_pixel_kl_cwd`` (pixel-wise KD weighted by inverse class pixel frequency, plus CWD on the
logits). Threads: 1 by default (see ``--threads``).

Data:
  * default: the experiment's ``data`` section (``configs/experiments/seg_demo.yaml``: the
    embedded synthetic dataset, its COCO-format instance masks rendered to semantic masks);
  * ``--train-ann/--train-images/--val-ann/--val-images``: COCO/LVIS-format instance
    annotations (polygons or RLE) rendered to semantic masks (0 background, crowd regions
    ignored); ``--categories voc`` keeps the 20 Pascal VOC classes in VOC order (the channel
    order of torchvision's COCO_WITH_VOC_LABELS weights), ``--categories 1,3,person`` a list of
    category ids or names in label order; every other category is background;
  * ``--mask-folder ROOT``: ``ROOT/classes.txt`` (the K foreground class names, one per line)
    and ``ROOT/{train,val}/images/`` with ``ROOT/{train,val}/masks/<image stem>.png``, masks
    holding class indices (0 background, 1..K, 255 ignore).
Models: ``teacher.name`` / ``student.name`` are ``configs/models/`` segmentation definitions or
torchvision segmentation builders (``deeplabv3_resnet50``, ``lraspp_mobilenet_v3_large``, ...),
built without downloading; ``--teacher-ckpt`` loads a trained teacher (a state_dict or a densekd
checkpoint, ``weights_only=True``), ``--teacher-weights DEFAULT`` takes torchvision's pretrained
weights (21 VOC channels: use ``--categories voc``).

Outputs in ``--output``: ``metrics.json`` (every metric, per-class IoU, the resolved config,
the command, timings), ``per_class_iou.png``, ``student_baseline.pth`` and
``student_distilled.pth`` (plain torchvision state_dicts), per-phase logs and checkpoints.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from densekd.core.weighting import lvis_frequency_groups
from densekd.data import BadDatasetError
from densekd.evaluation import evaluate_segmentation, format_per_class_iou, group_mean_iou, plot_per_class_iou
from densekd.experiment.config import ConfigError, load_experiment_config
from densekd.experiment.phases import check_terms_pair, check_training_set, prepare_teachers
from densekd.segmentation.experiment import (
    SEGMENTATION,
    segmentation_data_files,
    segmentation_dataset,
    validation_loader,
)
from densekd.training import CheckpointLoadError, init_distributed, is_main_process
from densekd.training.nonfinite import NonFiniteTrainingError
from densekd.training.output_folder import CheckpointWriteError, OutputFolderError

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tools") not in sys.path:  # the shared CLI parts, also when this file is imported
    sys.path.insert(0, str(REPO / "tools"))
from _cli import (  # noqa: E402  (one set of flags, one table and JSON format for the tools)
    add_data_arguments,
    add_run_arguments,
    data_overrides,
    jsonable,
    print_gain_and_timings,
    print_teacher_sources,
    real_data_given,
    report_header,
    results_table,
    run_overrides,
    run_tool,
    tool_parser,
    train_students,
)

DEFAULT_CONFIG = REPO / "configs" / "experiments" / "seg_demo.yaml"
MODELS = ("teacher", "baseline", "distilled")
# table header -> metric key, in the table's order
COLUMNS = {"mIoU": "mIoU", "pixAcc": "pixel_accuracy", "mAcc": "mean_class_accuracy",
           "IoUr": "mIoU_r", "IoUc": "mIoU_c", "IoUf": "mIoU_f"}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    add_data_arguments(parser, DEFAULT_CONFIG, "experiment YAML (default: the segmentation demo)",
                       "a recipe of configs/recipes/ (replaces the config's recipe), e.g. seg_long_tail",
                       "instance annotations")  # fmt: skip
    parser.add_argument("--categories", help="with --train-ann: 'voc' or comma-separated category ids / names, in label order")
    parser.add_argument("--mask-folder", help="ROOT with classes.txt and {train,val}/{images,masks}/ (switches data to 'mask_folder')")
    add_run_arguments(
        parser, "runs/train_seg", 1,
        "torch CPU threads per process (default 1: the MobileNetV3 models' many small operations ran 3-50x "
        "slower with 2 threads than with 1 on a busy 2-core machine)",
    )  # fmt: skip
    return parser.parse_args(argv)


def _categories(text: str) -> list:
    return [int(item) if item.strip().isdigit() else item.strip() for item in text.split(",") if item.strip()]


def overrides_from(args: argparse.Namespace) -> list[str]:
    coco = real_data_given(args)
    if coco and args.mask_folder:
        raise ConfigError("give either COCO annotations (--train-ann ...) or --mask-folder, not both.")
    overrides = data_overrides(args, "COCO data")
    if args.categories:
        if not coco:
            raise ConfigError("--categories selects COCO categories; it needs --train-ann and friends.")
        value = "voc" if args.categories == "voc" else json.dumps(_categories(args.categories))
        overrides.append(f"data.categories={value}")
    if args.mask_folder:
        overrides += ["data.dataset=mask_folder", f"data.mask_root={args.mask_folder}"]
    return overrides + run_overrides(args)


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from(args)
    config = load_experiment_config(args.config, overrides)
    rank, world_size = init_distributed()
    main = is_main_process()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if main:
        mode = "QUICK smoke run: tiny dataset and budget, expect little or no signal" if args.quick else "full run"
        print(
            f"densekd train_seg ({mode}): recipe {config.recipe}, teacher {config.teacher.name} "
            f"{config.teacher_optim.iterations} it, students {config.student.name} {config.optim.iterations} it, "
            f"{config.student.image_size} px, batch {config.data.batch_size} x {world_size} process(es), {args.threads} threads",
            flush=True,
        )

    t = time.perf_counter()
    files = segmentation_data_files(config)
    train_set = segmentation_dataset(files, "train", None)
    num_classes = train_set.num_classes
    groups = lvis_frequency_groups(train_set.image_counts)  # (K,) 'r' / 'c' / 'f' by training images
    timings["data"] = time.perf_counter() - t

    check_training_set(config, files, rank, world_size, task=SEGMENTATION)  # one full batch, before any phase trains
    check_terms_pair(config, files, num_classes, task=SEGMENTATION)  # a recipe that cannot pair fails now, not after the teacher

    t = time.perf_counter()
    teachers, teacher_info = prepare_teachers(
        config, files, num_classes, rank, world_size, retrain=args.retrain_teacher, task=SEGMENTATION
    )
    timings["teacher"] = time.perf_counter() - t
    if main:
        print_teacher_sources(teacher_info)
    students, summaries = train_students(config, files, num_classes, teachers, output, args, rank, world_size, SEGMENTATION, timings)

    loader = validation_loader(files, batch_size=16, rank=rank, world_size=world_size)  # every rank scores its shard
    class_groups = {label: group for label, group in enumerate(groups, start=1)}  # background (0) is in no group
    rows: dict[str, dict] = {}
    for name, model in zip(MODELS, (teachers[0], students["baseline"], students["distilled"])):
        t = time.perf_counter()
        metrics, images_per_second = evaluate_segmentation(model, loader, num_classes + 1)
        metrics.update(group_mean_iou(metrics["per_class_iou"], class_groups))
        metrics["params_millions"] = sum(p.numel() for p in model.parameters()) / 1e6
        metrics["images_per_second"] = images_per_second
        rows[name] = metrics
        timings[f"{name}_eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    if not main:
        return 0

    class_names = ["background", *train_set.categories]
    image_counts = train_set.channel_image_counts  # (K + 1,) training images holding each class, background first
    per_class = {name: rows[name]["per_class_iou"] for name in MODELS}
    plot_per_class_iou(
        {name: dict(enumerate(values)) for name, values in per_class.items()},
        dict(enumerate(class_names)),
        dict(enumerate(image_counts)),
        output / "per_class_iou.png",
        title=f"IoU per class, students trained {config.optim.iterations} iterations",
    )
    display = {name: {header: rows[name][key] for header, key in COLUMNS.items()} | rows[name] for name in MODELS}
    table = results_table(display, tuple(COLUMNS))
    per_class_table = format_per_class_iou(
        per_class, class_names, {"train images": image_counts, "group": ["-", *groups]}
    )
    val_size = len(loader.dataset.dataset)
    print(f"\nval split ({val_size} images, {config.student.image_size} px), metrics in percent; "
          f"students trained {config.optim.iterations} iterations\n")  # fmt: skip
    print(table)
    print(f"\n{per_class_table}")
    gain = {m: rows["distilled"][m] - rows["baseline"][m] for m in ("mIoU", "mIoU_r", "mIoU_f")}
    print_gain_and_timings(gain, timings)
    report = {
        **report_header(overrides, config, world_size),
        "classes": class_names,
        "frequency_groups": ["-", *groups],
        "training_images": image_counts,
        "models": rows,
        "distilled_minus_baseline": gain,
        "training": {"teachers": teacher_info, **summaries},
        "timings_seconds": timings,
        "table": table,
        "per_class_table": per_class_table,
    }
    (output / "metrics.json").write_text(json.dumps(jsonable(report), indent=2))
    print(f"wrote {output}/metrics.json, per_class_iou.png, student_baseline.pth, student_distilled.pth")
    return 0


def main(argv=None) -> int:
    return run_tool(
        "train_seg", run, parse_args(argv),
        input_errors=(ConfigError, BadDatasetError, FileNotFoundError, CheckpointLoadError),
        environment_errors=(OutputFolderError, CheckpointWriteError, NonFiniteTrainingError),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
