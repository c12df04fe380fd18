"""Training, evaluation and checkpointing loops; no model-specific code.

``train`` takes a torchvision detector or a :class:`~densekd.distiller.Distiller` (anything
that returns a loss dict in training mode), ``evaluate`` any detector that returns
torchvision-style detections in eval mode.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .evaluation import evaluate_coco, evaluate_lvis_style, to_coco_results

__all__ = ["evaluate", "save_checkpoint", "train", "warmup_cosine"]

COCO_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_COLUMNS = ("APr", "APc", "APf")


def warmup_cosine(iterations: int, warmup_iters: int):
    """LR multiplier at step ``i``: linear 1/(w+1) -> 1 over ``warmup_iters``, then cosine 1 -> 0."""

    def factor(step: int) -> float:
        if step < warmup_iters:
            return (step + 1) / (warmup_iters + 1)
        progress = (step - warmup_iters) / max(1, iterations - warmup_iters)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _cycle(data_loader) -> Iterator:
    """Iterate a loader forever, epoch after epoch (a fresh shuffle each epoch)."""
    while True:
        yielded = False
        for batch in data_loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("The data loader is empty; nothing to train on.")


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


def train(
    model_or_distiller: nn.Module,
    data_loader,
    iterations: int,
    lr: float,
    weight_decay: float,
    warmup_iters: int,
    clip_grad_norm: Optional[float],
    log_every: int,
    log_file: Union[str, os.PathLike, None] = None,
) -> dict[str, Any]:
    """Train for a fixed number of iterations, cycling through ``data_loader``.

    AdamW over ``trainable_parameters()`` when the object has it (a Distiller: student and
    connectors), else over ``parameters()``; LR warms up linearly over ``warmup_iters`` then
    follows a cosine to 0; gradients are clipped to ``clip_grad_norm`` (None: no clipping).
    Every ``log_every`` iterations (and at the last) prints one line and, with ``log_file``,
    appends a JSON line holding every loss term (the weighted ``kd_*`` values as returned and,
    for a Distiller, the unscaled values and weights from ``last_terms``).

    Returns:
        ``{"iterations", "seconds", "seconds_per_iteration", "final_losses"}``; the loss
        values are the mean over the last logging window.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    parameters = (
        list(model_or_distiller.trainable_parameters())
        if hasattr(model_or_distiller, "trainable_parameters")
        else [p for p in model_or_distiller.parameters() if p.requires_grad]
    )
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(iterations, warmup_iters))
    log = open(log_file, "a", encoding="utf-8") if log_file is not None else None

    model_or_distiller.train()
    batches = _cycle(data_loader)
    window: dict[str, float] = {}
    window_steps = 0
    start = time.perf_counter()
    try:
        for iteration in range(1, iterations + 1):
            images, targets = next(batches)
            loss_dict = model_or_distiller(images, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Non-finite loss at iteration {iteration}: "
                    f"{ {k: float(v) for k, v in loss_dict.items()} }. Lower the LR or the kd weights."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
            optimizer.step()
            scheduler.step()

            for name, value in loss_dict.items():
                window[name] = window.get(name, 0.0) + float(value.detach())
            window["loss"] = window.get("loss", 0.0) + float(loss.detach())
            window_steps += 1
            if iteration % log_every == 0 or iteration == iterations:
                means = {name: total / window_steps for name, total in window.items()}
                elapsed = time.perf_counter() - start
                eta = elapsed / iteration * (iterations - iteration)
                kd = "".join(f" {k}={v:.4f}" for k, v in means.items() if k.startswith("kd_"))
                print(
                    f"  it {iteration:>5d}/{iterations}  loss {means['loss']:.4f}{kd}  "
                    f"lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed / iteration:.2f}s/it  eta {_format_seconds(eta)}",
                    flush=True,
                )
                if log is not None:
                    record: dict[str, Any] = {
                        "iteration": iteration,
                        "lr": optimizer.param_groups[0]["lr"],
                        "seconds": round(elapsed, 3),
                        "losses": means,
                    }
                    last_terms = getattr(model_or_distiller, "last_terms", None)
                    if last_terms:
                        record["kd_terms_last_step"] = {
                            key: {"unscaled": float(v["unscaled"]), "weight": float(v["weight"])}
                            for key, v in last_terms.items()
                        }
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                final_losses, window, window_steps = means, {}, 0
    finally:
        if log is not None:
            log.close()
    seconds = time.perf_counter() - start
    return {
        "iterations": iterations,
        "seconds": seconds,
        "seconds_per_iteration": seconds / iterations,
        "final_losses": final_losses,
    }


def evaluate(model: nn.Module, data_loader, dataset) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Detect on every image of ``data_loader`` and score with COCO and LVIS-style metrics.

    Args:
        model: a detector returning torchvision detections (``boxes``, ``scores``, ``labels``
            with labels 1..K) in eval mode.
        data_loader: yields ``(images, targets)``; each target carries ``image_id``.
        dataset: a :class:`~densekd.data.CocoDetectionDataset` (``coco``, ``label_to_category_id``).

    Returns:
        ``(metrics, results, images_per_second)``: ``metrics`` holds AP, AP50, AP75, APs, APm,
        APl (pycocotools) and APr, APc, APf (LVIS-style), fractions in [0, 1], plus
        ``dropped_detections``: detections whose label has no category (e.g. an unused
        background channel), left out of the results; ``results`` the COCO result records;
        ``images_per_second`` the model's throughput (forward passes only).
    """
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    known = set(dataset.label_to_category_id)
    dropped = 0
    images_seen, model_seconds = 0, 0.0
    with torch.inference_mode():
        for images, targets in data_loader:
            start = time.perf_counter()
            predictions = model(images)
            model_seconds += time.perf_counter() - start
            images_seen += len(images)
            kept = []
            for prediction in predictions:
                valid = torch.tensor([int(label) in known for label in prediction["labels"]], dtype=torch.bool)
                dropped += int((~valid).sum())
                kept.append({key: prediction[key][valid] for key in ("boxes", "scores", "labels")})
            results += to_coco_results(kept, [t["image_id"] for t in targets], dataset.label_to_category_id)
    model.train(was_training)
    coco = evaluate_coco(dataset.coco, results)
    lvis = evaluate_lvis_style(dataset.coco.dataset, results)
    metrics: dict[str, Any] = {name: coco[name] for name in COCO_COLUMNS}
    metrics.update({name: lvis[name] for name in LVIS_COLUMNS})
    metrics["dropped_detections"] = dropped
    return metrics, results, images_seen / max(model_seconds, 1e-9)


def save_checkpoint(path: Union[str, os.PathLike], state: dict[str, Any]) -> None:
    """``torch.save(state)`` atomically: a temporary file in the same folder, then ``os.replace``,
    so a crash never leaves a truncated checkpoint where a complete one is expected."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
