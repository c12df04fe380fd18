"""Turn one segmentation step's outputs into the tensor pairs each loss compares.

Logits come at the resolution the distiller's ``logit_resolution`` chose: the head's own
(N, K, h, w), or the input's (N, K, H, W). A "pixel" below is one position of the student's
logits (at the head's resolution, one head cell). Pixel-wise losses compare the class
distributions of every pixel that is not ignored; channel-wise distillation compares each
class channel's distribution over the kept pixels; feature terms go through the same level
pairing and connectors as detection (``densekd.detection.pairs``). The ground-truth masks
(N, H, W) are sampled at each pixel's centre (``masks_at``); teacher logits are resized to the
student's grid (``aligned``), several teachers' probabilities are averaged
(``fuse_teacher_logits``), and per-class weights and temperatures are looked up by each
pixel's ground-truth class.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.feature_pairs import PairingContext, feature_term_loss, fuse_teacher_logits
from ..core.outputs import SegmentationOutputs
from ..core.terms import Term

# Losses over each pixel's class distribution, called on (P, K) rows of the kept pixels.
_PIXEL_ROW_LOSSES = frozenset({"focal_kl", "margin", "dkd"})


def masks_at(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, H, W) ground-truth labels -> (N, h, w): each cell of an h x w grid over the image takes
    the label of its centre pixel, row ((2i + 1) H) // (2h) and column ((2j + 1) W) // (2w) (the
    pixels F.interpolate's "nearest-exact" picks); ``masks`` itself when the sizes agree.

    Why the centre pixel, with an ignore label (255) among the classes:

    * it never invents a label: a mean over the cell (area, bilinear) mixes 255 and class
      indices into values that are neither, and a max lets any ignored pixel win;
    * it is where torchvision's bilinear upsampling (align_corners=False) puts the cell's logit,
      the value the terms compare; F.interpolate's "nearest" takes the top-left pixel, half a
      cell away, so a void border on the top rows would leave a whole row of cells out;
    * it keeps each label's share: objects fall anywhere relative to the grid, so a cell takes a
      label with the probability that a pixel has it. The per-class weights (inverse pixel
      frequency) and temperatures then mean at the head's resolution what they mean at the
      input's, and a half-void cell counts as often as it is left out. A majority vote would
      drop classes smaller than half a cell (the small and rare ones the weights are for), and
      "any ignored pixel ignores the cell" would leave out every cell along VOC's 5-pixel void
      object outlines, where the teacher knows most about the boundaries.
    """
    h, w = size
    height, width = masks.shape[-2:]
    if (height, width) == (h, w):
        return masks
    rows = (2 * torch.arange(h, device=masks.device) + 1) * height // (2 * h)  # (h,)
    columns = (2 * torch.arange(w, device=masks.device) + 1) * width // (2 * w)  # (w,)
    return masks[:, rows][:, :, columns]  # (N, H, W) -> (N, h, W) -> (N, h, w)


