"""Per family: outputs have the documented shapes, a teacher identical to the student gives
zero distillation loss (so every output pairs one to one), a few distillation steps lower
the KD loss, and the trained student is still a plain torchvision model."""
import copy

import pytest
import torch

from densekd import Distiller, Tap, Term, adapter_for
from tiny_detectors import BUILDERS, NUM_CLASSES, make_batch

# Terms that are exactly zero when student and teacher are equal, per family.
ZERO_WHEN_EQUAL_TERMS = {
    "faster_rcnn": [
        Term("kl", "roi_class_logits", temperature=2.0),
        Term("dkd", "roi_class_logits"),
        Term("margin", "roi_class_logits"),
        Term("delta_l1", "roi_box_regression"),
        Term("giou", "roi_box_regression"),
        Term("relation", "roi_features"),
        Term("binary_kd", "rpn_objectness"),
        Term("delta_l2", "rpn_box_regression"),
        Term("teacher_bounded", "rpn_box_regression"),
        Term("teacher_bounded", "roi_box_regression"),
        Term("hint", "features"),
        Term("cwd", "features"),
        Term("masked_imitation", "features"),
    ],
    "mask_rcnn": [Term("binary_kd", "mask_logits", temperature=2.0), Term("focal_kl", "roi_class_logits")],
    "retinanet": [
        Term("binary_kd", "cls_logits", temperature=2.0),
        Term("focal_binary_kd", "cls_logits"),
        Term("delta_smooth_l1", "box_regression"),
        Term("giou", "box_regression"),
        Term("teacher_bounded", "box_regression"),
        Term("pkd", "features"),
        Term("attention", "features"),
    ],
    "fcos": [
        Term("binary_kd", "cls_logits"),
        Term("binary_kd", "centerness"),
        Term("giou", "box_regression"),
        Term("channel_attention", "features"),
        Term("relation", "features"),
    ],
}

TRAINABLE_TERMS = {
    "faster_rcnn": [Term("kl", "roi_class_logits", temperature=2.0), Term("binary_kd", "rpn_objectness")],
    "mask_rcnn": [Term("binary_kd", "mask_logits"), Term("kl", "roi_class_logits")],
    "retinanet": [Term("binary_kd", "cls_logits", temperature=2.0, confidence_weighting=True), Term("delta_l1", "box_regression")],
    "fcos": [Term("binary_kd", "cls_logits"), Term("binary_kd", "centerness")],
}


def _collect(model, images, targets):
    adapter = adapter_for(model)
    with Tap(model, outputs=adapter.tap_outputs(), inputs=adapter.tap_inputs()) as tap:
        model(images, targets)
        return adapter.collect(tap.read())


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_outputs_have_documented_shapes(family):
    model = BUILDERS[family]().train()
    images, targets = make_batch(num_images=3)
    out = _collect(model, images, targets)
    n = len(images)
    num_anchors = out.anchors[0].shape[0]  # HWA: all levels, all anchors per location
    assert all(a.shape == (num_anchors, 4) for a in out.anchors)
    assert [f.shape[0] for f in out.features.values()] == [n] * len(out.features)
    assert [len(b) for b in out.gt_boxes] == [2, 2, 0]
    if family in ("retinanet", "fcos"):
        assert out.cls_logits.shape == (n, num_anchors, NUM_CLASSES)
        assert out.box_regression.shape == (n, num_anchors, 4)
        assert (out.centerness.shape == (n, num_anchors)) if family == "fcos" else out.centerness is None
        level_cells = sum(f.shape[-2] * f.shape[-1] for f in out.features.values())
        assert num_anchors % level_cells == 0
    else:
        assert out.rpn_objectness.shape == (n, num_anchors)
        assert out.rpn_box_regression.shape == (n, num_anchors, 4)
        num_rois = sum(len(p) for p in out.roi_proposals)
        assert out.roi_class_logits.shape == (num_rois, NUM_CLASSES + 1)
        assert out.roi_box_regression.shape == (num_rois, (NUM_CLASSES + 1) * 4)
        assert out.roi_features.shape[0] == num_rois
        if family == "mask_rcnn":
            num_positive = sum(len(p) for p in out.mask_proposals)
            assert out.mask_logits.shape[:2] == (num_positive, NUM_CLASSES + 1)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_identical_teacher_gives_zero_distillation_loss(family):
    student = BUILDERS[family]()
    teacher = copy.deepcopy(student)
    distiller = Distiller(student, teacher, [copy.deepcopy(t) for t in ZERO_WHEN_EQUAL_TERMS[family]]).train()
    images, targets = make_batch(num_images=3)
    losses = distiller(images, targets)
    kd = {k: float(v) for k, v in losses.items() if k.startswith("kd_")}
    assert len(kd) == len(ZERO_WHEN_EQUAL_TERMS[family])
    assert all(abs(v) < 1e-5 for v in kd.values()), kd
    assert all(torch.isfinite(v) for v in losses.values())


def _opinionated(teacher):
    """A randomly initialised head predicts near-uniform scores, like any other random head;
    perturbing its output layers gives the teacher confident, distinct opinions to distil."""
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            if any(key in name for key in ("cls_logits", "cls_score", "bbox", "mask_fcn_logits")):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return teacher


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_distillation_steps_lower_kd_loss_and_keep_student_plain(family):
    teacher = _opinionated(BUILDERS[family](fpn_width=64))
    student = BUILDERS[family](fpn_width=32)
    distiller = Distiller(student, teacher, [copy.deepcopy(t) for t in TRAINABLE_TERMS[family]]).train()
    teacher_before = copy.deepcopy(teacher.state_dict())
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
    images, targets = make_batch(num_images=3)

    def kd_loss():
        torch.manual_seed(7)  # same RPN/RoI sampling every step: a fixed batch
        losses = distiller(images, targets)
        return sum(v for k, v in losses.items() if k.startswith("kd_")), losses

    first, _ = kd_loss()
    for _ in range(6):
        loss, _ = kd_loss()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
    last, _ = kd_loss()
    assert float(last) < float(first), (float(first), float(last))

    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"teacher changed: {key}"
    fresh = BUILDERS[family](fpn_width=32)
    fresh.load_state_dict(distiller.student.state_dict(), strict=True)
    assert type(distiller.student) is type(fresh)
    assert not any(k.startswith("kd") or "connector" in k for k in distiller.student.state_dict())


def test_teacher_roi_heads_run_on_the_student_proposals():
    student, teacher = BUILDERS["mask_rcnn"](fpn_width=16), BUILDERS["mask_rcnn"](fpn_width=32)
    images, targets = make_batch()
    student_out = _collect(student.train(), images, targets)
    teacher.eval()
    teacher_adapter = adapter_for(teacher)
    batch = teacher.transform(images)[0]  # same normalization and size as the student here
    with torch.no_grad():
        teacher_out = teacher_adapter.run(batch, {"roi_class_logits", "mask_logits"}, student_out)
        features = teacher.backbone(batch.tensors)
        pooled = teacher.roi_heads.box_roi_pool(features, student_out.roi_proposals, batch.image_sizes)
        expected_logits, _ = teacher.roi_heads.box_predictor(teacher.roi_heads.box_head(pooled))
    assert teacher_out.roi_proposals is student_out.roi_proposals
    assert torch.allclose(teacher_out.roi_class_logits, expected_logits)
    assert teacher_out.mask_logits.shape[0] == student_out.mask_logits.shape[0]
