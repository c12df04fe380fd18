"""Per-class weights that protect rare categories in long-tailed data.

Everything here turns dataset statistics (how many training images / annotations
each class has) into small tensors that the distiller multiplies into its terms:

* :func:`class_weights` -- one weight per foreground class, shape ``(K,)``, mean 1.
* :func:`label_channel_layout` -- per-label values laid out over a head's channels, ``(K + 1,)`` with background
  with background at index 0.
* :func:`per_class_temperature` -- a KD temperature per class, warmer for rare classes.
* :func:`repeat_factors` -- LVIS repeat-factor sampling weights, one per image.
* :func:`lvis_frequency_groups` -- LVIS rare / common / frequent split.
* :func:`segmentation_class_counts` -- per-class pixel or image counts of segmentation masks.

Class indexing: every ``(K,)`` tensor here is indexed by *foreground* class
``0 .. K-1``.  torchvision detection targets number foreground classes ``1 .. K``
(0 is background); for those, class ``c`` lives at index ``c - 1`` of a ``(K,)``
tensor and at index ``c`` of the ``(K + 1,)`` tensor from
:func:`label_channel_layout`.  The label helpers take ``first_label=1`` for them.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .._names import unknown_name_message
from ..data.long_tail import FREQUENCY_THRESHOLDS, class_counts_from_labels, lvis_frequency_of_counts, repeat_factors

__all__ = [
    "FREQUENCY_THRESHOLDS",
    "DEFAULT_GROUP_MULTIPLIERS",
    "WEIGHTING_METHODS",
    "lvis_frequency_groups",
    "class_weights",
    "label_channel_layout",
    "per_class_temperature",
    "class_counts_from_labels",
    "segmentation_class_counts",
    "repeat_factors",
]

DEFAULT_GROUP_MULTIPLIERS: Mapping[str, float] = {"r": 3.0, "c": 1.5, "f": 1.0}


def _as_counts(counts, name: str) -> Tensor:
    """Validate a count vector and return it as a float64 tensor of shape (K,)."""
    t = torch.as_tensor(counts).detach().to(device="cpu", dtype=torch.float64)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence (one count per class), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf; counts must be finite non-negative numbers")
    if (t < 0).any():
        bad = torch.nonzero(t < 0).flatten().tolist()[:5]
        raise ValueError(f"{name} must be non-negative; negative counts at class indices {bad}")
    return t


def _fill_zero_counts(n: Tensor, name: str) -> Tensor:
    """Replace zero counts by the smallest non-zero count (so they get the rarest class's weight)."""
    nonzero = n[n > 0]
    if nonzero.numel() == 0:
        raise ValueError(
            f"all {name} are zero: no class has any training examples, so no weights can be derived. "
            "Check that the dataset is non-empty and that its labels map onto the model's classes "
            "(or use method='none')"
        )
    return torch.where(n > 0, n, nonzero.min())


# ---------------------------------------------------------------------------
# LVIS frequency groups
# ---------------------------------------------------------------------------


def lvis_frequency_groups(image_counts: Sequence[int]) -> list:
    """LVIS frequency group of each class from its number of training *images*.

    Returns one of ``'r'`` (rare, <= 10 images; includes classes with 0 images),
    ``'c'`` (common, 11..100) or ``'f'`` (frequent, > 100) per class, as defined in
    Gupta et al. 2019, "LVIS: A Dataset for Large Vocabulary Instance Segmentation".
    Thresholds are :data:`FREQUENCY_THRESHOLDS`.
    """
    return lvis_frequency_of_counts(_as_counts(image_counts, "image_counts").tolist())


# ---------------------------------------------------------------------------
# Class weights
# ---------------------------------------------------------------------------
# Every method has the signature ``fn(n, beta, multipliers) -> raw weights``:
#   n           (K,) float64, strictly positive counts (zeros already filled)
#   beta        effective-number beta, in [0, 1)
#   multipliers {'r','c','f'} -> multiplier, for "lvis_groups"
# and returns unnormalized positive weights of shape (K,).


def _none(n: Tensor, beta: float, multipliers: Mapping[str, float]) -> Tensor:
    return torch.ones_like(n)


def _inverse(n: Tensor, beta: float, multipliers: Mapping[str, float]) -> Tensor:
    return 1.0 / n


def _sqrt_inverse(n: Tensor, beta: float, multipliers: Mapping[str, float]) -> Tensor:
    return 1.0 / torch.sqrt(n)


def _effective_number(n: Tensor, beta: float, multipliers: Mapping[str, float]) -> Tensor:
    # Cui et al. 2019: w = (1 - beta) / (1 - beta^n).  1 - beta^n is computed as
    # -expm1(n log beta) so beta close to 1 keeps full precision.
    if beta == 0.0:
        return torch.ones_like(n)  # beta^n = 0 for n > 0
    return (1.0 - beta) / (-torch.expm1(n * math.log(beta)))


def _lvis_groups(n: Tensor, beta: float, multipliers: Mapping[str, float]) -> Tensor:
    groups = lvis_frequency_groups(n)
    return torch.tensor([multipliers[g] for g in groups], dtype=torch.float64)


WEIGHTING_METHODS: Dict[str, Callable[[Tensor, float, Mapping[str, float]], Tensor]] = {
    "none": _none,
    "inverse": _inverse,
    "sqrt_inverse": _sqrt_inverse,
    "effective_number": _effective_number,
    "lvis_groups": _lvis_groups,
}

# Methods that always use image counts, whatever annotation_counts says.
_IMAGE_COUNT_METHODS = frozenset({"lvis_groups"})


def _group_multipliers(group_multipliers: Optional[Mapping[str, float]]) -> Dict[str, float]:
    merged = dict(DEFAULT_GROUP_MULTIPLIERS)
    if group_multipliers is None:
        return merged
    for key, value in group_multipliers.items():
        if key not in merged:
            raise ValueError(
                f"group_multipliers has unknown group {key!r}; valid groups are 'r' (rare), "
                f"'c' (common) and 'f' (frequent)"
            )
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"group_multipliers[{key!r}] must be a finite positive number, got {value}")
        merged[key] = value
    return merged


