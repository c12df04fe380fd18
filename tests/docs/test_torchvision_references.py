"""docs/torchvision_references.md stays true: a training loop of the shape of torchvision's
``references/detection`` (``train.py``'s ``main``, ``engine.py``'s ``train_one_epoch`` and
``evaluate``, ``utils.py``'s ``reduce_dict`` and ``save_on_master``), with the doc's changes, runs
single-process and under DistributedDataParallel on tiny models, resumes bitwise, and holds every
line the doc adds."""
import argparse
import math
import os
import re
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torchvision
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from densekd import Distiller, Term

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "torchvision_references.md"
IMAGE_SIZE = 64
NUM_CLASSES = 4  # heads of K + 1 channels for labels 1..3


# --- stand-ins for what the reference script builds: tiny models by name, a tiny dataset -----------
def tiny_get_model(name: str, weights=None, num_classes: int = NUM_CLASSES, **kwargs) -> FCOS:
    """``torchvision.models.get_model`` for two tiny FCOS: "tiny_fcos_32" (student), "tiny_fcos_64" (teacher)."""
    width = int(name.rsplit("_", 1)[1])
    resnet = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d)
    backbone = BackboneWithFPN(
        resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], width, extra_blocks=LastLevelP6P7(width, width)
    )
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    return FCOS(backbone, num_classes=num_classes, anchor_generator=anchors, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)


class TinyDetectionSet(torch.utils.data.Dataset):
    """Four 64 px images with one or two boxes, labels 1..3, as torchvision's CocoDetection gives them."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = []
        for index in range(4):
            boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [24.0, 12.0, 60.0, 58.0]])[: 1 + index % 2]
            labels = torch.tensor([1 + index % 3, 1 + (index + 1) % 3])[: len(boxes)]
            image = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
            self.items.append((image, {"boxes": boxes, "labels": labels, "image_id": index}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


# --- utils.py, engine.py: the reference's helpers, unchanged by distillation ------------------------
def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def reduce_dict(input_dict, average=True):
    """Every rank's loss values, all-reduced by sorted key (the keys must agree across ranks)."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.inference_mode():
        names = sorted(input_dict)
        values = torch.stack([input_dict[k] for k in names], dim=0)
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))


def save_on_master(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(*args, **kwargs)


utils = types.SimpleNamespace(reduce_dict=reduce_dict, save_on_master=save_on_master, collate_fn=lambda batch: tuple(zip(*batch)))


def train_one_epoch(model, optimizer, data_loader, device, epoch, print_freq, scaler=None):
    model.train()
    lr_scheduler = None
    if epoch == 0:
        warmup_factor = 1.0 / 1000
        warmup_iters = min(1000, len(data_loader) - 1)
        lr_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_factor, total_iters=warmup_iters)
    seen_keys = []
    for images, targets in data_loader:
        images = list(image.to(device) for image in images)
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, enabled=scaler is not None and scaler.is_enabled()):
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_dict_reduced = utils.reduce_dict(loss_dict)  # for logging
        losses_reduced = sum(loss for loss in loss_dict_reduced.values())
        assert math.isfinite(losses_reduced.item()), loss_dict_reduced
        seen_keys.append(sorted(loss_dict_reduced))
        optimizer.zero_grad()
        scaler.scale(losses).backward()
        scaler.step(optimizer)
        scaler.update()
        if lr_scheduler is not None:
            lr_scheduler.step()
    return seen_keys


def _get_iou_types(model):
    model_without_ddp = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    iou_types = ["bbox"]
    if isinstance(model_without_ddp, torchvision.models.detection.MaskRCNN):
        iou_types.append("segm")
    return iou_types


EVALUATIONS: list[tuple[dict, list]] = []  # what each evaluate() saw, for the tests to read


