"""A tiny training job for the engine tests, importable (tiny model, dataset, job) and runnable as a
script in a subprocess (kills, signals, torchrun).

    python tests/training/training_job.py --out DIR [--resume] [--kill-at N] [--kill-in-save N [--kill-after-bytes B]] ...

Exits with the engine's INTERRUPTED_EXIT_CODE after a SIGINT/SIGTERM, printing its message on stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from densekd.data.samplers import RandomSampler
from densekd.training import OptimSettings, TrainingInterrupted, TrainingJob, init_distributed, run_training

IMAGE_SIZE = 64
NUM_IMAGES = 16
NUM_CLASSES = 3


def tiny_fcos(seed: int = 0) -> FCOS:
    """FCOS on a one-block-per-stage ResNet (BatchNorm: its running stats are state too) and a 32-channel FPN."""
    torch.manual_seed(seed)
    resnet = ResNet(BasicBlock, [1, 1, 1, 1])
    backbone = BackboneWithFPN(
        resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 32, extra_blocks=LastLevelP6P7(32, 32)
    )
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    return FCOS(backbone, num_classes=NUM_CLASSES + 1, anchor_generator=anchors, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)


def tiny_model(kind: str) -> nn.Module:
    if kind == "regressor":
        return TinyRegressor()
    student = tiny_fcos()
    if kind == "fcos":
        return student
    if kind == "ema":  # self-distillation: an EMA teacher and an iteration buffer in the state_dict
        from densekd import Distiller, Term

        terms = [Term("binary_kd", on="cls_logits", temperature=2.0, weight=0.5)]
        return Distiller.self_distillation(student, terms, mode="ema", ema_decay=0.9, warmup_iters=2, probe_size=IMAGE_SIZE)
    raise ValueError(f"unknown model kind {kind!r}")


class TinyRegressor(nn.Module):
    """A fast stand-in for a detector: conv + BatchNorm (running statistics are state) + linear,
    predicting each image's mean box; returns a torchvision-style loss dict."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=4)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        features = self.norm(self.conv(torch.stack(images))).relu().mean(dim=(2, 3))  # (N, 3, H, W) -> (N, 8)
        boxes = self.head(features)  # (N, 4)
        goal = torch.stack([t["boxes"].mean(dim=0) for t in targets]) / IMAGE_SIZE  # (N, 4)
        return {"loss_box_reg": F.smooth_l1_loss(boxes, goal), "kd_x": 0.1 * boxes.square().mean()}


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class FaultInjector(nn.Module):
    """Wraps a loss-dict model and, at chosen steps (0-based, counted in a buffer so it resumes),
    injects a fault: "nan_loss" makes ``entry`` NaN, "nan_input" makes the images NaN (every
    loss and the BatchNorm statistics), "nan_grad" keeps the loss finite but its gradient NaN;
    "skip" returns a loss without a forward or any gradient, i.e. a step that changes nothing."""

    def __init__(self, model: nn.Module, faults: dict[int, str], entry: str = "kd_x") -> None:
        super().__init__()
        self.model, self.faults, self.entry = model, dict(faults), entry
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, images, targets):
        fault = self.faults.get(int(self.calls))
        self.calls += 1
        if fault == "skip":
            return {"skipped": torch.zeros((), requires_grad=True)}
        if fault == "nan_input":
            images = [image * float("nan") for image in images]
        losses = dict(self.model(images, targets))
        if fault == "nan_loss":
            losses[self.entry] = losses[self.entry] * float("nan")
        elif fault == "nan_grad":
            losses[self.entry] = _NaNGradient.apply(losses[self.entry])
        return losses


