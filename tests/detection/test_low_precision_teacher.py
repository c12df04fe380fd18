"""A teacher stored in bfloat16 distils like its float32 original: it runs under autocast,
its weights stay bfloat16, and the losses see float32 outputs (CPU autocast, tiny models)."""
import copy

import pytest
import torch

from densekd import Distiller, Term
from tiny_detectors import BUILDERS, make_batch

TERMS = {
    "faster_rcnn": [
        Term("kl", "roi_class_logits", temperature=2.0),
        Term("giou", "roi_box_regression"),
        Term("binary_kd", "rpn_objectness"),
        Term("cwd", "features", temperature=4.0),
    ],
    "fcos": [
        Term("binary_kd", "cls_logits", temperature=2.0),
        Term("giou", "box_regression"),
        Term("binary_kd", "centerness"),
        Term("cwd", "features", temperature=4.0),
    ],
}


def _kd_losses(teacher, student, family):
    distiller = Distiller(student, teacher, [copy.deepcopy(t) for t in TERMS[family]]).train()
    images, targets = make_batch(num_images=2)
    torch.manual_seed(3)  # the same RPN / RoI sampling for both teachers
    losses = distiller(images, targets)
    kd = {key: value for key, value in losses.items() if key.startswith("kd_")}
    sum(kd.values()).backward()
    return {key: value.detach() for key, value in kd.items()}, distiller


@pytest.mark.parametrize("family", sorted(TERMS))
def test_bfloat16_teacher_gives_the_float32_teachers_losses(family):
    teacher = BUILDERS[family](fpn_width=64)
    student = BUILDERS[family](fpn_width=32)
    reference, _ = _kd_losses(teacher, copy.deepcopy(student), family)
    low, distiller = _kd_losses(copy.deepcopy(teacher).to(torch.bfloat16), student, family)

    assert all(p.dtype == torch.bfloat16 for p in distiller.teachers[0].parameters())
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in low.values())
    for key in reference:  # bfloat16 keeps ~3 significant digits; CWD's softmax at T = 4 amplifies that
        assert low[key].item() == pytest.approx(reference[key].item(), rel=0.15, abs=1e-4), key
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())