@torch.inference_mode()
def evaluate(model, data_loader, device):
    """Detections by image id (the reference feeds them to a COCO evaluator of ``_get_iou_types(model)``)."""
    assert isinstance(model, torchvision.models.detection.FCOS), f"evaluate got a {type(model).__name__}"
    model.eval()
    results = {}
    for images, targets in data_loader:
        outputs = model(list(image.to(device) for image in images))
        results.update({target["image_id"]: output for target, output in zip(targets, outputs)})
    EVALUATIONS.append((results, _get_iou_types(model)))


# --- train.py's main(args) with the doc's changes (the lines that carry "+" in the doc) -------------
def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device(args.device)
    dataset = TinyDetectionSet()
    dataset_test = torch.utils.data.Subset(dataset, [0, 1])
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if args.distributed else (0, 1)
    # epoch-seeded (as DistributedSampler is), so that a resumed run sees the batches of an uninterrupted one
    train_sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=0)
    train_batch_sampler = torch.utils.data.BatchSampler(train_sampler, args.batch_size, drop_last=True)
    data_loader = torch.utils.data.DataLoader(dataset, batch_sampler=train_batch_sampler, collate_fn=utils.collate_fn)
    data_loader_test = torch.utils.data.DataLoader(dataset_test, batch_size=2, collate_fn=utils.collate_fn)

    num_classes, kwargs = NUM_CLASSES, {"trainable_backbone_layers": None}
    model = torchvision.models.get_model(args.model, weights=None, num_classes=num_classes, **kwargs)
    model.to(device)
    teacher = torchvision.models.get_model(args.teacher, weights=None, num_classes=num_classes, **kwargs)
    teacher.load_state_dict(torch.load(args.teacher_checkpoint, map_location="cpu", weights_only=True))
    teacher.to(device)
    model = Distiller(model, teacher, terms=[Term("binary_kd", on="cls_logits", temperature=2.0), Term("cwd", on="features", weight=0.2)])

    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if args.gpu is None else [args.gpu])
        model_without_ddp = model.module

    parameters = model_without_ddp.parameter_groups(args.weight_decay, norm_weight_decay=args.norm_weight_decay)
    optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_steps, gamma=args.lr_gamma)

    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        args.start_epoch = checkpoint["epoch"] + 1
        scaler.load_state_dict(checkpoint["scaler"])

    if args.test_only:
        evaluate(model_without_ddp.student, data_loader_test, device=device)
        return model_without_ddp, []

    keys = []
    for epoch in range(args.start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        keys += train_one_epoch(model, optimizer, data_loader, device, epoch, args.print_freq, scaler)
        lr_scheduler.step()
        checkpoint = {
            "model": model_without_ddp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "epoch": epoch,
            "scaler": scaler.state_dict(),
        }
        utils.save_on_master(checkpoint, os.path.join(args.output_dir, f"model_{epoch}.pth"))
        utils.save_on_master(checkpoint, os.path.join(args.output_dir, "checkpoint.pth"))
        evaluate(model_without_ddp.student, data_loader_test, device=device)
    utils.save_on_master(model_without_ddp.student.state_dict(), os.path.join(args.output_dir, "student.pth"))
    return model_without_ddp, keys


def add_teacher_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What ``get_args_parser`` gains."""
    parser.add_argument("--teacher", type=str, help="the teacher's torchvision builder, e.g. fcos_resnet50_fpn")
    parser.add_argument("--teacher-checkpoint", type=str, help="the trained teacher's state_dict")
    return parser


def _args(output_dir: Path, teacher_checkpoint: Path, **overrides) -> argparse.Namespace:
    parser = add_teacher_arguments(argparse.ArgumentParser())
    settings = vars(parser.parse_args(["--teacher", "tiny_fcos_64", "--teacher-checkpoint", str(teacher_checkpoint)]))
    settings.update(
        device="cpu", model="tiny_fcos_32", batch_size=2, lr=0.01, momentum=0.9, weight_decay=1e-4,
        norm_weight_decay=0.0, lr_steps=[1], lr_gamma=0.1, amp=False, epochs=2, start_epoch=0, resume="",
        print_freq=10, output_dir=str(output_dir), distributed=False, gpu=None, test_only=False,
    )  # fmt: skip
    settings.update(overrides)
    return argparse.Namespace(**settings)


@pytest.fixture
def teacher_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.models, "get_model", tiny_get_model)
    torch.manual_seed(123)
    path = tmp_path / "teacher.pth"
    torch.save(tiny_get_model("tiny_fcos_64").state_dict(), path)  # the user's trained teacher
    return path


def _weights(distiller: Distiller) -> dict:
    return torch.nn.Module.state_dict(distiller)


def test_the_loop_trains_checkpoints_resumes_bitwise_and_evaluates_the_plain_student(tmp_path, teacher_checkpoint):
    torch.manual_seed(0)
    full, keys = main(_args(tmp_path / "full", teacher_checkpoint))
    detections, iou_types = EVALUATIONS[-1]
    assert int(full.iteration) == 4 and len(keys) == 4 and all(k == keys[0] for k in keys)
    assert {"kd_cls_logits_binary_kd", "kd_features_cwd", "classification"} <= set(keys[0])
    assert sorted(detections) == [0, 1] and iou_types == ["bbox"]
    assert {"boxes", "scores", "labels"} <= set(detections[0])

    checkpoint = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    assert not [k for k in checkpoint["model"] if k.startswith(("teachers.", "module."))]
    assert "iteration" in checkpoint["model"] and any(k.startswith("connectors.") for k in checkpoint["model"])
    plain = tiny_get_model("tiny_fcos_32")
    plain.load_state_dict(torch.load(tmp_path / "full" / "student.pth", weights_only=True), strict=True)

    torch.manual_seed(0)
    main(_args(tmp_path / "split", teacher_checkpoint, epochs=1))
    torch.manual_seed(7)  # another initialisation: what matters comes from the checkpoint and the teacher's file
    resumed, _ = main(_args(tmp_path / "split", teacher_checkpoint, resume=str(tmp_path / "split" / "checkpoint.pth")))
    assert int(resumed.iteration) == 4
    expected, actual = _weights(full), _weights(resumed)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

    main(_args(tmp_path / "full", teacher_checkpoint, resume=str(tmp_path / "full" / "checkpoint.pth"), test_only=True))
    again, _ = EVALUATIONS[-1]  # --test-only from the checkpoint: the trained student's detections
    assert all(torch.equal(again[i]["boxes"], detections[i]["boxes"]) for i in detections)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_loop_trains_the_distiller_inside_distributed_data_parallel(tmp_path, teacher_checkpoint):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        distiller, keys = main(_args(tmp_path, teacher_checkpoint, distributed=True, epochs=1))
        detections, _ = EVALUATIONS[-1]
    finally:
        dist.destroy_process_group()
    assert isinstance(distiller, Distiller) and int(distiller.iteration) == 2 and sorted(detections) == [0, 1]
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert state.keys() == distiller.state_dict().keys() and not [k for k in state if k.startswith(("teachers.", "module."))]
    with pytest.raises(ValueError, match=r"wrap the distiller instead"):
        Distiller(torch.nn.DataParallel(tiny_get_model("tiny_fcos_32")), tiny_get_model("tiny_fcos_64"), [])


def test_every_line_the_doc_adds_is_in_the_loop():
    added = [line[1:].strip() for line in re.findall(r"^\+.*$", DOC.read_text(), flags=re.M)]
    added = [line for line in added if line and not line.startswith("#")]
    assert len(added) >= 6, "the doc's diff blocks are gone"
    source = {line.strip() for line in Path(__file__).read_text().splitlines()}
    missing = [line for line in added if line not in source]
    assert not missing, f"lines the doc adds but the loop does not run: {missing}"
    readme = (ROOT / "README.md").read_text()
    assert "docs/torchvision_references.md" in readme and "model = DistributedDataParallel(distiller)" in readme