def class_weights(
    image_counts: Sequence[int],
    annotation_counts: Optional[Sequence[int]] = None,
    method: str = "none",
    beta: float = 0.999,
    group_multipliers: Optional[Mapping[str, float]] = None,
    power: float = 1.0,
) -> Tensor:
    """Per-class loss weights, shape ``(K,)``, float32, mean 1 over classes.

    Normalizing to mean 1 means switching weighting on changes how the loss is
    spread over classes, not its overall scale.

    Args:
        image_counts: ``(K,)`` number of training images containing each class.
        annotation_counts: optional ``(K,)`` number of annotated instances per class.
        method: one of :data:`WEIGHTING_METHODS`; with ``n_c`` the count of class ``c``:

            * ``"none"``: all ones.
            * ``"inverse"``: ``1 / n_c``.
            * ``"sqrt_inverse"``: ``1 / sqrt(n_c)``.
            * ``"effective_number"``: ``(1 - beta) / (1 - beta ** n_c)``
              (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples").
            * ``"lvis_groups"``: a multiplier per LVIS frequency group
              (:func:`lvis_frequency_groups`), default ``{"r": 3.0, "c": 1.5, "f": 1.0}``.

            ``n_c`` is ``annotation_counts`` when given, else ``image_counts``;
            ``"lvis_groups"`` always uses ``image_counts``, since LVIS defines its
            groups by image counts.
        beta: effective-number hyper-parameter in ``[0, 1)``; larger gives stronger
            re-weighting (``beta -> 1`` approaches ``"inverse"``, ``beta = 0`` is ``"none"``).
        group_multipliers: overrides for some or all of the ``'r'``, ``'c'``, ``'f'``
            multipliers of ``"lvis_groups"``; unspecified groups keep their defaults.
        power: the raw weights are raised to this power before normalization;
            ``< 1`` softens the re-weighting, ``0`` switches it off.

    Classes with a zero count get the weight of the rarest class with a non-zero
    count (their count is replaced by the smallest non-zero count), so no inf/NaN.
    All-zero counts are an error for every method except ``"none"``.

    Raises:
        ValueError: unknown method (with a close-match suggestion), negative,
            non-finite or (except for ``"none"``) all-zero counts, mismatched lengths, bad ``beta``/``power``.
    """
    if method not in WEIGHTING_METHODS:
        raise ValueError(unknown_name_message("class weighting method", method, WEIGHTING_METHODS))
    if not (0.0 <= beta < 1.0):
        raise ValueError(f"beta must be in [0, 1) for the effective number of samples, got {beta} (typical: 0.99 .. 0.9999)")
    if not (math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0, got {power}")
    multipliers = _group_multipliers(group_multipliers)

    images = _as_counts(image_counts, "image_counts")
    if annotation_counts is not None:
        annotations = _as_counts(annotation_counts, "annotation_counts")
        if annotations.shape != images.shape:
            raise ValueError(
                f"annotation_counts has {annotations.numel()} classes but image_counts has "
                f"{images.numel()}; pass one count per class in both"
            )
    if annotation_counts is None or method in _IMAGE_COUNT_METHODS:
        n, name = images, "image_counts"
    else:
        n, name = annotations, "annotation_counts"

    if method == "none":  # counts are only validated: weighting off never fails on them
        return torch.ones(n.numel(), dtype=torch.float32)
    n = _fill_zero_counts(n, name)
    w = WEIGHTING_METHODS[method](n, beta, multipliers) ** power  # (K,) float64
    w = w / w.mean()
    return w.to(torch.float32)


def label_channel_layout(values: Tensor, num_channels: int, fill: float = 1.0) -> Tensor:
    """Per-label values ``(K,)`` (labels 1..K) laid out over a head's class channels.

    Heads with ``K + 1`` channels -- softmax RoI heads with background at index 0, and
    torchvision's RetinaNet/FCOS trained on labels 1..K, whose losses put label k on channel k
    so that channel 0 never fires -- get ``fill`` prepended for channel 0, so that index ``c``
    matches torchvision's label ``c``. Heads with ``K`` channels take the values as they are.
    """
    values = torch.as_tensor(values)
    if values.dim() != 1:
        raise ValueError(f"per-class values must be 1-D (K,), got shape {tuple(values.shape)}")
    if values.numel() == num_channels:
        return values
    if values.numel() + 1 == num_channels:
        return torch.cat([values.new_tensor([fill]), values])  # (K + 1,)
    raise ValueError(f"{values.numel()} per-class values cannot be laid out over {num_channels} class channels.")


def per_class_temperature(
    weights: Tensor,
    base: float,
    spread: float = 1.0,
    max_ratio: float = 4.0,
) -> Tensor:
    """Per-class KD temperature, warmer for rare (higher-weight) classes.

    ``T_c = clamp(base * (w_c / mean(w)) ** spread, base / max_ratio, base * max_ratio)``

    With weights from :func:`class_weights` (mean 1) this is ``base * w_c ** spread``.
    It is monotone non-decreasing in ``w_c``; ``spread = 0`` gives ``base`` for every
    class.  A warmer temperature softens the teacher's distribution for tail classes,
    whose teacher logits tend to be less reliable.

    Args:
        weights: ``(K,)`` (or ``(K + 1,)`` for softmax layout) positive class weights.
        base: temperature of a class with average weight, > 0.
        spread: exponent controlling how strongly temperature follows the weight, >= 0.
        max_ratio: clamp temperatures to ``[base / max_ratio, base * max_ratio]``, >= 1.

    Returns:
        Tensor with the shape, device and (floating) dtype of ``weights``.
    """
    weights = torch.as_tensor(weights)
    if not weights.is_floating_point():
        weights = weights.to(torch.float32)
    if weights.dim() != 1 or weights.numel() == 0:
        raise ValueError(f"weights must be a non-empty 1-D tensor of class weights, got shape {tuple(weights.shape)}")
    if not (torch.isfinite(weights).all() and (weights > 0).all()):
        raise ValueError("weights must be finite and strictly positive (use class_weights to build them)")
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base temperature must be a finite positive number, got {base}")
    if not (math.isfinite(spread) and spread >= 0):
        raise ValueError(f"spread must be a finite number >= 0 (0 = constant temperature), got {spread}")
    if not (math.isfinite(max_ratio) and max_ratio >= 1):
        raise ValueError(f"max_ratio must be a finite number >= 1, got {max_ratio}")
    relative = weights / weights.mean()
    temperature = base * relative.pow(spread)
    return temperature.clamp(min=base / max_ratio, max=base * max_ratio)


# ---------------------------------------------------------------------------
# Segmentation: counts from masks
# ---------------------------------------------------------------------------

SEGMENTATION_COUNT_UNITS = ("pixels", "images")


def segmentation_class_counts(
    masks: Union[Tensor, Iterable[Tensor]],
    num_classes: int,
    ignore_index: Optional[int] = 255,
    by: str = "pixels",
) -> Tensor:
    """Per-class counts of segmentation ground truth, ``(K,)`` int64, for :func:`class_weights`.

    Segmentation labels are the class channels ``0 .. K-1`` (background, where the dataset has
    one, is a class like the others); pixels labelled ``ignore_index`` are not counted.

    Args:
        masks: one ``(N, H, W)`` / ``(H, W)`` integer tensor, or an iterable of them (e.g. the
            training set's masks, image by image; sizes may differ).
        num_classes: K.
        ignore_index: label of pixels without ground truth (None: every pixel counts).
        by: ``"pixels"``: number of pixels of each class (class pixel frequency);
            ``"images"``: number of images in which the class appears (image frequency,
            what :func:`lvis_frequency_groups` expects).

    Example::

        pixels = segmentation_class_counts(train_masks, 21, by="pixels")
        weights = class_weights(pixels, method="sqrt_inverse")     # (21,), mean 1
    """
    if by not in SEGMENTATION_COUNT_UNITS:
        raise ValueError(unknown_name_message("count unit", by, SEGMENTATION_COUNT_UNITS))
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    counts = torch.zeros(num_classes, dtype=torch.int64)
    batches = [masks] if isinstance(masks, Tensor) else masks
    for index, batch in enumerate(batches):
        batch = torch.as_tensor(batch)
        if batch.is_floating_point() or batch.dim() not in (2, 3):
            raise ValueError(
                f"masks[{index}] must be an integer (H, W) or (N, H, W) tensor of class indices, "
                f"got dtype {batch.dtype} and shape {tuple(batch.shape)}"
            )
        images = batch.reshape(-1, *batch.shape[-2:]).to("cpu", torch.int64)  # (N, H, W)
        for image in images:
            labels = image.reshape(-1)
            if ignore_index is not None:
                labels = labels[labels != ignore_index]
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                bad = sorted(set(labels[(labels < 0) | (labels >= num_classes)].unique().tolist()))[:5]
                raise ValueError(
                    f"masks[{index}] holds labels {bad} outside 0..{num_classes - 1} and not the "
                    f"ignore_index {ignore_index}; pass the model's num_classes or the dataset's ignore_index"
                )
            per_class = torch.bincount(labels, minlength=num_classes)  # (K,) pixels of each class
            counts += per_class if by == "pixels" else (per_class > 0).long()
    return counts
