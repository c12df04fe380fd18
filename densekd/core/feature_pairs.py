"""What the detection and segmentation pairings share: feature-map terms (the level pairs
and connectors of a step context), the tempered fusion of several teachers' logits, and the
key under which a term's connector is stored.

Each task's step context (:class:`densekd.detection.pairs.StepContext`,
:class:`densekd.segmentation.pairs.SegmentationStepContext`) extends :class:`PairingContext`;
a detection context also provides ``foreground`` for masked imitation.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .terms import Term

class PairingContext:
    """What every term of one step reads: the student's and the teachers' recorded outputs (a
    task's outputs dataclass, with ``features``), the teachers' weights, the feature
    connectors, each feature term's level pairs per teacher, and the distiller's iteration."""

    def __init__(
        self,
        student: Any,
        teachers: list[Any],
        teacher_weights: list[float],
        connectors: nn.ModuleDict,
        level_pairs: dict[str, list[list[tuple[str, str]]]],
        iteration: int,
    ):
        self.student = student
        self.teachers = teachers
        self.teacher_weights = teacher_weights
        self.connectors = connectors
        self.level_pairs = level_pairs
        self.iteration = iteration


# Relation terms compare (HW x HW) affinities; pooling the grid to at most this side keeps
# that cost bounded on large images (a 200 x 200 level would need a 40000^2 matrix).
RELATION_MAX_SIDE = 24


def term_temperature(term: Term, ctx: PairingContext) -> float:
    """The term's temperature at the context's iteration (its schedule, if it has one)."""
    return float(term.temperature_at(ctx.iteration))


def fuse_teacher_logits(logits: list[Tensor], weights: list[float], temperature: Tensor | float, sigmoid: bool) -> Tensor:
    """Average the teachers' probabilities at temperature T and return the logits whose
    tempered probabilities are that average, so every logit loss works unchanged.

    softmax: z = T * log(sum_i w_i softmax(z_i / T)); sigmoid: z = T * logit(sum_i w_i sigmoid(z_i / T)).
    """
    if len(logits) == 1:
        return logits[0]
    if sigmoid:
        probs = sum(w * torch.sigmoid(z / temperature) for w, z in zip(weights, logits))
        return torch.logit(probs, eps=1e-6) * temperature
    probs = sum(w * torch.softmax(z / temperature, dim=-1) for w, z in zip(weights, logits))
    return torch.log(probs.clamp_min(1e-12)) * temperature


def feature_term_loss(term: Term, ctx: PairingContext) -> Tensor:
    """Mean over the term's levels of the loss, weighted mean over teachers."""
    total = 0.0
    for teacher_index, (teacher, teacher_weight) in enumerate(zip(ctx.teachers, ctx.teacher_weights)):
        level_losses = []
        for student_level, teacher_level in ctx.level_pairs[term.name][teacher_index]:
            teacher_map = teacher.features[teacher_level]
            connector = ctx.connectors[connector_key(term, teacher_index, student_level)]
            student_map = connector(ctx.student.features[student_level], teacher_map.shape[-2:])
            level_losses.append(_feature_loss(term, ctx, student_map, teacher_map))
        total = total + teacher_weight * torch.stack(level_losses).mean()
    return total


def _feature_loss(term: Term, ctx: PairingContext, student_map: Tensor, teacher_map: Tensor) -> Tensor:
    if term.loss == "masked_imitation":
        foreground = ctx.foreground(tuple(teacher_map.shape[-2:]), term.class_weights)
        return term.loss_fn(student_map, teacher_map, foreground, **term.params)
    if term.loss == "relation":
        side = (min(RELATION_MAX_SIDE, teacher_map.shape[-2]), min(RELATION_MAX_SIDE, teacher_map.shape[-1]))
        return term.loss_fn(F.adaptive_avg_pool2d(student_map, side), F.adaptive_avg_pool2d(teacher_map, side))
    if term.loss == "cwd" and term.temperature is not None:
        return term.loss_fn(student_map, teacher_map, temperature=term_temperature(term, ctx), **term.params)
    return term.loss_fn(student_map, teacher_map, **term.params)


def connector_key(term: Term, teacher_index: int, student_level: str) -> str:
    return f"{term.name}__teacher{teacher_index}__{student_level}"
