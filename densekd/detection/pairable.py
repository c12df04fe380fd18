"""Which terms pair a student with its teachers, for the errors that refuse a term: every output
all the models produce, less those a pairing rule rules out, each with its valid losses::

    Terms that pair these models: features (hint, masked_imitation, ...); detections (pseudo_targets, matched_giou)

The rules: per-anchor outputs need shared anchors and strides in the student's geometry, outputs
compared class by class need the same label space, and detections need families densekd can
drive and one teacher that numbers the student's categories
(:func:`densekd.detection.predictions.detections_refusal`).
"""
from __future__ import annotations

from typing import Sequence

from ..core.outputs import DETECTIONS, PER_ANCHOR_OUTPUTS
from ..core.terms import LOSSES_BY_OUTPUT
from .adapters import DetectorAdapter
from .predictions import detections_refusal


def pairable_outputs(
    student: DetectorAdapter,
    teachers: Sequence[DetectorAdapter],
    anchors_pair: bool,
    class_indexed_outputs: frozenset[str],
) -> list[str]:
    """The outputs (``on=`` names, in ``LOSSES_BY_OUTPUT`` order) whose terms pair the student with
    every teacher. ``anchors_pair``: whether per-anchor outputs line up (same anchors, strides and
    geometry), which the distiller judges."""
    common = set(student.provides).intersection(*(t.provides for t in teachers))
    same_classes = all(t.num_classes == student.num_classes for t in teachers)
    outputs = []
    for output in LOSSES_BY_OUTPUT:
        if output not in common:
            continue
        if output in PER_ANCHOR_OUTPUTS and not anchors_pair:
            continue
        if output in class_indexed_outputs and not same_classes:
            continue
        if output == DETECTIONS and detections_refusal(student, teachers) is not None:
            continue
        outputs.append(output)
    return outputs


def describe_pairable(
    student: DetectorAdapter,
    teachers: Sequence[DetectorAdapter],
    anchors_pair: bool,
    class_indexed_outputs: frozenset[str],
) -> str:
    """``"features (hint, ...); detections (pseudo_targets, matched_giou)"``: what ``pairable_outputs``
    finds, each output with its losses."""
    outputs = pairable_outputs(student, teachers, anchors_pair, class_indexed_outputs)
    return "; ".join(f"{output} ({', '.join(LOSSES_BY_OUTPUT[output])})" for output in outputs) or "none"
