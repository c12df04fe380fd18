"""The Distiller: a trainable student, frozen teacher(s) and distillation terms, behind
the same call signature as a torchvision detector::

    distiller = Distiller(student, teacher, terms=[Term("binary_kd", on="cls_logits", temperature=2.0)])
    loss_dict = distiller(images, targets)      # student's own losses + kd_<term> entries
    sum(loss_dict.values()).backward()

After training, ``distiller.student`` is the plain torchvision model.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from ..core.distiller_base import DistillerBase
from ..core.outputs import DETECTIONS, KEYPOINT_OUTPUTS, PER_ANCHOR_OUTPUTS, DenseOutputs
from ..core.precision import is_low_precision, outputs_in, teacher_autocast
from ..core.taps import Tap
from ..core.terms import Term
from ..segmentation.adapter import is_segmentation_model
from ..segmentation.distiller import SegmentationDistiller
from .adapters import DetectorAdapter, RCNNAdapter, adapter_for
from .label_smoothing import check_label_smoothing, smoothed_focal_loss, smoothed_roi_classification_loss
from .pairable import describe_pairable
from .pairs import StepContext, teacher_needs, term_loss
from .predictions import detection_term_refusal, teacher_detections

GEOMETRIES = ("student", "own")
# Outputs compared class by class: teacher and student must share the label space.
_CLASS_INDEXED_OUTPUTS = frozenset(
    {"cls_logits", "centerness", "box_regression", "roi_class_logits", "roi_box_regression", "mask_logits"}
    | {"anchor_class_logits", "anchor_box_regression"}
)


class Distiller(DistillerBase):
    """Distill one or more frozen teachers into a torchvision detector.

    Given a torchvision segmentation model (FCN, DeepLabV3, LRASPP) as ``student``,
    ``Distiller(...)`` builds and returns a
    :class:`~densekd.segmentation.distiller.SegmentationDistiller` with the same arguments.

    Args:
        student: the torchvision detector to train (FasterRCNN, MaskRCNN, RetinaNet, FCOS, SSD),
            plain: for data-parallel training wrap the distiller, ``DistributedDataParallel(distiller)``,
            not the student (a wrapped student is refused).
        teachers: one teacher or a list; frozen here (eval mode, no gradients).
        terms: the distillation terms (:class:`~densekd.core.terms.Term`).
        teacher_weights: per-teacher weights (default: equal); probabilities are averaged
            with them for logit terms, losses for feature terms (teachers' feature spaces
            are unrelated, so each teacher gets its own connectors).
        teacher_geometry: "student" feeds the teacher the student's resized batch
            (re-normalized with the teacher's mean/std), so every output pairs;
            "own" lets the teacher resize with its own transform: RoIs are rescaled and
            features interpolated, but per-anchor terms cannot pair.
        warmup_iters: training iterations without distillation (the kd terms are 0).
        label_smoothing: epsilon of label smoothing on the student's hard classification
            loss (``densekd.detection.label_smoothing``); 0 keeps torchvision's loss as it is.
        probe_size: side of the blank image of the construction-time dry run that infers
            feature shapes (connectors, stride checks).

    A teacher stored in bfloat16 or float16 (``teacher.to(torch.bfloat16)``) runs under
    autocast; its outputs reach the losses in the student's precision.
    """

    class_indexed_outputs = _CLASS_INDEXED_OUTPUTS

    def __new__(cls, student: Optional[nn.Module] = None, *args, **kwargs):
        # A segmentation student gets its own distiller (returned instead of a Distiller, so
        # Python does not run __init__ below on it). Without arguments (unpickling, deepcopy)
        # this is a plain allocation.
        if cls is Distiller and student is not None and is_segmentation_model(student):
            # Positional arguments are read by Distiller's signature; the rest (aux_weight,
            # ignore_index) go to SegmentationDistiller as they are.
            signature = inspect.signature(Distiller.__init__)
            own = {k: v for k, v in kwargs.items() if k in signature.parameters}
            others = {k: v for k, v in kwargs.items() if k not in own}
            arguments = signature.bind(None, student, *args, **own).arguments
            del arguments["self"]
            return SegmentationDistiller(**arguments, **others)
        return super().__new__(cls)

    def __init__(
        self,
        student: nn.Module,
        teachers: Union[nn.Module, Sequence[nn.Module]],
        terms: Sequence[Term],
        teacher_weights: Optional[Sequence[float]] = None,
        teacher_geometry: str = "student",
        warmup_iters: int = 0,
        label_smoothing: float = 0.0,
        probe_size: int = 128,
    ):
        super().__init__(student, teachers, terms, teacher_weights, warmup_iters)
        if teacher_geometry not in GEOMETRIES:
            raise ValueError(f"teacher_geometry must be one of {GEOMETRIES}, got {teacher_geometry!r}.")
        self.teacher_geometry = teacher_geometry
        self.teacher_caches: Optional[list] = None  # offline distillation, see use_teacher_cache

        self.student_adapter = adapter_for(student)
        check_label_smoothing(self.student_adapter, label_smoothing)
        self.label_smoothing = float(label_smoothing)
        self.teacher_adapters = [adapter_for(t) for t in self.teachers]
        self._check_terms()
        self._teacher_needs = set().union(*(teacher_needs(t) for t in self.terms)) if self.terms else set()
        student_shapes = self._probe(self.student_adapter, probe_size)
        teacher_shapes = [self._probe(a, probe_size) for a in self.teacher_adapters]
        self._check_per_anchor_terms(student_shapes, teacher_shapes)
        self._build_feature_pairs(student_shapes, teacher_shapes)

    # --- construction ----------------------------------------------------------------
    def _check_family_term(self, term: Term) -> None:
        if term.on == DETECTIONS:
            refusal = detection_term_refusal(term, self.student_adapter, self.teacher_adapters)
            if refusal:
                raise ValueError(f"Term {term.name!r}: {refusal}.{self._pairing_hint()}")
        if term.loss == "teacher_bounded" and term.on not in self.student_adapter.matchable_box_outputs:
            raise ValueError(
                f"Term {term.name!r}: teacher-bounded regression needs ground-truth matches for {term.on!r}, "
                f"which {type(self.student_adapter.model).__name__} assigns only inside its loss function. "
                "Use 'delta_l1', 'delta_l2' or 'giou' instead."
            )
        if term.on in KEYPOINT_OUTPUTS:  # every model has a keypoint head here (checked before)
            layout = self.student_adapter.keypoint_layout()
            for index, adapter in enumerate(self.teacher_adapters):
                if adapter.keypoint_layout() != layout:
                    raise ValueError(
                        f"Term {term.name!r} pairs keypoint heatmaps map by map, but (keypoints, keypoint RoI pool size) "
                        f"is {adapter.keypoint_layout()} for teacher {index} and {layout} for the student. Build both "
                        "with the same keypoints in the same order and the same keypoint_roi_pool, or drop the term."
                    )

    def _pair_levels(self, term: Term, student_shapes: dict, teacher_shapes: dict) -> list[tuple[str, str]]:
        """(student level, teacher level) pairs of a feature term: by name, as FPN levels are named
        alike across families, unless a model names its maps by position (SSD's "0".."5" start at
        stride 16 or 8, an FPN's "0" at 4 or 8). Then each student map pairs with the teacher map
        whose probed grid is nearest in scale (the same-named one among equals, else the finer)."""
        adapters = [self.student_adapter, *self.teacher_adapters]
        if not any(adapter.pairs_levels_by_stride for adapter in adapters):
            return super()._pair_levels(term, student_shapes, teacher_shapes)
        chosen = term.levels if term.levels is not None else list(student_shapes)
        unknown = [level for level in chosen if level not in student_shapes]
        if unknown:
            levels = list(student_shapes)
            raise ValueError(f"Term {term.name!r}: unknown levels {unknown}; the student's levels are {levels}.")

        def distance(student_level: str, teacher_level: str) -> tuple[float, bool]:  # shapes are (C, H, W)
            scale = abs(math.log(teacher_shapes[teacher_level][1] / student_shapes[student_level][1]))
            return round(scale, 6), teacher_level != student_level

        return [(level, min(teacher_shapes, key=lambda t: distance(level, t))) for level in chosen]

    def _pairing_hint(self) -> str:
        """Every output whose terms pair these models, with its losses (for the errors that refuse a
        term); per-anchor outputs count when anchors and geometry agree (strides are probed later)."""
        signature = self.student_adapter.anchor_signature()
        anchors_pair = self.teacher_geometry == "student" and all(
            adapter.anchor_signature() == signature for adapter in self.teacher_adapters
        )
        pairable = describe_pairable(self.student_adapter, self.teacher_adapters, anchors_pair, self.class_indexed_outputs)
        return f" Terms that pair these models: {pairable}."

    def _check_per_anchor_terms(self, student_shapes: dict, teacher_shapes: list[dict]) -> None:
        per_anchor = [t for t in self.terms if t.on in PER_ANCHOR_OUTPUTS]
        if not per_anchor:
            return
        still_working = describe_pairable(self.student_adapter, self.teacher_adapters, False, self.class_indexed_outputs)
        names = ", ".join(repr(t.name) for t in per_anchor)
        if self.teacher_geometry != "student":
            raise ValueError(
                f"Per-anchor terms ({names}) need teacher_geometry='student': with the teacher resizing on its "
                f"own, anchors do not line up. Terms that still work: {still_working}."
            )
        student_strides = [hw[1:] for hw in student_shapes.values()]
        for index, (adapter, shapes) in enumerate(zip(self.teacher_adapters, teacher_shapes)):
            problems = []
            if adapter.anchor_signature() != self.student_adapter.anchor_signature():
                problems.append(
                    f"anchors differ (student {self.student_adapter.anchor_signature()}, "
                    f"teacher {adapter.anchor_signature()})"
                )
            teacher_strides = [hw[1:] for hw in shapes.values()]
            if teacher_strides != student_strides:
                problems.append(f"feature grids differ (student {student_strides}, teacher {teacher_strides})")
            if problems:
                raise ValueError(
                    f"Per-anchor terms ({names}) pair student and teacher {index} anchor by anchor, but "
                    f"{'; '.join(problems)}. Use models with the same anchor generator and feature strides, "
                    f"or drop these terms. Terms that still work: {still_working}."
                )

    # --- training-time behaviour --------------------------------------------------------
    def use_teacher_cache(self, caches) -> "Distiller":
        """Offline distillation: read each teacher's outputs from its cache
        (:mod:`densekd.detection.teacher_cache`, one per teacher, in order) by ``targets[i]["image_id"]``
        instead of running the teachers; ``None`` goes back to running them. Each cache refuses
        a distiller it was not built for, and settings that cannot be cached."""
        if caches is None:
            self.teacher_caches = None
            return self
        caches = list(caches) if isinstance(caches, (list, tuple)) else [caches]
        if len(caches) != len(self.teachers):
            raise ValueError(f"use_teacher_cache needs one cache per teacher: {len(self.teachers)}, got {len(caches)}.")
        for index, cache in enumerate(caches):
            cache.check_serves(self, index)
        self.teacher_caches = caches
        return self

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        """Training: the student's torchvision loss dict plus one weighted ``kd_<term>`` entry
        per term. Evaluation: whatever the student returns (its detections)."""
        if not self.training:
            return self.student(images, targets)
        self._update_self_teacher()
        adapter = self.student_adapter
        tap = Tap(self.student, outputs=adapter.tap_outputs(), inputs=adapter.tap_inputs())
        with smoothed_focal_loss(adapter, self.label_smoothing), tap:
            losses = self.student(images, targets)
            records = tap.read()
        iteration = self._next_iteration()
        student_outputs = adapter.collect(records)
        if self.label_smoothing and isinstance(adapter, RCNNAdapter):
            labels = torch.cat(adapter.assign_rois(student_outputs.roi_proposals, student_outputs.gt_boxes, student_outputs.gt_labels)[1])
            losses["loss_classifier"] = smoothed_roi_classification_loss(student_outputs, labels, self.label_smoothing)
        if not self._distills_at(iteration):
            return self._with_zero_terms(losses)
        with torch.no_grad():
            if self.teacher_caches is not None:
                image_ids = _image_ids(targets)
                teacher_outputs = [cache.outputs_for(image_ids, student_outputs) for cache in self.teacher_caches]
            else:
                teacher_outputs = [
                    self._run_teacher(index, images, records["transform"][0], student_outputs)
                    for index in range(len(self.teachers))
                ]
        context = StepContext(
            student_outputs,
            teacher_outputs,
            self.teacher_weights,
            adapter,
            self.connectors,
            self.level_pairs,
            iteration,
        )
        return self._add_terms(losses, context, term_loss, iteration)

    def _run_teacher(self, index: int, images: list[Tensor], student_batch: ImageList, student: DenseOutputs) -> DenseOutputs:
        adapter = self.teacher_adapters[index]
        if self.teacher_geometry == "student":
            batch, rois = self._renormalized(student_batch, adapter), student
        else:
            batch, _ = adapter.model.transform(images)
            rois = _rescaled_rois(student, batch.image_sizes)
        if not is_low_precision(adapter.model):
            return self._teacher_outputs(adapter, batch, rois, student_batch.image_sizes)
        with teacher_autocast(adapter.model, batch.tensors.device):  # e.g. a bfloat16 teacher
            outputs = self._teacher_outputs(adapter, batch, rois, student_batch.image_sizes)
        return outputs_in(outputs, batch.tensors.dtype)  # the losses compare in the student's dtype

    def _teacher_outputs(self, adapter: DetectorAdapter, batch: ImageList, rois: DenseOutputs, image_sizes) -> DenseOutputs:
        """What the terms need of one teacher; its detections (terms on "detections") in the student's frame."""
        outputs = adapter.run(batch, self._teacher_needs, rois)
        if DETECTIONS in self._teacher_needs:
            outputs.detections = teacher_detections(adapter, batch, outputs, image_sizes)
        return outputs

    def _renormalized(self, batch: ImageList, teacher: DetectorAdapter) -> ImageList:
        """The student's batch in the teacher's normalization (same pixels, same geometry)."""
        student_mean, student_std = self.student_adapter.image_mean_std
        teacher_mean, teacher_std = teacher.image_mean_std
        if (student_mean, student_std) == (teacher_mean, teacher_std):
            return batch
        tensors = batch.tensors
        as_tensor = lambda v: torch.as_tensor(v, dtype=tensors.dtype, device=tensors.device)[:, None, None]  # (3, 1, 1)
        pixels = tensors * as_tensor(student_std) + as_tensor(student_mean)
        renormalized = (pixels - as_tensor(teacher_mean)) / as_tensor(teacher_std)
        # Padding is zero in the normalized frame of the model that padded; keep it zero.
        valid = torch.zeros_like(tensors[:, :1])
        for image_index, (height, width) in enumerate(batch.image_sizes):
            valid[image_index, :, :height, :width] = 1
        return ImageList(renormalized * valid, batch.image_sizes)


def _image_ids(targets: list[dict[str, Tensor]]) -> list[int]:
    missing = [index for index, target in enumerate(targets) if "image_id" not in target]
    if missing:
        raise ValueError(
            f"Offline distillation looks the teachers' outputs up by image id, but targets {missing} have no "
            "'image_id' (CocoDetectionDataset sets it). Add it, or distill online (use_teacher_cache(None))."
        )
    return [int(target["image_id"]) for target in targets]


def _rescaled_rois(student: DenseOutputs, teacher_sizes: list[tuple[int, int]]) -> DenseOutputs:
    """The student's RoIs moved into the teacher's resized frame (per-image scale)."""

    def rescale(boxes_per_image: Optional[list[Tensor]]) -> Optional[list[Tensor]]:
        if boxes_per_image is None:
            return None
        scaled = []
        for boxes, (sh, sw), (th, tw) in zip(boxes_per_image, student.image_sizes, teacher_sizes):
            scale = boxes.new_tensor([tw / sw, th / sh, tw / sw, th / sh])
            scaled.append(boxes * scale)
        return scaled

    return dataclasses.replace(
        student, roi_proposals=rescale(student.roi_proposals), mask_proposals=rescale(student.mask_proposals),
        keypoint_proposals=rescale(student.keypoint_proposals),
    )