class TinyDetectionData(torch.utils.data.Dataset):
    """``NUM_IMAGES`` random 64 px images with 1-2 boxes each, fixed by ``seed``."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(NUM_IMAGES):
            image = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            count = 1 + index % 2
            xy = torch.rand(count, 2, generator=generator) * 32
            wh = 8 + torch.rand(count, 2, generator=generator) * 24
            boxes = torch.cat([xy, xy + wh], dim=1)
            labels = torch.randint(1, NUM_CLASSES + 1, (count,), generator=generator)
            self.items.append((image, {"boxes": boxes, "labels": labels, "image_id": index}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def tiny_job(out: Path, iterations: int = 12, checkpoint_every: int = 4, model: str = "fcos", num_replicas: int = 1,
             rank: int = 0, log_every: int = 4, **optim) -> TrainingJob:  # fmt: skip
    settings = dict(iterations=iterations, lr=1e-3, warmup_iters=2, clip_grad_norm=10.0)
    settings.update(optim)
    return TrainingJob(
        model=tiny_model(model),
        dataset=TinyDetectionData(),
        sampler=RandomSampler(NUM_IMAGES, seed=0, num_replicas=num_replicas, rank=rank),
        batch_size=2,
        optim=OptimSettings(**settings),
        output_dir=Path(out),
        name="run",
        checkpoint_every=checkpoint_every,
        log_every=log_every,
    )


def weights_hash(model: nn.Module) -> tuple[str, str]:
    """(repr of the float64 sum of the parameters, sha256 of every state_dict tensor's bytes)."""
    total = sum(p.detach().double().sum() for p in model.parameters()).item()
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return repr(total), digest.hexdigest()


class _DyingFile:
    """A file that SIGKILLs its process once ``budget`` bytes have gone through it."""

    def __init__(self, file, budget: int) -> None:
        self.file, self.budget, self.written = file, budget, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.written + len(view) >= self.budget:
            self.file.write(view[: self.budget - self.written])
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.written += len(view)
        return self.file.write(view)

    def flush(self) -> None:
        self.file.flush()


def _kill_in_save(iteration: int, after_bytes: int | None = None) -> None:
    """Die (SIGKILL) inside the checkpoint write of ``iteration``: after ``after_bytes`` bytes of
    it (a truncated temp file), or, without ``after_bytes``, after the whole temp file is written,
    before the rename."""
    if after_bytes is not None:
        save = torch.save

        def dying_save(obj, file, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("iteration") == iteration and hasattr(file, "write"):
                file = _DyingFile(file, after_bytes)
            return save(obj, file, *args, **kwargs)

        torch.save = dying_save
        return
    replace = os.replace

    def dying_replace(source, destination, *args, **kwargs):
        if str(destination).endswith(".ckpt") and int(torch.load(source, weights_only=True)["iteration"]) == iteration:
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(source, destination, *args, **kwargs)

    os.replace = dying_replace


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="fcos", choices=["fcos", "ema"])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL itself before step N+1 (N steps done)")
    parser.add_argument("--kill-in-save", type=int, default=None, help="SIGKILL itself inside the checkpoint write of iteration N")
    parser.add_argument("--kill-after-bytes", type=int, default=None, help="with --kill-in-save: after B bytes of it")
    parser.add_argument("--nan-at", type=int, default=None, help="make loss entry bbox_ctrness NaN at step N (0-based)")
    parser.add_argument("--nan-rank", type=int, default=0, help="with --nan-at: only on this rank")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep before each step")
    parser.add_argument("--print-iterations", action="store_true", help="print 'ITER n' before each step")
    parser.add_argument("--dump", type=Path, default=None, help="torch.save the final model state_dict here")
    parser.add_argument("--ddp", action="store_true", help="init_distributed() (torchrun) and shard the sampler")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rank, world_size = init_distributed() if args.ddp else (0, 1)
    job = tiny_job(args.out, args.iterations, args.checkpoint_every, args.model, num_replicas=world_size, rank=rank)
    if args.nan_at is not None:  # every rank wraps the model alike: DDP needs the same modules
        faults = {args.nan_at: "nan_loss"} if rank == args.nan_rank else {}
        job.model = FaultInjector(job.model, faults, entry="bbox_ctrness")

    def hook(iteration: int) -> None:
        if args.print_iterations:
            print(f"ITER {iteration}", flush=True)
        if args.kill_at is not None and iteration == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.sleep:
            time.sleep(args.sleep)

    job.iteration_hooks.append(hook)
    if args.kill_in_save is not None:
        _kill_in_save(args.kill_in_save, args.kill_after_bytes)
    try:
        summary = run_training(job, resume=args.resume)
    except TrainingInterrupted as interrupted:
        print(interrupted, file=sys.stderr, flush=True)
        return interrupted.exit_code
    if args.dump is not None:
        torch.save(job.model.state_dict(), args.dump)
    total, digest = weights_hash(job.model)
    print(f"RANK {rank} SUM {total} SHA {digest} SKIPPED {summary['skipped_steps']}", flush=True)
    if args.ddp:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