def aligned(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """A teacher's (N, K, h_t, w_t) logits on the student's (h, w) grid: bilinear, as torchvision
    upsamples logits, and antialiased where the teacher's grid is finer, so that a student cell
    sees the teacher over its whole area rather than the two nearest rows and columns."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    finer = logits.shape[-2] > size[0] or logits.shape[-1] > size[1]
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False, antialias=finer)


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
        self._ground_truth: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def _ground_truth_at(self, output_name: str) -> tuple[Tensor, Tensor]:
        """(labels, valid), each (N, h, w), on the grid of the student's ``output_name`` logits;
        computed once per grid size ("out" and "aux" heads can differ)."""
        size = tuple(getattr(self.student, output_name).shape[-2:])
        if size not in self._ground_truth:
            masks = masks_at(self.student.masks, size)
            valid = masks != self.ignore_index
            self._ground_truth[size] = (masks.masked_fill(~valid, 0), valid)
        return self._ground_truth[size]

    def valid(self, output_name: str) -> Tensor:
        """(N, h, w) bool on the grid of ``output_name``, True at pixels with ground truth (not
        the ignore index)."""
        return self._ground_truth_at(output_name)[1]

    def labels(self, output_name: str) -> Tensor:
        """(N, h, w) ground-truth class per pixel of ``output_name``'s grid, 0 at ignored pixels
        (a safe index; they weigh 0)."""
        return self._ground_truth_at(output_name)[0]

    def teacher_logits(self, output_name: str) -> list[Tensor]:
        """Each teacher's logits on the grid of the student's, (N, K, h, w). The teacher is
        resized, not the student: the student's gradient then flows through its own logits only
        (no interpolation in its backward), the frozen teacher's resize needs no backward, the
        masks are sampled once, on the student's grid, and a term costs what the student's
        resolution costs."""
        size = tuple(getattr(self.student, output_name).shape[-2:])
        return [aligned(getattr(teacher, output_name), size) for teacher in self.teachers]

    def pixel_class_weights(self, class_weights: Tensor, output_name: str) -> Tensor:
        """(N, h, w) weight of every pixel's ground-truth class on ``output_name``'s grid, 0 at
        ignored pixels."""
        labels, valid = self._ground_truth_at(output_name)
        return class_weights.to(labels.device)[labels] * valid


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
    """Per-pixel softmax losses on (N, K, h, w) logits; ignored pixels left out."""
    student = getattr(ctx.student, term.on)  # (N, K, h, w)
    valid, labels = ctx.valid(term.on), ctx.labels(term.on)  # (N, h, w) each
    takes_temperature = "temperature" in term._loss_arguments()
    base_t = _loss_temperature(term, ctx) if takes_temperature else 1.0
    class_t = term.class_temperatures(base_t)
    temperature: Tensor | float = base_t
    if class_t is not None:  # ignored pixels keep the base temperature
        temperature = torch.where(valid, class_t.to(student.device)[labels], base_t)  # (N, h, w)
    teacher = fuse_over_classes(ctx.teacher_logits(term.on), ctx.teacher_weights, temperature)
    weights: Optional[Tensor] = None
    if term.class_weights is not None:
        weights = ctx.pixel_class_weights(term.class_weights, term.on)  # (N, h, w)
    if term.confidence_weighting:
        plain = fuse_over_classes(ctx.teacher_logits(term.on), ctx.teacher_weights, 1.0)
        confidence = torch.softmax(plain, dim=1).amax(dim=1)  # (N, h, w)
        weights = confidence if weights is None else weights * confidence
    if term.loss not in _PIXEL_ROW_LOSSES:  # pixel_kl takes the maps and the ignore map itself
        kwargs = dict(term.params, ignore=~valid, weights=weights)
        if takes_temperature:
            kwargs["temperature"] = temperature
        return term.loss_fn(student, teacher, **kwargs)
    # (N, K, h, w) -> (N, h, w, K) -> (P, K): the P kept pixels as rows
    keep = valid.reshape(-1)
    rows = lambda x: x.movedim(1, -1).reshape(-1, x.shape[1])[keep]
    kwargs = dict(term.params)
    if weights is not None:
        kwargs["weights"] = weights.reshape(-1)[keep]  # (P,)
    if takes_temperature:
        kwargs["temperature"] = temperature.reshape(-1)[keep] if isinstance(temperature, Tensor) else temperature
    if term.loss == "dkd":
        kwargs["target"] = labels.reshape(-1)[keep]  # (P,)
    return term.loss_fn(rows(student), rows(teacher), **kwargs)


def _channel_wise(term: Term, ctx: SegmentationStepContext) -> Tensor:
    """CWD on (N, K, h, w) logits: each class channel a distribution over the kept pixels,
    class weights per channel."""
    student = getattr(ctx.student, term.on)
    temperature = _loss_temperature(term, ctx)
    valid = ctx.valid(term.on)  # (N, h, w)
    teacher = fuse_over_positions(ctx.teacher_logits(term.on), ctx.teacher_weights, temperature, valid)
    weights = None if term.class_weights is None else term.class_weights.to(student.device)  # (K,)
    return term.loss_fn(student, teacher, temperature=temperature, ignore=~valid, weights=weights, **term.params)


def segmentation_term_loss(term: Term, ctx: SegmentationStepContext) -> Tensor:
    """The unweighted value of one term on this step's segmentation outputs."""
    if term.on == "features":
        return feature_term_loss(term, ctx)  # same level pairing and connectors as detection
    if term.loss == "cwd":
        return _channel_wise(term, ctx)
    return _pixel_logits(term, ctx)
