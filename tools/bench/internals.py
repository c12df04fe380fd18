"""How the benchmark reaches inside one distillation step, per task: record the student's
outputs once, run what the recipe needs of the teacher alone (row (t)), and evaluate the terms
alone on recorded outputs (row (k)). Detection and segmentation distillers do these through
different adapters and step contexts; a :class:`~bench.families.Family` names its kind.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from densekd import Tap, adapter_for
from densekd.detection.pairs import StepContext, term_loss
from densekd.segmentation.pairs import SegmentationStepContext, segmentation_term_loss
from densekd.segmentation.trainer import check_masks

if TYPE_CHECKING:
    from .workload import Workload

IGNORE_INDEX = 255  # the segmentation distiller's default: mask pixels without ground truth


class DetectionInternals:
    """A torchvision detector: the teacher runs on the student's resized batch (an ImageList),
    its RoI heads on the student's proposals."""

    @staticmethod
    def record_student(w: "Workload") -> tuple[Any, Any]:
        """(the batch the distiller hands the teacher, the student's outputs)."""
        adapter = adapter_for(w.student)
        with torch.no_grad(), Tap(w.student, outputs=adapter.tap_outputs(), inputs=adapter.tap_inputs()) as tap:
            w.student(w.images, w.targets)
            records = tap.read()
        return records["transform"][0], adapter.collect(records)

    @staticmethod
    def run_teacher(w: "Workload", batch, student, needs: set[str]):
        return adapter_for(w.teacher).run(batch, needs, student)

    @staticmethod
    def input_dtype(batch) -> torch.dtype:
        return batch.tensors.dtype

    @staticmethod
    def term_losses(distiller, student, teacher) -> tuple[Any, Callable]:
        """(the step context the terms read, the function that evaluates one term on it)."""
        context = StepContext(
            student, [teacher], distiller.teacher_weights, distiller.student_adapter,
            distiller.connectors, distiller.level_pairs, iteration=0,
        )  # fmt: skip
        return context, term_loss


class SegmentationInternals:
    """A torchvision segmentation model: the teacher sees the student's input tensor itself. The
    full recipe's distiller's adapters record and run the models, so that the logits come at its
    ``logit_resolution``."""

    @staticmethod
    def record_student(w: "Workload") -> tuple[Tensor, Any]:
        adapter = w.full[0].student_adapter
        with torch.no_grad(), Tap(w.student, outputs=adapter.tap_outputs()) as tap:
            result = w.student(w.images)
            records = tap.read()
        masks = check_masks(w.targets, result["out"], IGNORE_INDEX)
        return w.images, adapter.collect(records, result, masks)

    @staticmethod
    def run_teacher(w: "Workload", images: Tensor, student, needs: set[str]):
        return w.full[0].teacher_adapters[0].run(images, needs)

    @staticmethod
    def input_dtype(images: Tensor) -> torch.dtype:
        return images.dtype

    @staticmethod
    def term_losses(distiller, student, teacher) -> tuple[Any, Callable]:
        context = SegmentationStepContext(
            student, [teacher], distiller.teacher_weights, distiller.connectors, distiller.level_pairs,
            iteration=0, ignore_index=IGNORE_INDEX,
        )  # fmt: skip
        return context, segmentation_term_loss
