"""The Distiller: a trainable student, frozen teacher(s) and distillation terms, behind
the same call signature as a torchvision detector::

    distiller = Distiller(student, teacher, terms=[Term("binary_kd", on="cls_logits", temperature=2.0)])
    loss_dict = distiller(images, targets)      # student's own losses + kd_<term> entries
    sum(loss_dict.values()).backward()

After training, ``distiller.student`` is the plain torchvision model.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from .adapters.detection import PER_ANCHOR_OUTPUTS, ROI_OUTPUTS, DetectorAdapter, RCNNAdapter, adapter_for
from .connectors import FeatureConnector
from .label_smoothing import check_label_smoothing, smoothed_focal_loss, smoothed_roi_classification_loss
from .outputs import DenseOutputs
from .pairs import StepContext, connector_key, teacher_needs, term_loss
from .precision import is_low_precision, outputs_in, teacher_autocast
from .taps import Tap
from .terms import Term

GEOMETRIES = ("student", "own")
SELF_DISTILLATION_MODES = ("ema", "snapshot")
# Outputs compared class by class: teacher and student must share the label space.
_CLASS_INDEXED_OUTPUTS = frozenset(
    {"cls_logits", "centerness", "box_regression", "roi_class_logits", "roi_box_regression", "mask_logits"}
)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class Distiller(nn.Module):
    """Distill one or more frozen teachers into a torchvision detector.

    Args:
        student: the torchvision detector to train (FasterRCNN, MaskRCNN, RetinaNet, FCOS).
        teachers: one teacher or a list; frozen here (eval mode, no gradients).
        terms: the distillation terms (:class:`~densekd.terms.Term`).
        teacher_weights: per-teacher weights (default: equal); probabilities are averaged
            with them for logit terms, losses for feature terms (teachers' feature spaces
            are unrelated, so each teacher gets its own connectors).
        teacher_geometry: "student" feeds the teacher the student's resized batch
            (re-normalized with the teacher's mean/std), so every output pairs;
            "own" lets the teacher resize with its own transform: RoIs are rescaled and
            features interpolated, but per-anchor terms cannot pair.
        warmup_iters: training iterations without distillation (the kd terms are 0).
        label_smoothing: epsilon of label smoothing on the student's hard classification
            loss (``densekd.label_smoothing``); 0 keeps torchvision's loss as it is.
        probe_size: side of the blank image of the construction-time dry run that infers
            feature shapes (connectors, stride checks).

    A teacher stored in bfloat16 or float16 (``teacher.to(torch.bfloat16)``) runs under
    autocast; its outputs reach the losses in the student's precision.
    """

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
        super().__init__()
        teachers = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
        if not teachers:
            raise ValueError("A Distiller needs at least one teacher (or use Distiller.self_distillation).")
        if teacher_geometry not in GEOMETRIES:
            raise ValueError(f"teacher_geometry must be one of {GEOMETRIES}, got {teacher_geometry!r}.")
        self.student = student
        self.teachers = nn.ModuleList(_frozen(t) for t in teachers)
        self.teacher_weights = self._normalized_weights(teacher_weights, len(teachers))
        self.teacher_geometry = teacher_geometry
        self.warmup_iters = int(warmup_iters)
        self.terms = list(terms)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.self_distillation_mode: Optional[str] = None
        self.ema_decay: Optional[float] = None
        self.last_terms: dict[str, dict[str, Tensor]] = {}

        self.student_adapter = adapter_for(student)
        check_label_smoothing(self.student_adapter, label_smoothing)
        self.label_smoothing = float(label_smoothing)
        self.teacher_adapters = [adapter_for(t) for t in self.teachers]
        self._check_terms()
        self._teacher_needs = set().union(*(teacher_needs(t) for t in self.terms)) if self.terms else set()
        student_shapes = self._probe(self.student_adapter, probe_size)
        teacher_shapes = [self._probe(a, probe_size) for a in self.teacher_adapters]
        self._check_per_anchor_terms(student_shapes, teacher_shapes)
        self.level_pairs = {
            term.name: [self._pair_levels(term, student_shapes, shapes) for shapes in teacher_shapes]
            for term in self.terms
            if term.on == "features"
        }
        self.connectors = self._build_connectors(student_shapes, teacher_shapes)

    # --- construction ----------------------------------------------------------------
    @classmethod
    def self_distillation(
        cls,
        student: nn.Module,
        terms: Sequence[Term],
        mode: str = "ema",
        ema_decay: float = 0.999,
        warmup_iters: int = 0,
        **kwargs,
    ) -> "Distiller":
        """Distill the student into itself: the teacher is an exponential moving average of
        the student (``mode="ema"``, updated before every training forward) or a frozen
        snapshot taken when the warm-up ends (``mode="snapshot"``)."""
        if mode not in SELF_DISTILLATION_MODES:
            raise ValueError(f"Self-distillation mode must be one of {SELF_DISTILLATION_MODES}, got {mode!r}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}.")
        distiller = cls(student, copy.deepcopy(student), terms, warmup_iters=warmup_iters, **kwargs)
        distiller.self_distillation_mode = mode
        distiller.ema_decay = ema_decay
        return distiller

    @staticmethod
    def _normalized_weights(weights: Optional[Sequence[float]], count: int) -> list[float]:
        if weights is None:
            return [1.0 / count] * count
        if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"teacher_weights must be {count} non-negative numbers with a positive sum, got {weights}.")
        return [float(w) / sum(weights) for w in weights]

    def _check_terms(self) -> None:
        names = [t.name for t in self.terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Term names must be unique; repeated: {duplicates}. Give each term a distinct name=.")
        num_classes = self.student_adapter.num_classes
        for term in self.terms:
            for role, adapter in [("student", self.student_adapter)] + [
                (f"teacher {i}", a) for i, a in enumerate(self.teacher_adapters)
            ]:
                if term.on not in adapter.provides:
                    raise ValueError(
                        f"Term {term.name!r} distills {term.on!r}, which the {role} "
                        f"({type(adapter.model).__name__}) does not produce; it produces: {', '.join(sorted(adapter.provides))}."
                    )
                if term.on in _CLASS_INDEXED_OUTPUTS and adapter.num_classes != num_classes:
                    raise ValueError(
                        f"Term {term.name!r} compares {term.on!r} class by class, but the {role} predicts "
                        f"{adapter.num_classes} classes and the student {num_classes}. Build both with the same "
                        "num_classes and category order, or distill features only."
                    )
            if term.loss == "teacher_bounded" and term.on not in self.student_adapter.matchable_box_outputs:
                raise ValueError(
                    f"Term {term.name!r}: teacher-bounded regression needs ground-truth matches for {term.on!r}, "
                    f"which {type(self.student_adapter.model).__name__} assigns only inside its loss function. "
                    "Use 'delta_l1', 'delta_l2' or 'giou' instead."
                )
            if term.class_weights is not None and term.class_weights.numel() not in self.student_adapter.label_counts:
                raise ValueError(
                    f"Term {term.name!r}: class_weights has {term.class_weights.numel()} entries; the student "
                    f"predicts labels 1..K with K in {sorted(self.student_adapter.label_counts)}: one weight per label."
                )

    @torch.no_grad()
    def _probe(self, adapter: DetectorAdapter, size: int) -> dict[str, tuple[int, int, int]]:
        """Level name -> (C, H, W) of the backbone's features on a blank image."""
        model = adapter.model
        was_training = model.training
        model.eval()  # keep BatchNorm statistics untouched
        device = next(model.parameters()).device
        with teacher_autocast(model, device):
            features = adapter.features_of(torch.zeros(1, 3, size, size, device=device))
        model.train(was_training)
        return {name: tuple(f.shape[1:]) for name, f in features.items()}

    def _check_per_anchor_terms(self, student_shapes: dict, teacher_shapes: list[dict]) -> None:
        per_anchor = [t for t in self.terms if t.on in PER_ANCHOR_OUTPUTS]
        if not per_anchor:
            return
        still_working = ["feature terms (through connectors)"]
        if isinstance(self.student_adapter, type(self.teacher_adapters[0])) and self.student_adapter.provides & ROI_OUTPUTS:
            still_working.append("RoI terms (roi_class_logits, roi_box_regression, roi_features, mask_logits)")
        names = ", ".join(repr(t.name) for t in per_anchor)
        if self.teacher_geometry != "student":
            raise ValueError(
                f"Per-anchor terms ({names}) need teacher_geometry='student': with the teacher resizing on its "
                f"own, anchors do not line up. Terms that still work: {'; '.join(still_working)}."
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
                    f"or drop these terms. Terms that still work: {'; '.join(still_working)}."
                )

    def _pair_levels(self, term, student_shapes: dict, teacher_shapes: dict) -> list[tuple[str, str]]:
        student_levels, teacher_levels = list(student_shapes), list(teacher_shapes)
        chosen = term.levels if term.levels is not None else student_levels
        unknown = [level for level in chosen if level not in student_levels]
        if unknown:
            raise ValueError(f"Term {term.name!r}: unknown levels {unknown}; the student's levels are {student_levels}.")
        pairs = []
        for level in chosen:
            if level in teacher_levels:
                pairs.append((level, level))
            elif len(student_levels) == len(teacher_levels):
                pairs.append((level, teacher_levels[student_levels.index(level)]))
            else:
                raise ValueError(
                    f"Term {term.name!r}: cannot pair student level {level!r}; student levels {student_levels}, "
                    f"teacher levels {teacher_levels}. Choose levels= present in both."
                )
        return pairs

    def _build_connectors(self, student_shapes: dict, teacher_shapes: list[dict]) -> nn.ModuleDict:
        connectors = nn.ModuleDict()
        for term in self.terms:
            if term.on != "features":
                continue
            for index, shapes in enumerate(teacher_shapes):
                for student_level, teacher_level in self.level_pairs[term.name][index]:
                    student_channels, teacher_channels = student_shapes[student_level][0], shapes[teacher_level][0]
                    target = teacher_channels if term.needs_matching_channels else None
                    connectors[connector_key(term, index, student_level)] = FeatureConnector(student_channels, target)
        device = next(self.student.parameters()).device
        return connectors.to(device)

    # --- training-time behaviour --------------------------------------------------------
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()  # BatchNorm and dropout of a teacher never switch to training
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and connector parameters: what an optimizer should update."""
        return [p for p in list(self.student.parameters()) + list(self.connectors.parameters()) if p.requires_grad]

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
        iteration = int(self.iteration)
        self.iteration += 1
        student_outputs = adapter.collect(records)
        if self.label_smoothing and isinstance(adapter, RCNNAdapter):
            labels = torch.cat(adapter.assign_rois(student_outputs.roi_proposals, student_outputs.gt_boxes, student_outputs.gt_labels)[1])
            losses["loss_classifier"] = smoothed_roi_classification_loss(student_outputs, labels, self.label_smoothing)
        if not self.terms or iteration < self.warmup_iters:
            zero = next(iter(losses.values())).new_zeros(())
            return {**losses, **{term.key: zero for term in self.terms}}
        with torch.no_grad():
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
        self.last_terms = {}
        for term in self.terms:
            unscaled = term_loss(term, context)
            weight = float(term.weight_at(iteration))
            losses[term.key] = weight * unscaled
            self.last_terms[term.key] = {"unscaled": unscaled.detach(), "weight": torch.tensor(weight)}
        return losses

    def _run_teacher(self, index: int, images: list[Tensor], student_batch: ImageList, student: DenseOutputs) -> DenseOutputs:
        adapter = self.teacher_adapters[index]
        if self.teacher_geometry == "student":
            batch, rois = self._renormalized(student_batch, adapter), student
        else:
            batch, _ = adapter.model.transform(images)
            rois = _rescaled_rois(student, batch.image_sizes)
        if not is_low_precision(adapter.model):
            return adapter.run(batch, self._teacher_needs, rois)
        with teacher_autocast(adapter.model, batch.tensors.device):  # e.g. a bfloat16 teacher
            outputs = adapter.run(batch, self._teacher_needs, rois)
        return outputs_in(outputs, batch.tensors.dtype)  # the losses compare in the student's dtype

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

    @torch.no_grad()
    def _update_self_teacher(self) -> None:
        if self.self_distillation_mode is None:
            return
        teacher = self.teachers[0]
        if self.self_distillation_mode == "snapshot":
            if int(self.iteration) == self.warmup_iters:
                teacher.load_state_dict(self.student.state_dict())
            return
        for teacher_param, student_param in zip(teacher.parameters(), self.student.parameters()):
            teacher_param.lerp_(student_param.detach(), 1.0 - self.ema_decay)
        for teacher_buffer, student_buffer in zip(teacher.buffers(), self.student.buffers()):
            teacher_buffer.copy_(student_buffer)


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
        student, roi_proposals=rescale(student.roi_proposals), mask_proposals=rescale(student.mask_proposals)
    )
