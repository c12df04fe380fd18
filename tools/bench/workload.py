"""What one family's measurements run on, and the timed rows.

A :class:`Workload` holds a family's teacher, student, batch, distillers and optimizers,
built once (the distillers on first use). :data:`ROWS` maps a row name to the function that
runs it once on a workload; adding a row (say, distillation from an offline teacher cache)
means adding one function here.
"""
from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any, Callable

import torch
from torch import Tensor

from densekd import Distiller
from densekd.core.precision import outputs_in, teacher_autocast
from densekd.training.step import to_device

from .families import Family, Scale

# The student's optimizer; the learning rate is small so that the weights (and with them the
# number of proposals a Faster R-CNN keeps) stay close to where they started over the run.
LEARNING_RATE = 1e-4


class Workload:
    def __init__(self, family: Family, scale: Scale, device: torch.device, teacher_dtype: torch.dtype, seed: int = 0):
        self.family, self.scale, self.device = family, scale, device
        torch.manual_seed(seed)
        self.teacher = family.build(scale.teacher, scale).to(device=device, dtype=teacher_dtype).eval()
        self.student = family.build(scale.student, scale).to(device)
        images, targets = family.batch(scale, seed)
        self.images, self.targets = to_device(images, device), to_device(targets, device)
        self.student_optimizer = torch.optim.SGD(self.student.parameters(), lr=LEARNING_RATE, momentum=0.9)
        # Modes are set once, as a training loop does: the student trains, the teacher stays in
        # eval mode (the distillers keep it there).
        self.student.train()

    def _distiller(self, terms) -> tuple[Distiller, torch.optim.Optimizer]:
        options = self.family.distiller_options
        distiller = Distiller(self.student, self.teacher, terms, probe_size=self.scale.image_size, **options).train()
        return distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=LEARNING_RATE, momentum=0.9)

    @cached_property
    def full(self) -> tuple[Distiller, torch.optim.Optimizer]:
        return self._distiller(self.family.full_terms())

    @cached_property
    def features_only(self) -> tuple[Distiller, torch.optim.Optimizer]:
        return self._distiller(self.family.feature_terms())

    @cached_property
    def student_records(self) -> tuple[Any, Any]:
        """The input the distiller hands to the teacher (a detector's resized ImageList, a
        segmenter's own input tensor) and the student's outputs (a Faster R-CNN's proposals
        drive the teacher's RoI heads), recorded once."""
        return self.family.internals.record_student(self)

    @property
    def teacher_needs(self) -> set[str]:
        """The teacher outputs the full recipe's terms compare, as the distiller itself decided."""
        return self.full[0]._teacher_needs

    @cached_property
    def recorded_step(self) -> tuple[Any, Any]:
        """One step's student outputs and the teacher's outputs on the same batch, recorded
        once: what the terms compare."""
        teacher_input, student = self.student_records
        with torch.no_grad(), teacher_autocast(self.teacher, self.device):
            teacher = self.family.internals.run_teacher(self, teacher_input, student, self.teacher_needs)
        return student, outputs_in(teacher, self.family.internals.input_dtype(teacher_input))

    def parameters_millions(self) -> dict[str, float]:
        count = lambda model: sum(p.numel() for p in model.parameters()) / 1e6
        return {"teacher": count(self.teacher), "student": count(self.student)}


def _optimizer_step(losses: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()


def student_step(w: Workload) -> None:
    """(a) the plain student: forward with its torchvision losses, backward, optimizer step."""
    _optimizer_step(w.family.student_losses(w.student, w.images, w.targets), w.student_optimizer)


def teacher_forward(w: Workload) -> None:
    """(b) the teacher's own full forward in eval mode under no_grad: a detector's transform,
    backbone + FPN, heads and post-processing (box decoding, NMS) to detections; a segmenter's
    backbone, classifier and aux classifier to upsampled logits."""
    with torch.no_grad(), teacher_autocast(w.teacher, w.device):
        w.family.teacher_forward(w.teacher, w.images)


def distill_step(w: Workload) -> None:
    """(c) a densekd step with the family's full recipe: student forward with taps, teacher on
    the student's batch, every term, backward through student and connectors, optimizer step."""
    distiller, optimizer = w.full
    _optimizer_step(distiller(w.images, w.targets), optimizer)


def distill_step_features(w: Workload) -> None:
    """A densekd step with feature terms only (the teacher stops after its FPN)."""
    distiller, optimizer = w.features_only
    _optimizer_step(distiller(w.images, w.targets), optimizer)


def teacher_backbone_fpn(w: Workload) -> None:
    """The teacher's transform and backbone + FPN (a segmenter's backbone) under no_grad: its
    cost for feature terms."""
    with torch.no_grad(), teacher_autocast(w.teacher, w.device):
        w.family.teacher_features(w.teacher, w.images)


def _as_leaves(outputs: Any) -> Any:
    """The student's floating-point outputs as fresh leaves that take gradients."""
    leaf = lambda t: t.detach().requires_grad_(True) if isinstance(t, Tensor) and t.is_floating_point() else t
    fields = {f.name: getattr(outputs, f.name) for f in dataclasses.fields(outputs)}
    fields = {name: {k: leaf(v) for k, v in value.items()} if isinstance(value, dict) else leaf(value) for name, value in fields.items()}
    return dataclasses.replace(outputs, **fields)


def kd_terms(w: Workload) -> None:
    """densekd's own work alone: the full recipe's terms (connectors included), forward and
    backward, on one step's recorded student and teacher outputs."""
    distiller = w.full[0]
    student, teacher = w.recorded_step
    context, term_loss = w.family.internals.term_losses(distiller, _as_leaves(student), teacher)
    sum(float(term.weight_at(0)) * term_loss(term, context) for term in distiller.terms).backward()


def teacher_distill_work(w: Workload) -> None:
    """What the full recipe asks of the teacher, alone, as the distiller runs it: backbone (+ FPN)
    and the head outputs the terms compare (RoI heads on the student's proposals) on the
    student's input, under no_grad. (Detectors: teacher and student share mean and std here,
    so the distiller hands the resized batch over as it is.)"""
    teacher_input, student = w.student_records
    with torch.no_grad(), teacher_autocast(w.teacher, w.device):
        w.family.internals.run_teacher(w, teacher_input, student, w.teacher_needs)


ROWS: dict[str, Callable[[Workload], None]] = {
    "student_step": student_step,
    "teacher_forward": teacher_forward,
    "distill_step": distill_step,
    "distill_step_features": distill_step_features,
    "teacher_backbone_fpn": teacher_backbone_fpn,
    "teacher_distill_work": teacher_distill_work,
    "kd_terms": kd_terms,
}

# Rows whose peak memory is measured: the three of the overhead ratio.
MEMORY_ROWS = ("student_step", "teacher_forward", "distill_step")


def teacher_head_runs(w: Workload) -> int:
    """How many times the teacher's heads (everything after its FPN) run in one feature-only
    distillation step: 0 when the teacher stops after its FPN."""
    backbone = w.teacher.backbone
    calls = []
    handles = [
        module.register_forward_hook(lambda *_: calls.append(1))
        for name, module in w.teacher.named_children()
        if module is not backbone and name != "transform" and any(True for _ in module.parameters())
    ]
    try:
        distill_step_features(w)
    finally:
        for handle in handles:
            handle.remove()
    return len(calls)
