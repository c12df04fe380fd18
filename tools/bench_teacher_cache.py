"""What offline distillation costs and saves: the teacher-output cache's size and build time,
and the time of a training step (forward, backward, optimizer) of a plain student, an online
distilled one and an offline (cached) one, on the demo models and data::

    python tools/bench_teacher_cache.py --threads 1                 # demo: 2000 train images, 96 px, batch 8
    python tools/bench_teacher_cache.py --threads 1 --num-train 400 --steps 10

The three kinds of step are interleaved (their order rotates every round) on the same
batches, and each is reported as the median over the rounds, so a shared machine's load
drifts into all three alike; still, read the ratios, not the absolute times, and run it
twice. The teacher has random weights: its cost does not depend on what it learnt.

:func:`measure_teacher_cache` returns the figures as a dict for other scripts.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from densekd import Distiller
from densekd.data import CocoDetectionDataset, SyntheticConfig, collate_detection, ensure_synthetic_dataset
from densekd.detection.models import build_detector
from densekd.detection.teacher_cache import teacher_caches_for
from densekd.experiment.config import build_terms, load_experiment_config, parse_distillation_config

MODES = ("plain", "online", "offline")


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images, targets) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    sum(model(images, targets).values()).backward()
    optimizer.step()
    return time.perf_counter() - started


def measure_teacher_cache(
    teacher: str = "fcos_resnet34_fpn128",
    student: str = "fcos_resnet18_fpn64",
    recipe: str = "logit_cwd",
    image_size: int = 96,
    batch_size: int = 8,
    steps: int = 20,
    warmup_steps: int = 2,
    num_train: Optional[int] = None,
    dtype: str = "float16",
    cache_dir: Optional[Path] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build (or reuse, with ``cache_dir``) the teacher-output cache over the synthetic training
    set and time ``steps`` interleaved rounds of a plain, an online and an offline step.

    Returns ``{"cache": {...bytes, build_seconds...}, "step_seconds": {mode: median},
    "ratios": {...}, "settings": {...}}``.
    """
    synthetic = SyntheticConfig(image_size=image_size, **({"num_train": num_train} if num_train else {}))
    paths = ensure_synthetic_dataset(config=synthetic)
    dataset = CocoDetectionDataset(paths.train_images, paths.train_ann)
    num_classes = dataset.num_classes
    distill = parse_distillation_config(load_experiment_config(None, [f"recipe={recipe}"]).distill)
    terms = build_terms(distill, dataset.image_counts, dataset.annotation_counts, total_iters=warmup_steps + steps)

    torch.manual_seed(seed)
    teacher_model = build_detector(teacher, num_classes, image_size)
    plain = build_detector(student, num_classes, image_size).train()
    online = Distiller(copy.deepcopy(plain), teacher_model, terms, probe_size=image_size).train()
    offline = Distiller(copy.deepcopy(plain), teacher_model, terms, probe_size=image_size).train()
    offline.connectors.load_state_dict(online.connectors.state_dict())

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(cache_dir) if cache_dir is not None else Path(scratch)
        started = time.perf_counter()
        caches = teacher_caches_for(offline, dataset, root, dtype=dtype, batch_size=batch_size)
        ready_seconds = time.perf_counter() - started
        offline.use_teacher_cache(caches)
        models = {"plain": plain, "online": online, "offline": offline}
        optimizers = {
            name: torch.optim.AdamW(
                model.trainable_parameters() if isinstance(model, Distiller) else model.parameters(), lr=1e-3
            )
            for name, model in models.items()
        }
        order = np.random.default_rng(seed).permutation(len(dataset))
        times: dict[str, list[float]] = {name: [] for name in MODES}
        for round_index in range(warmup_steps + steps):
            rows = order[(round_index * batch_size) % len(dataset) :][:batch_size]
            images, targets = collate_detection([dataset[int(i)] for i in rows])
            rotation = MODES[round_index % 3 :] + MODES[: round_index % 3]
            for name in rotation:
                seconds = _step(models[name], optimizers[name], images, targets)
                if round_index >= warmup_steps:
                    times[name].append(seconds)
        cache = caches[0]
        cache_info = {
            "folder": str(cache.folder) if cache_dir is not None else None,
            "bytes": sum(c.size_bytes for c in caches),
            "bytes_per_image": sum(c.size_bytes for c in caches) / cache.num_images,
            "num_images": cache.num_images,
            "dtype": dtype,
            "outputs": list(cache.outputs),
            "levels": list(cache.levels),
            "build_seconds": sum(c.build_seconds for c in caches),
            "built_now": all(c.built for c in caches),
            "ready_seconds": ready_seconds,  # key check + build (or reuse)
        }
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "cache": cache_info,
        "step_seconds": median,
        "ratios": {
            "online_vs_plain": median["online"] / median["plain"],
            "offline_vs_plain": median["offline"] / median["plain"],
            "offline_vs_online": median["offline"] / median["online"],
        },
        "settings": {
            "teacher": teacher, "student": student, "recipe": recipe, "image_size": image_size,
            "batch_size": batch_size, "steps": steps, "warmup_steps": warmup_steps, "threads": torch.get_num_threads(),
        },  # fmt: skip
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="fcos_resnet34_fpn128")
    parser.add_argument("--student", default="fcos_resnet18_fpn64")
    parser.add_argument("--recipe", default="logit_cwd", help="the recipe whose terms are distilled")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (each: one step of every kind)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--num-train", type=int, help="training images of the synthetic set (default: the demo's 2000)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--cache-dir", type=Path, help="keep (and reuse) the cache here; default: a temporary folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure_teacher_cache(
        args.teacher, args.student, args.recipe, args.image_size, args.batch_size, args.steps,
        args.warmup_steps, args.num_train, args.dtype, args.cache_dir,
    )  # fmt: skip
    cache, steps, ratios = result["cache"], result["step_seconds"], result["ratios"]
    how = "built now" if cache["built_now"] else "reused"
    print(
        f"teacher-output cache ({how}): {cache['num_images']} images, {cache['dtype']}, outputs {cache['outputs']}, "
        f"levels {cache['levels']}: {cache['bytes'] / 1e6:.1f} MB ({cache['bytes_per_image'] / 1e3:.1f} kB/image), "
        f"built in {cache['build_seconds']:.1f} s"
    )
    print(
        f"median step over {result['settings']['steps']} interleaved rounds, {args.threads} thread(s): "
        + ", ".join(f"{name} {1000 * steps[name]:.0f} ms" for name in MODES)
    )
    print(
        f"ratios: online/plain {ratios['online_vs_plain']:.2f}, offline/plain {ratios['offline_vs_plain']:.2f}, "
        f"offline/online {ratios['offline_vs_online']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
