"""The families tools/bench_overhead.py measures, one small entry each in :data:`FAMILIES`.

A family says how to build a teacher and a student of a given :class:`Scale`, which terms its
full distillation recipe has (``configs/recipes/full_detection_kd.yaml`` adapted to what the
family produces, plus spatial attention) and how to draw a training batch. Teacher and student
of a family share anchors and feature strides, so every per-anchor term pairs; their FPN widths
differ, so feature terms go through 1x1 connectors, as in a real teacher/student pair. The
segmentation family (DeepLabV3) lives in ``bench/segmentation.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torchvision.models import resnet18, resnet34
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from densekd import Term
from densekd.detection.models import fcos_fpn

from . import segmentation
from .internals import DetectionInternals, SegmentationInternals

NUM_CLASSES = 12  # the embedded synthetic dataset's K: labels 1..12


@dataclass(frozen=True)
class ModelSpec:
    body: str  # "resnet18" or "resnet34", built from scratch
    fpn_channels: int  # also the ASPP width of the segmentation family
    head_convs: int  # FCOS head depth (the demo's: teacher 4, student 2)


@dataclass(frozen=True)
class Scale:
    """Model and batch sizes of one run."""

    image_size: int
    batch_size: int
    teacher: ModelSpec
    student: ModelSpec
    # Faster R-CNN: proposals kept per image after the RPN's NMS in training and in evaluation,
    # and RoIs sampled per image for the box head in training (torchvision's defaults).
    rpn_proposals: int = 2000
    rpn_test_proposals: int = 1000
    roi_samples: int = 512


#: The demo's pair (ResNet-34 / 128-channel FPN teacher, ResNet-18 / 64-channel FPN student).
DEFAULT_SCALE = Scale(160, 4, ModelSpec("resnet34", 128, 4), ModelSpec("resnet18", 64, 2))
#: --quick: narrow FPNs on small images and a lighter RoI stage, a smoke run.
QUICK_SCALE = Scale(
    64, 2, ModelSpec("resnet18", 64, 1), ModelSpec("resnet18", 32, 1), rpn_proposals=300, rpn_test_proposals=300, roi_samples=64
)

_BODIES = {"resnet18": resnet18, "resnet34": resnet34}
_GROUPS = 8  # GroupNorm groups of the RetinaNet head (FCOS's own head needs widths divisible by 32)


def _fpn(spec: ModelSpec, first_stage: int, extra: nn.Module) -> BackboneWithFPN:
    """ResNet stages first_stage..4 (strides 2^(first_stage + 1)..32) under an FPN."""
    stages = range(first_stage, 5)
    return BackboneWithFPN(
        _BODIES[spec.body](weights=None),
        return_layers={f"layer{s}": str(i) for i, s in enumerate(stages)},
        in_channels_list=[64 * 2 ** (s - 1) for s in stages],  # BasicBlock ResNets: 64, 128, 256, 512
        out_channels=spec.fpn_channels,
        extra_blocks=extra,
    )


def build_faster_rcnn(spec: ModelSpec, scale: Scale) -> FasterRCNN:
    """torchvision's Faster R-CNN layout (P2-P6, 3 aspect ratios, its RPN and RoI heads)."""
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(
        _fpn(spec, 1, LastLevelMaxPool()),
        num_classes=NUM_CLASSES + 1,  # softmax head: background at 0
        min_size=scale.image_size,
        max_size=scale.image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=scale.rpn_proposals,
        rpn_post_nms_top_n_train=scale.rpn_proposals,
        rpn_pre_nms_top_n_test=scale.rpn_test_proposals,
        rpn_post_nms_top_n_test=scale.rpn_test_proposals,
        box_batch_size_per_image=scale.roi_samples,
    )


def build_retinanet(spec: ModelSpec, scale: Scale) -> RetinaNet:
    """RetinaNet on P3-P7 with 9 anchors per location and a GroupNorm head (as torchvision's v2)."""
    sizes = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in (16, 32, 64, 128, 256))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    width = spec.fpn_channels
    head = RetinaNetHead(
        width, anchors.num_anchors_per_location()[0], NUM_CLASSES + 1, norm_layer=partial(nn.GroupNorm, _GROUPS)
    )
    return RetinaNet(
        _fpn(spec, 2, LastLevelP6P7(width, width)),
        num_classes=NUM_CLASSES + 1,  # channel k for label k, as densekd's one-stage models
        min_size=scale.image_size,
        max_size=scale.image_size,
        anchor_generator=anchors,
        head=head,
    )


def build_fcos(spec: ModelSpec, scale: Scale) -> nn.Module:
    """The demo's FCOS (densekd.detection.models.fcos_fpn)."""
    return fcos_fpn(NUM_CLASSES, scale.image_size, backbone=spec.body, fpn_channels=spec.fpn_channels, head_convs=spec.head_convs)


