"""The SegmentationDistiller: a trainable torchvision segmentation model (FCN, DeepLabV3,
LRASPP), frozen teacher(s) and distillation terms, behind the call signature of
:class:`~densekd.segmentation.trainer.SegmentationTraining`::

    distiller = SegmentationDistiller(student, teacher, terms=[Term("pixel_kl", on="seg_logits", temperature=2.0)])
    loss_dict = distiller(images, masks)    # loss_seg, loss_aux + kd_<term> entries
    sum(loss_dict.values()).backward()

After training, ``distiller.student`` is the plain torchvision model.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..core.distiller_base import DistillerBase
from ..core.taps import Tap
from ..core.terms import Term
from .adapter import SEGMENTATION_LOGIT_OUTPUTS, SegmentationAdapter, check_logit_resolution
from .pairs import SegmentationStepContext, segmentation_term_loss
from .trainer import check_masks, check_segmentation_settings, segmentation_losses

# LRASPP's levels play the roles of FCN/DeepLabV3's: "high" feeds the main classifier like
# "out", "low" is the shallower level like "aux"; feature terms pair them by role.
_LEVEL_ROLES = {"high": "out", "low": "aux"}


class SegmentationDistiller(DistillerBase):
    """Distill one or more frozen teachers into a torchvision segmentation model.

    The teacher sees exactly the student's input tensor (segmentation models take images that
    the data pipeline already resized and normalized), so logits pair position by position.
    Logit terms compare at ``logit_resolution``: by default the heads' own outputs, before
    torchvision upsamples them to the input size, with the masks sampled at each head cell's
    centre; teacher logits of another resolution are resized (bilinear) to the student's.
    The student's own losses are always torchvision's, on the upsampled logits. Only what the
    terms need is computed: the teacher's backbone alone for feature terms, its classifier for
    ``seg_logits``, its auxiliary classifier for ``aux_logits``; one teacher pass per step,
    shared by all terms.

    Args:
        student: FCN, DeepLabV3 or LRASPP to train; ``self.student`` stays that plain model.
            Not wrapped: for data-parallel training wrap the distiller, ``DistributedDataParallel(distiller)``.
        teachers: one teacher or a list (segmentation models); frozen here (eval mode, no gradients).
        terms: the distillation terms (:class:`~densekd.core.terms.Term`), on "seg_logits",
            "aux_logits" or "features" (backbone levels "out"/"aux" or "low"/"high").
        teacher_weights: per-teacher weights (default: equal); probabilities are averaged with
            them for logit terms, losses for feature terms.
        warmup_iters: training iterations without distillation (the kd terms are 0).
        label_smoothing: epsilon of label smoothing in the student's cross-entropies.
        aux_weight: weight of the auxiliary head's cross-entropy (torchvision's references: 0.5).
        ignore_index: mask label of pixels without ground truth; they are left out of the
            cross-entropies and of every logit term.
        teacher_geometry: only "student" (accepted so that detection settings carry over).
        logit_resolution: where ``seg_logits``/``aux_logits`` terms compare. "head": the
            classifiers' outputs (N, K, h, w) at the heads' strides (e.g. 1/8 or 1/16 of the
            input side per axis), ground truth and ignore mask sampled there at each cell's
            centre (``densekd.segmentation.pairs.masks_at``); "input": the forward's upsampled
            (N, K, H, W) logits and the masks as they are (densekd before this setting), at
            about stride^2 times the terms' time and memory.
        probe_size: side of the blank image of the construction-time dry run that infers
            feature shapes (connectors).
    """

    class_indexed_outputs = SEGMENTATION_LOGIT_OUTPUTS

    def __init__(
        self,
        student: nn.Module,
        teachers: Union[nn.Module, Sequence[nn.Module]],
        terms: Sequence[Term],
        teacher_weights: Optional[Sequence[float]] = None,
        warmup_iters: int = 0,
        label_smoothing: float = 0.0,
        aux_weight: float = 0.5,
        ignore_index: int = 255,
        teacher_geometry: str = "student",
        probe_size: int = 128,
        logit_resolution: str = "head",
    ):
        check_logit_resolution(logit_resolution)
        super().__init__(student, teachers, terms, teacher_weights, warmup_iters)
        if teacher_geometry != "student":
            raise ValueError(
                f"teacher_geometry={teacher_geometry!r} applies to detectors, which resize internally; a "
                "segmentation teacher always sees the student's input tensor. Use teacher_geometry='student'."
            )
        check_segmentation_settings(aux_weight, ignore_index, label_smoothing)
        self.aux_weight = float(aux_weight)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.logit_resolution = logit_resolution
        self.student_adapter = SegmentationAdapter(student, logit_resolution)
        self.teacher_adapters = [SegmentationAdapter(t, logit_resolution) for t in self.teachers]
        self._check_terms()
        self._teacher_needs = {term.on for term in self.terms}
        student_shapes = self._probe(self.student_adapter, probe_size)
        teacher_shapes = [self._probe(a, probe_size) for a in self.teacher_adapters]
        self._build_feature_pairs(student_shapes, teacher_shapes)

    # --- construction ----------------------------------------------------------------
    def _check_family_term(self, term: Term) -> None:
        pixel_wise = term.on in SEGMENTATION_LOGIT_OUTPUTS and term.loss != "cwd"
        if term.on == "features" and term.loss == "masked_imitation":
            raise ValueError(
                f"Term {term.name!r}: 'masked_imitation' needs ground-truth boxes, which segmentation has not; "
                "use 'hint', 'cwd', 'pkd', 'attention', 'channel_attention', 'relation' or 'pairwise_affinity'."
            )
        if term.on == "features" and term.class_weights is not None:
            raise ValueError(
                f"Term {term.name!r}: class_weights apply to 'seg_logits' and 'aux_logits' terms, not to features."
            )
        if term.confidence_weighting and not pixel_wise:
            raise ValueError(
                f"Term {term.name!r}: confidence_weighting weights pixels by the teacher's top class "
                "probability; it applies to pixel-wise logit losses (pixel_kl, focal_kl, margin, dkd)."
            )
        if term.class_temperature_spread and not pixel_wise:
            raise ValueError(
                f"Term {term.name!r}: class_temperature_spread sets a temperature per pixel from its class; "
                "it applies to pixel-wise logit losses, not to 'cwd' or features."
            )

    def _class_weights_layout(self) -> str:
        k = self.student_adapter.num_classes
        return f"the student predicts {k} classes (labels 0..{k - 1}): one weight per label"

    def _level_role(self, level: str) -> str:
        return _LEVEL_ROLES.get(level, level)

    def _level_pairing_hint(self) -> str:
        return " LRASPP's 'high' pairs with FCN/DeepLabV3's 'out' and 'low' with 'aux'."

    # --- training-time behaviour --------------------------------------------------------
    def forward(self, images: Tensor, masks: Optional[Tensor] = None):
        """Training: ``loss_seg`` (and ``loss_aux`` with an aux head) plus one weighted
        ``kd_<term>`` per term, from images (N, 3, H, W) and masks (N, H, W) int64.
        Evaluation: ``student(images)`` (its {"out", "aux"} logits)."""
        if not self.training:
            return self.student(images)
        self._update_self_teacher()
        adapter = self.student_adapter
        with Tap(self.student, outputs=adapter.tap_outputs()) as tap:
            result = self.student(images)
            records = tap.read()
        masks = check_masks(masks, result["out"], self.ignore_index)
        losses = segmentation_losses(result, masks, self.aux_weight, self.ignore_index, self.label_smoothing)
        iteration = self._next_iteration()
        if not self._distills_at(iteration):
            return self._with_zero_terms(losses)
        student_outputs = adapter.collect(records, result, masks)
        with torch.no_grad():
            teacher_outputs = [teacher.run(images, self._teacher_needs) for teacher in self.teacher_adapters]
        context = SegmentationStepContext(
            student_outputs,
            teacher_outputs,
            self.teacher_weights,
            self.connectors,
            self.level_pairs,
            iteration,
            self.ignore_index,
        )
        return self._add_terms(losses, context, segmentation_term_loss, iteration)
