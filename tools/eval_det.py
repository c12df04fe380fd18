"""Evaluate a detector checkpoint with COCO and LVIS-style metrics.

    python tools/eval_det.py --ckpt runs/train_det/student_distilled.pth
    python tools/eval_det.py --config FILE --ckpt C.pth --val-ann B.json --val-images DIR [--model teacher]
    python tools/eval_det.py --config FILE --ckpt C.pth --data-format voc --data-root VOCdevkit/VOC2007 \\
        --train-split trainval --val-split test
    python tools/eval_det.py --ckpt C.pth --per-class    # how each class fails: scores, recall, confusions

The model is built from the experiment config (its student by default), the weights are
loaded with ``weights_only=True`` (a state_dict or a densekd training checkpoint), and the
table has the columns of ``tools/train_det.py``'s. A checkpoint whose
``<ckpt>.categories.json`` (written by train_det) lists the dataset's categories in another
order, or other categories, is refused: its class channels would be scored as the wrong classes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from densekd.data import CocoDetectionDataset, collate_detection
from densekd.data.categories import categories_path, check_categories
from densekd.detection.models import build_detector
from densekd.evaluation import class_report, evaluate, format_class_report, save_results
from densekd.experiment.config import ConfigError, load_experiment_config
from densekd.experiment.phases import data_files
from densekd.training.checkpoints import load_weights

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from _cli import add_format_arguments, check_format_arguments, convert_splits  # noqa: E402
from train_det import DEFAULT_CONFIG, jsonable, results_table  # noqa: E402  (one table and JSON format for both tools)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML that defines the model")
    parser.add_argument("--ckpt", required=True, help="weights: a state_dict or a densekd training checkpoint")
    parser.add_argument("--model", choices=("student", "teacher"), default="student", help="which model of the config")
    parser.add_argument("--val-ann", help="COCO/LVIS-format annotations (default: the config's validation split)")
    parser.add_argument("--val-images", help="folder of the validation images")
    parser.add_argument("--train-ann", help="training annotations whose image counts give the LVIS rare/common/frequent "
                        "groups when --val-ann has no 'frequency' (default: the config's training split)")
    parser.add_argument("--train-images", help="folder of the training images (with --train-ann)")
    parser.add_argument("--skip-bad", action="store_true", help="drop bad images/annotations (reported) instead of stopping")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--output", help="write metrics.json and detections.json here")
    parser.add_argument("--per-class", action="store_true", help="also print, per class: AP, its mean top score in "
                        "images with and without it, its detections, recall at IoU 0.5 and the labels its missed boxes got")
    parser.add_argument("--threads", type=int, default=2)
    add_format_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    config = load_experiment_config(args.config, args.set)
    if bool(args.val_ann) != bool(args.val_images):
        raise ConfigError("give both --val-ann and --val-images, or neither.")
    if bool(args.train_ann) != bool(args.train_images):
        raise ConfigError("give both --train-ann and --train-images, or neither.")
    check_format_arguments(args)
    skip_bad = args.skip_bad or config.data.skip_bad
    if args.data_format != "coco":  # the converted files stand in for the four COCO flags from here on
        train_split, val_split = convert_splits(args, skip_bad)
        args.train_ann, args.train_images = str(train_split.annotation_file), str(train_split.image_dir)
        args.val_ann, args.val_images = str(val_split.annotation_file), str(val_split.image_dir)
    if args.val_ann:
        val_ann, val_images = Path(args.val_ann), Path(args.val_images)
    else:
        files = data_files(config)
        val_ann, val_images = files.val_ann, files.val_images
    dataset = CocoDetectionDataset(val_images, val_ann, skip_bad=skip_bad)
    frequencies = None  # the file's own 'frequency', if any
    if dataset.frequency_groups is None:
        if args.train_ann:
            train = CocoDetectionDataset(Path(args.train_images), Path(args.train_ann), skip_bad=skip_bad)
        elif not args.val_ann:
            train = CocoDetectionDataset(files.train_images, files.train_ann, skip_bad=skip_bad)
        else:
            train = None
            print(f"note: {val_ann.name} has no LVIS 'frequency': APr/APc/APf need the training split's image "
                  "counts (--train-ann, --train-images)", flush=True)  # fmt: skip
        if train is not None:
            frequencies = train.lvis_frequencies()
            print(f"note: rare/common/frequent groups from {train.frequency_source}", flush=True)
    section = config.student if args.model == "student" else config.teacher
    if not check_categories(args.ckpt, dataset.categories):  # raises CategoryOrderError on another order
        print(f"note: {args.ckpt} has no {categories_path(args.ckpt).name}; the order of its classes cannot be "
              "checked against this dataset's", flush=True)  # fmt: skip
    model = load_weights(build_detector(section.name, dataset.num_classes, section.image_size), args.ckpt)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=collate_detection)
    metrics, results, images_per_second = evaluate(model, loader, dataset, frequencies)
    metrics["params_millions"] = sum(p.numel() for p in model.parameters()) / 1e6
    metrics["images_per_second"] = images_per_second
    print(f"{val_ann} ({len(dataset)} images), AP in percent\n")
    print(results_table({Path(args.ckpt).stem: metrics}))
    if args.per_class:
        report = class_report(dataset.coco, results)
        groups = frequencies if frequencies is not None else dataset.lvis_frequencies() if dataset.frequency_groups else None
        print("\n" + format_class_report(report, metrics["per_class_ap"], groups))
        metrics["per_class"] = [dataclasses.asdict(diagnosis) for diagnosis in report]
    if args.output:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        save_results(results, output / "detections.json")
        report = {"checkpoint": args.ckpt, "metrics": metrics}
        (output / "metrics.json").write_text(json.dumps(jsonable(report), indent=2))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"eval_det: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