def feature_terms() -> list[Term]:
    """Feature-only distillation: CWD on P3-P6 (as full_detection_kd) and spatial attention."""
    return [
        Term("cwd", on="features", temperature=4.0, weight=0.2, levels=["0", "1", "2", "p6"]),
        Term("attention", on="features"),
    ]


def one_stage_terms(centerness: bool) -> list[Term]:
    """configs/recipes/full_detection_kd.yaml (+ attention) for RetinaNet and FCOS."""
    terms = [
        Term("binary_kd", on="cls_logits", temperature=2.0, confidence_weighting=True),
        Term("giou", on="box_regression"),
    ]
    if centerness:
        terms.append(Term("binary_kd", on="centerness"))
    return terms + feature_terms()


def rcnn_terms() -> list[Term]:
    """The same recipe on a two-stage detector: RoI logits and boxes, RPN objectness, features."""
    return [
        Term("kl", on="roi_class_logits", temperature=2.0),
        Term("giou", on="roi_box_regression"),
        Term("binary_kd", on="rpn_objectness"),
        Term("cwd", on="features", temperature=4.0, weight=0.2, levels=["0", "1", "2", "3"]),
        Term("attention", on="features"),
    ]


def rcnn_feature_terms() -> list[Term]:
    return [term for term in rcnn_terms() if term.on == "features"]


def detection_batch(scale: Scale, seed: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images of scale.image_size px with 1-4 boxes each (side 1/8 to 1/2 of the image)."""
    generator = torch.Generator().manual_seed(seed)
    size = scale.image_size
    images, targets = [], []
    for _ in range(scale.batch_size):
        images.append(torch.rand(3, size, size, generator=generator))
        count = int(torch.randint(1, 5, (), generator=generator))
        sides = (torch.rand(count, 2, generator=generator) * 3 / 8 + 1 / 8) * size  # (G, 2) width, height
        corners = torch.rand(count, 2, generator=generator) * (size - sides)  # (G, 2) x1, y1
        boxes = torch.cat([corners, corners + sides], dim=1)  # (G, 4) xyxy
        labels = torch.randint(1, NUM_CLASSES + 1, (count,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def detection_losses(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """A torchvision detector in training mode computes its own losses."""
    return model(images, targets)


def detection_forward(model: nn.Module, images: list[Tensor]) -> object:
    """The detector's full eval forward, to post-processed detections."""
    return model(images)


def detection_features(model: nn.Module, images: list[Tensor]) -> object:
    """Transform, then backbone + FPN: what a feature-only teacher computes."""
    batch, _ = model.transform(images)
    return model.backbone(batch.tensors)


@dataclass(frozen=True)
class Family:
    """One row group of the benchmark. The defaults fit torchvision detectors; a family whose
    models are called differently (segmentation) passes its own functions and internals."""

    title: str  # as printed, e.g. the torchvision class
    build: Callable[[ModelSpec, Scale], nn.Module]
    full_terms: Callable[[], list[Term]]
    feature_terms: Callable[[], list[Term]]
    batch: Callable[[Scale, int], tuple[list[Tensor], list[dict[str, Tensor]]]] = detection_batch
    student_losses: Callable[..., dict[str, Tensor]] = detection_losses  # (model, images, targets)
    teacher_forward: Callable[..., object] = detection_forward  # (model, images), eval, no_grad
    teacher_features: Callable[..., object] = detection_features  # (model, images), eval, no_grad
    internals: type = DetectionInternals  # student records, teacher work and terms alone (bench/internals.py)
    neck: str = "FPN"  # what the widths of Scale's ModelSpecs size, as printed
    distiller_options: Mapping[str, Any] = field(default_factory=dict)  # more Distiller arguments, e.g. logit_resolution


FAMILIES: dict[str, Family] = {
    "faster_rcnn": Family("FasterRCNN", build_faster_rcnn, rcnn_terms, rcnn_feature_terms),
    "retinanet": Family("RetinaNet", build_retinanet, partial(one_stage_terms, centerness=False), feature_terms),
    "fcos": Family("FCOS", build_fcos, partial(one_stage_terms, centerness=True), feature_terms),
    "deeplabv3": Family(
        "DeepLabV3",
        segmentation.build_deeplabv3,
        segmentation.full_terms,
        segmentation.feature_terms,
        batch=segmentation.segmentation_batch,
        student_losses=segmentation.segmentation_student_losses,
        teacher_forward=segmentation.segmentation_forward,
        teacher_features=segmentation.segmentation_features,
        internals=SegmentationInternals,
        neck="ASPP",
    ),
}
