"""Turn one segmentation step's outputs into the tensor pairs each loss compares.

Pixel-wise losses compare the class distributions of every pixel that is not ignored;
channel-wise distillation compares each class channel's distribution over the kept pixels;
feature terms go through the same level pairing and connectors as detection
(``densekd.detection.pairs``). Teacher logits are aligned to the student's size (bilinear), several
teachers' probabilities are averaged (``fuse_teacher_logits``), and per-class weights and
temperatures are looked up by each pixel's ground-truth class.
"""
from __future__ import annotations

import inspect
from functools import cached_property
from typing import Optional

import torch
from torch import Tensor, nn

from ..core.feature_pairs import PairingContext, feature_term_loss, fuse_teacher_logits
from ..core.outputs import SegmentationOutputs
from ..core.terms import Term
from .adapter import upsampled

# Losses over each pixel's class distribution, called on (P, K) rows of the kept pixels.
_PIXEL_ROW_LOSSES = frozenset({"focal_kl", "margin", "dkd"})


class SegmentationStepContext(PairingContext):
    """Everything one segmentation training step knows, shared derived tensors cached."""

    def __init__(
        self,
        student: SegmentationOutputs,
        teachers: list[SegmentationOutputs],
        teacher_weights: list[float],
        connectors: nn.ModuleDict,
        level_pairs: dict[str, list[list[tuple[str, str]]]],
        iteration: int,
        ignore_index: int,
    ):
        super().__init__(student, teachers, teacher_weights, connectors, level_pairs, iteration)
        self.ignore_index = ignore_index

    @cached_property
    def valid(self) -> Tensor:
        """(N, H, W) bool, True at pixels with ground truth (not the ignore index)."""
        return self.student.masks != self.ignore_index

    @cached_property
    def labels(self) -> Tensor:
        """(N, H, W) ground-truth class per pixel, 0 at ignored pixels (a safe index; they weigh 0)."""
        return self.student.masks.masked_fill(~self.valid, 0)

    def teacher_logits(self, output_name: str) -> list[Tensor]:
        """Each teacher's (N, K, H, W) logits at the student's resolution."""
        size = tuple(getattr(self.student, output_name).shape[-2:])
        return [upsampled(getattr(teacher, output_name), size) for teacher in self.teachers]

    def pixel_class_weights(self, class_weights: Tensor) -> Tensor:
        """(N, H, W) weight of every pixel's ground-truth class, 0 at ignored pixels."""
        return class_weights.to(self.labels.device)[self.labels] * self.valid


def fuse_over_classes(logits: list[Tensor], weights: list[float], temperature: Tensor | float) -> Tensor:
    """Several teachers' (N, K, H, W) logits -> one whose tempered softmax over K is their
    weighted mean; ``temperature`` a number or (N, H, W) per pixel."""
    if len(logits) == 1:
        return logits[0]
    t = temperature[..., None] if isinstance(temperature, Tensor) else temperature  # (N, H, W, 1)
    # (N, K, H, W) -> (N, H, W, K): classes last, as fuse_teacher_logits expects
    fused = fuse_teacher_logits([z.movedim(1, -1) for z in logits], weights, t, sigmoid=False)
    return fused.movedim(-1, 1)


def fuse_over_positions(logits: list[Tensor], weights: list[float], temperature: float, keep: Tensor) -> Tensor:
    """Several teachers' (N, K, H, W) logits -> one whose tempered softmax over the kept
    positions of each channel (CWD's distributions) is their weighted mean; ``keep`` (N, H, W)."""
    if len(logits) == 1:
        return logits[0]
    n, k, h, w = logits[0].shape
    # Left-out positions get probability 0 in every teacher's distribution (images with no
    # kept pixel keep all of them: they weigh 0 in the loss anyway).
    keep = keep | ~keep.flatten(1).any(dim=1)[:, None, None]
    masked = [z.masked_fill(~keep[:, None], float("-inf")).reshape(n, k, h * w) for z in logits]  # (N, K, H*W)
    return fuse_teacher_logits(masked, weights, temperature, sigmoid=False).reshape(n, k, h, w)


def _loss_temperature(term: Term, ctx: SegmentationStepContext) -> float:
    """The term's temperature, or the loss function's own default when the term sets none."""
    if term.temperature is None:
        default = inspect.signature(term.loss_fn).parameters["temperature"].default
        return float(default)
    return float(term.temperature_at(ctx.iteration))


def _pixel_logits(term: Term, ctx: SegmentationStepContext) -> Tensor:
    """Per-pixel softmax losses on (N, K, H, W) logits; ignored pixels left out."""
    student = getattr(ctx.student, term.on)  # (N, K, H, W)
    takes_temperature = "temperature" in term._loss_arguments()
    base_t = _loss_temperature(term, ctx) if takes_temperature else 1.0
    class_t = term.class_temperatures(base_t)
    temperature: Tensor | float = base_t
    if class_t is not None:  # ignored pixels keep the base temperature
        temperature = torch.where(ctx.valid, class_t.to(student.device)[ctx.labels], base_t)  # (N, H, W)
    teacher = fuse_over_classes(ctx.teacher_logits(term.on), ctx.teacher_weights, temperature)
    weights: Optional[Tensor] = None
    if term.class_weights is not None:
        weights = ctx.pixel_class_weights(term.class_weights)  # (N, H, W)
    if term.confidence_weighting:
        plain = fuse_over_classes(ctx.teacher_logits(term.on), ctx.teacher_weights, 1.0)
        confidence = torch.softmax(plain, dim=1).amax(dim=1)  # (N, H, W)
        weights = confidence if weights is None else weights * confidence
    if term.loss not in _PIXEL_ROW_LOSSES:  # pixel_kl takes the maps and the ignore map itself
        kwargs = dict(term.params, ignore=~ctx.valid, weights=weights)
        if takes_temperature:
            kwargs["temperature"] = temperature
        return term.loss_fn(student, teacher, **kwargs)
    # (N, K, H, W) -> (N, H, W, K) -> (P, K): the P kept pixels as rows
    keep = ctx.valid.reshape(-1)
    rows = lambda x: x.movedim(1, -1).reshape(-1, x.shape[1])[keep]
    kwargs = dict(term.params)
    if weights is not None:
        kwargs["weights"] = weights.reshape(-1)[keep]  # (P,)
    if takes_temperature:
        kwargs["temperature"] = temperature.reshape(-1)[keep] if isinstance(temperature, Tensor) else temperature
    if term.loss == "dkd":
        kwargs["target"] = ctx.labels.reshape(-1)[keep]  # (P,)
    return term.loss_fn(rows(student), rows(teacher), **kwargs)


def _channel_wise(term: Term, ctx: SegmentationStepContext) -> Tensor:
    """CWD on (N, K, H, W) logits: each class channel a distribution over the kept pixels,
    class weights per channel."""
    student = getattr(ctx.student, term.on)
    temperature = _loss_temperature(term, ctx)
    teacher = fuse_over_positions(ctx.teacher_logits(term.on), ctx.teacher_weights, temperature, ctx.valid)
    weights = None if term.class_weights is None else term.class_weights.to(student.device)  # (K,)
    return term.loss_fn(student, teacher, temperature=temperature, ignore=~ctx.valid, weights=weights, **term.params)


def segmentation_term_loss(term: Term, ctx: SegmentationStepContext) -> Tensor:
    """The unweighted value of one term on this step's segmentation outputs."""
    if term.on == "features":
        return feature_term_loss(term, ctx)  # same level pairing and connectors as detection
    if term.loss == "cwd":
        return _channel_wise(term, ctx)
    return _pixel_logits(term, ctx)
