"""A distillation term: which loss, on which recorded output, with what weight.

``Term`` is the declarative unit users write (in Python or YAML). The table
``LOSSES_BY_OUTPUT`` says which losses make sense on which output, so a term that
mixes them up fails at construction with the list of valid choices.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .._names import did_you_mean
from ..losses import get_loss
from .outputs import PER_ANCHOR_OUTPUTS
from .schedules import build_schedule
from .weighting import per_class_temperature

ScheduleSpec = Union[float, int, dict, Callable[[int], float]]

SOFTMAX_LOGIT_LOSSES = ("kl", "focal_kl", "margin", "dkd")
SIGMOID_LOGIT_LOSSES = ("binary_kd", "focal_binary_kd")
BOX_LOSSES = ("delta_l1", "delta_l2", "delta_smooth_l1", "teacher_bounded", "giou")
FEATURE_LOSSES = (
    "hint", "masked_imitation", "cwd", "pkd", "attention", "channel_attention", "relation", "pairwise_affinity",
)
# Segmentation logits (N, K, H, W): per-pixel softmax losses, and CWD over each class channel's positions.
SEGMENTATION_LOGIT_LOSSES = ("pixel_kl", "cwd", "focal_kl", "margin", "dkd")
# Keypoint heatmap logits (P, K_kp, S, S): a spatial softmax per keypoint.
KEYPOINT_LOSSES = ("spatial_kl",)
# A teacher's post-processed detections (any family, densekd.detection.predictions): the student's own
# loss on them as targets, and GIoU of the student's boxes against the detections they overlap.
DETECTION_LOSSES = ("pseudo_targets", "matched_giou")
# Feature losses that compare channel by channel need a 1x1 connector on a channel mismatch;
# the others compare maps without a channel axis and only need the spatial sizes aligned.
CHANNEL_MATCHED_FEATURE_LOSSES = frozenset({"hint", "masked_imitation", "cwd", "pkd", "channel_attention"})

LOSSES_BY_OUTPUT: dict[str, tuple[str, ...]] = {
    "features": FEATURE_LOSSES,
    "cls_logits": SIGMOID_LOGIT_LOSSES,
    "centerness": SIGMOID_LOGIT_LOSSES,
    # SSD's per-anchor logits are a softmax over K + 1 (background 0), like RoI logits and unlike the
    # K sigmoids of cls_logits: their own name keeps each output's losses one probability model.
    "anchor_class_logits": SOFTMAX_LOGIT_LOSSES,
    "anchor_box_regression": BOX_LOSSES,
    "rpn_objectness": SIGMOID_LOGIT_LOSSES,
    "mask_logits": SIGMOID_LOGIT_LOSSES,
    "keypoint_logits": KEYPOINT_LOSSES,
    "roi_class_logits": SOFTMAX_LOGIT_LOSSES,
    "box_regression": BOX_LOSSES,
    "rpn_box_regression": BOX_LOSSES,
    "roi_box_regression": BOX_LOSSES,
    "roi_features": ("relation",),
    "seg_logits": SEGMENTATION_LOGIT_LOSSES,
    "aux_logits": SEGMENTATION_LOGIT_LOSSES,
    "detections": DETECTION_LOSSES,
}

# Outputs whose positions are weighted by the teacher's confidence unless a term says otherwise:
# box deltas and centerness of background positions carry no information worth imitating.
CONFIDENCE_WEIGHTED_BY_DEFAULT = frozenset({"box_regression", "anchor_box_regression", "rpn_box_regression", "centerness"})
# Outputs without classes: class weights cannot apply.
CLASS_AGNOSTIC_OUTPUTS = frozenset({"rpn_objectness", "rpn_box_regression", "roi_features"})

# Arguments the glue supplies itself; a term's params may not set them.
_SUPPLIED_ARGUMENTS = frozenset({"temperature", "weights", "target", "target_deltas", "foreground", "mask", "ignore", "visible",
                                 "teacher_scores", "match_boxes"})


@dataclass
class Term:
    """One distillation term.

    Args:
        loss: name in ``densekd.losses.LOSSES`` (e.g. "kl", "binary_kd", "cwd").
        on: the recorded output it compares, a key of ``LOSSES_BY_OUTPUT``
            (e.g. "roi_class_logits", "cls_logits", "features", "seg_logits").
        weight: multiplier of the loss, a number or a schedule over iterations
            (a ``densekd.core.schedules`` spec such as ``{"kind": "linear", ...}``).
        temperature: softening temperature T for logit losses (number or schedule).
        params: extra keyword arguments of the loss function (e.g. ``{"gamma": 2.0}``).
        levels: FPN level names for feature terms (default: all levels); for segmentation,
            backbone levels ("out", "aux"; LRASPP "high", "low").
        class_weights: (K,) per-class weights, mean 1 (see ``densekd.core.weighting``);
            applied per class channel, per RoI (matched GT label), per GT box in
            foreground masks and per matched box for box terms; for segmentation logits
            per pixel (its ground-truth class) or per class channel (CWD). One weight per
            label, in the layout of the student's class channels (label k on channel k):
            softmax RoI and SSD heads (K + 1 channels, background 0) take K, for labels 1..K;
            RetinaNet/FCOS heads with C channels take C (labels 0..C-1) or C - 1 (labels
            1..C-1, channel 0 unused); segmenters K, for labels 0..K-1.
        class_temperature_spread: > 0 gives rarer classes a warmer temperature
            (``densekd.core.weighting.per_class_temperature``); needs ``class_weights``.
        confidence_weighting: weight positions by the teacher's confidence; default on
            for box deltas and centerness, off otherwise.
        raise_only_classes: (C,) bool in the label layout of ``class_weights``, for ``cls_logits``
            terms: on these classes' channels the term may raise the student's score towards the
            teacher's but never lower it. An element where the teacher's logit is below the
            student's is left out. Equalization Loss (Tan et al. 2020, "Equalization Loss for
            Long-Tailed Object Recognition", CVPR) drops the negative gradients that other classes'
            samples send to rare classes, because they outnumber the rare class's few positives. KD
            sends the same flood: a student that cannot yet tell a rare class from its frequent
            lookalikes meets the teacher's "not this class" at every lookalike, and on the embedded set
            the rare channels fall to a flat 0.5 % everywhere (README, "Why distillation erased the rare
            classes"). The student's own loss still lowers these scores where they are wrong.
        name: key suffix in the loss dict (``kd_<name>``); defaults to ``<on>_<loss>``.
        balance: scale the term to ``balance`` times the student's own loss (the sum of its
            torchvision losses), so a loss whose raw magnitude is far from the detection
            loss's cannot silently dominate, or vanish from, the gradient. The scale is
            ``balance * mean(student loss) / mean(unscaled term)`` over the term's first
            ``balance_iters`` distilling steps, then frozen (it is distiller state, saved
            and resumed with it); ``weight`` and its schedule still multiply it. None
            (default): the term is used at its raw magnitude times ``weight``.
        balance_iters: the steps the scale is measured over (see ``balance``).
    """

    loss: str
    on: str
    weight: ScheduleSpec = 1.0
    temperature: Optional[ScheduleSpec] = None
    params: dict[str, Any] = field(default_factory=dict)
    levels: Optional[list[str]] = None
    class_weights: Optional[Tensor] = None
    class_temperature_spread: float = 0.0
    confidence_weighting: Optional[bool] = None
    raise_only_classes: Optional[Tensor] = None
    name: Optional[str] = None
    balance: Optional[float] = None
    balance_iters: int = 50

    def __post_init__(self) -> None:
        if self.on not in LOSSES_BY_OUTPUT:
            valid = tuple(LOSSES_BY_OUTPUT)
            raise ValueError(
                f"Unknown output {self.on!r} for a term.{did_you_mean(self.on, valid)} Valid outputs: {', '.join(valid)}."
            )
        self.loss_fn = get_loss(self.loss)  # raises with valid names on a typo
        allowed = LOSSES_BY_OUTPUT[self.on]
        if self.loss not in allowed:
            raise ValueError(
                f"Loss {self.loss!r} does not apply to output {self.on!r}; valid losses there: {', '.join(allowed)}."
            )
        self._check_params()
        self.name = self.name or f"{self.on}_{self.loss}"
        self.weight_at = build_schedule(self.weight)
        takes_temperature = "temperature" in self._loss_arguments()
        if self.temperature is not None and not takes_temperature:
            raise ValueError(f"Term {self.name!r}: loss {self.loss!r} has no temperature; remove 'temperature'.")
        self.temperature_at = build_schedule(1.0 if self.temperature is None else self.temperature)
        if self.class_weights is not None:
            if self.on in CLASS_AGNOSTIC_OUTPUTS:
                raise ValueError(f"Term {self.name!r}: {self.on!r} has no classes, so class_weights cannot apply.")
            self.class_weights = torch.as_tensor(self.class_weights, dtype=torch.float32)
            if self.class_weights.ndim != 1 or bool((self.class_weights < 0).any()):
                raise ValueError(f"Term {self.name!r}: class_weights must be a 1-D tensor of non-negative weights.")
        if self.raise_only_classes is not None:
            if self.on != "cls_logits":
                raise ValueError(
                    f"Term {self.name!r}: raise_only_classes applies to the per-class sigmoids of 'cls_logits' "
                    f"(RetinaNet, FCOS), not to {self.on!r}."
                )
            self.raise_only_classes = torch.as_tensor(self.raise_only_classes, dtype=torch.bool)
            if self.raise_only_classes.ndim != 1:
                raise ValueError(f"Term {self.name!r}: raise_only_classes must be a 1-D tensor, one flag per class.")
        if self.class_temperature_spread:
            if self.class_weights is None or not takes_temperature:
                raise ValueError(
                    f"Term {self.name!r}: class_temperature_spread needs class_weights and a loss with a temperature."
                )
        if self.levels is not None and self.on != "features":
            raise ValueError(f"Term {self.name!r}: 'levels' applies to feature terms only.")
        if self.confidence_weighting is None:
            self.confidence_weighting = self.on in CONFIDENCE_WEIGHTED_BY_DEFAULT
        if self.balance is not None and not (math.isfinite(self.balance) and self.balance > 0):
            raise ValueError(f"Term {self.name!r}: balance must be a positive number (e.g. 0.5), got {self.balance}.")
        if int(self.balance_iters) != self.balance_iters or self.balance_iters < 1:
            raise ValueError(f"Term {self.name!r}: balance_iters must be a whole number >= 1, got {self.balance_iters}.")

    @property
    def key(self) -> str:
        """The term's key in the distiller's loss dict."""
        return f"kd_{self.name}"

    @property
    def per_anchor(self) -> bool:
        return self.on in PER_ANCHOR_OUTPUTS

    @property
    def needs_matching_channels(self) -> bool:
        return self.loss in CHANNEL_MATCHED_FEATURE_LOSSES

    def _loss_arguments(self) -> list[str]:
        return list(inspect.signature(self.loss_fn).parameters)

    def _check_params(self) -> None:
        arguments = self._loss_arguments()
        tunable = [a for a in arguments[2:] if a not in _SUPPLIED_ARGUMENTS]  # past (student, teacher)
        for key in self.params:
            if key not in tunable:
                raise ValueError(
                    f"Loss {self.loss!r} takes no parameter {key!r}.{did_you_mean(key, tunable)} "
                    f"Its parameters: {', '.join(tunable) or 'none'}."
                )

    def class_temperatures(self, base: float) -> Optional[Tensor]:
        """(K,) per-class temperature, or None when the term uses one temperature."""
        if not self.class_temperature_spread:
            return None
        return per_class_temperature(self.class_weights, base, spread=self.class_temperature_spread)
