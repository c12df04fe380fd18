"""Distiller behaviour: frozen teachers, construction-time validation, connectors,
geometry, multi-teacher, self-distillation and DistributedDataParallel."""
import copy
import socket

import pytest
import torch
import torch.distributed as dist
from tiny_detectors import NUM_CLASSES, build_fcos, build_rcnn, build_retinanet, make_batch
from torch import nn

from densekd import Distiller, Term, class_weights
from densekd.core.feature_pairs import fuse_teacher_logits
from densekd.core.outputs import DenseOutputs
from densekd.detection.distiller import _rescaled_rois


def _kd(losses):
    return {k: v for k, v in losses.items() if k.startswith("kd_")}


# --- the teacher stays frozen -------------------------------------------------------------
def test_teacher_batchnorm_stays_in_eval_and_receives_no_gradient():
    teacher = build_rcnn(fpn_width=32, norm_layer=nn.BatchNorm2d)
    student = build_rcnn(fpn_width=16)
    distiller = Distiller(student, teacher, [Term("kl", "roi_class_logits"), Term("hint", "features")])
    distiller.train()
    assert all(not m.training for m in teacher.modules())
    assert student.training and all(not p.requires_grad for p in teacher.parameters())
    running_mean = teacher.backbone.body.bn1.running_mean.clone()
    images, targets = make_batch()
    sum(distiller(images, targets).values()).backward()
    assert torch.equal(teacher.backbone.body.bn1.running_mean, running_mean)
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.connectors.parameters())


def test_feature_only_terms_stop_the_teacher_after_its_backbone():
    teacher, student = build_rcnn(fpn_width=32), build_rcnn(fpn_width=16)
    calls = []
    for name in ("rpn", "roi_heads", "backbone"):
        getattr(teacher, name).register_forward_hook(lambda *args, n=name: calls.append(n))
    distiller = Distiller(student, teacher, [Term("cwd", "features"), Term("attention", "features")]).train()
    calls.clear()  # the construction-time dry run used the backbone
    distiller(*make_batch())
    assert calls == ["backbone"]


def test_evaluation_mode_returns_the_students_detections():
    student = build_retinanet()
    distiller = Distiller(student, build_retinanet(), [Term("binary_kd", "cls_logits")]).eval()
    images, _ = make_batch()
    with torch.no_grad():
        detections = distiller(images)
        torch.manual_seed(0)
        expected = student(images)
    assert [d.keys() for d in detections] == [e.keys() for e in expected]
    assert all(torch.equal(d["boxes"], e["boxes"]) for d, e in zip(detections, expected))


# --- validation at construction ------------------------------------------------------------
def test_different_class_counts_are_refused_for_logit_terms_but_not_feature_terms():
    teacher, student = build_rcnn(num_classes=NUM_CLASSES + 3), build_rcnn()
    with pytest.raises(ValueError, match=r"predicts 7 classes and the student 4"):
        Distiller(student, teacher, [Term("kl", "roi_class_logits")])
    Distiller(student, teacher, [Term("hint", "features")])


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match=r"(?s)did you mean 'kl'.*valid"):
        Term("kll", "roi_class_logits")


def test_unknown_output_and_misplaced_loss_are_refused():
    with pytest.raises(ValueError, match=r"Unknown output 'cls_logit'.*Did you mean 'cls_logits'"):
        Term("binary_kd", "cls_logit")
    with pytest.raises(ValueError, match=r"does not apply to output 'cls_logits'; valid losses there: binary_kd"):
        Term("kl", "cls_logits")
    with pytest.raises(ValueError, match=r"takes no parameter 'gama'.*Did you mean 'gamma'"):
        Term("focal_binary_kd", "cls_logits", params={"gama": 2.0})


def test_output_missing_from_a_family_is_named():
    with pytest.raises(ValueError, match=r"distills 'centerness', which the teacher 0 \(RetinaNet\) does not produce"):
        Distiller(build_fcos(), build_retinanet(), [Term("binary_kd", "centerness")])


def test_per_anchor_terms_with_mismatched_anchors_say_what_still_works():
    teacher = build_retinanet(anchor_sizes=(32, 64, 128, 256, 512))
    with pytest.raises(ValueError, match=r"anchors differ.*Terms that still work: features \("):
        Distiller(build_retinanet(), teacher, [Term("binary_kd", "cls_logits")])
    Distiller(build_retinanet(), teacher, [Term("cwd", "features")])  # features still pair
    teacher = build_rcnn(anchor_sizes=(32, 64, 128, 256))
    with pytest.raises(ValueError, match=r"(?s)anchors differ.*roi_class_logits \(kl"):
        Distiller(build_rcnn(), teacher, [Term("binary_kd", "rpn_objectness")])
    Distiller(build_rcnn(), teacher, [Term("kl", "roi_class_logits")])  # RoIs pair through proposals


def test_other_construction_errors():
    with pytest.raises(ValueError, match="unknown levels"):
        Distiller(build_rcnn(), build_rcnn(), [Term("hint", "features", levels=["p9"])])
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        Distiller(build_retinanet(), build_retinanet(), [Term("binary_kd", "cls_logits", class_weights=torch.ones(2))])
    with pytest.raises(ValueError, match="class_weights has 3 entries"):
        Distiller(build_rcnn(), build_rcnn(), [Term("kl", "roi_class_logits", class_weights=torch.ones(3))])
    with pytest.raises(ValueError, match="unique"):
        Distiller(build_rcnn(), build_rcnn(), [Term("hint", "features"), Term("hint", "features")])
    with pytest.raises(ValueError, match="teacher-bounded regression needs ground-truth matches"):
        Distiller(build_fcos(), build_fcos(), [Term("teacher_bounded", "box_regression")])
    with pytest.raises(TypeError, match="cannot tap a Linear"):
        Distiller(nn.Linear(2, 2), build_rcnn(), [])


# --- connectors ----------------------------------------------------------------------------
def test_connectors_bridge_channels_only_where_the_loss_needs_it_and_train():
    distiller = Distiller(build_rcnn(fpn_width=16), build_rcnn(fpn_width=32), [Term("pkd", "features"), Term("attention", "features")])
    convs = {k: type(c.project).__name__ for k, c in distiller.connectors.items()}
    assert all(v == "Conv2d" for k, v in convs.items() if k.startswith("features_pkd"))
    assert all(v == "Identity" for k, v in convs.items() if k.startswith("features_attention"))
    connector_ids = {id(p) for p in distiller.connectors.parameters()}
    assert connector_ids and connector_ids <= {id(p) for p in distiller.trainable_parameters()}


def test_student_batch_is_renormalized_for_a_teacher_with_other_statistics():
    student, teacher = build_rcnn(), build_rcnn()
    teacher.transform.image_mean, teacher.transform.image_std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    distiller = Distiller(student, teacher, [Term("hint", "features")])
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    student_batch, _ = student.transform(images)
    renormalized = distiller._renormalized(student_batch, distiller.teacher_adapters[0])
    teacher_batch, _ = teacher.eval().transform(images)
    assert torch.allclose(renormalized.tensors, teacher_batch.tensors, atol=1e-5)


def test_teacher_with_its_own_resizing_gets_rescaled_rois():
    student = DenseOutputs(image_sizes=[(64, 64), (64, 48)], batch_shape=(64, 64))
    student.roi_proposals = [torch.tensor([[0.0, 0.0, 32.0, 16.0]]), torch.tensor([[8.0, 8.0, 16.0, 32.0]])]
    moved = _rescaled_rois(student, [(96, 96), (128, 96)])
    assert torch.equal(moved.roi_proposals[0], torch.tensor([[0.0, 0.0, 48.0, 24.0]]))
    assert torch.equal(moved.roi_proposals[1], torch.tensor([[16.0, 16.0, 32.0, 64.0]]))
    assert student.roi_proposals[0][0, 2] == 32.0  # the student's own record is untouched

    teacher = build_rcnn(fpn_width=32)
    teacher.transform.min_size, teacher.transform.max_size = (96,), 96
    distiller = Distiller(build_rcnn(), teacher, [Term("kl", "roi_class_logits"), Term("cwd", "features")], teacher_geometry="own")
    losses = distiller.train()(*make_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="teacher_geometry='student'"):
        Distiller(build_rcnn(), teacher, [Term("binary_kd", "rpn_objectness")], teacher_geometry="own")


# --- long tail -----------------------------------------------------------------------------
def test_class_weights_and_class_temperatures_flow_into_every_kind_of_term():
    weights = class_weights([1000, 100, 10, 2], method="sqrt_inverse")
    terms = [
        Term("binary_kd", "cls_logits", temperature=2.0, class_weights=weights, class_temperature_spread=0.5),
        Term("giou", "box_regression", class_weights=weights),
        Term("masked_imitation", "features", class_weights=weights),
    ]
    distiller = Distiller(build_retinanet(fpn_width=32), build_retinanet(fpn_width=64), terms).train()
    losses = distiller(*make_batch(num_images=3))
    assert all(torch.isfinite(v) and v >= 0 for v in _kd(losses).values())
    # A head trained on labels 1..K has K + 1 channels (torchvision puts label k on channel k).
    label_indexed = [Term("binary_kd", "cls_logits", class_weights=weights[1:], class_temperature_spread=0.5)]
    distiller = Distiller(build_retinanet(fpn_width=32), build_retinanet(fpn_width=64), label_indexed).train()
    assert torch.isfinite(distiller(*make_batch())["kd_cls_logits_binary_kd"])
    terms = [
        Term("kl", "roi_class_logits", temperature=3.0, class_weights=weights, class_temperature_spread=1.0),
        Term("dkd", "roi_class_logits", class_weights=weights),
        Term("teacher_bounded", "roi_box_regression", class_weights=weights),
        Term("binary_kd", "mask_logits", class_weights=weights, class_temperature_spread=1.0, temperature=2.0),
    ]
    distiller = Distiller(build_rcnn(mask=True), build_rcnn(mask=True, fpn_width=64), terms).train()
    losses = distiller(*make_batch(num_images=3))
    assert all(torch.isfinite(v) and v >= 0 for v in _kd(losses).values())


# --- several teachers --------------------------------------------------------------------------
def test_fused_teacher_probabilities_are_the_weighted_average():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    fused = fuse_teacher_logits([a, b], [0.25, 0.75], 2.0, sigmoid=False)
    expected = 0.25 * torch.softmax(a / 2, -1) + 0.75 * torch.softmax(b / 2, -1)
    assert torch.allclose(torch.softmax(fused / 2, -1), expected, atol=1e-6)
    fused = fuse_teacher_logits([a, b], [0.5, 0.5], 3.0, sigmoid=True)
    assert torch.allclose(torch.sigmoid(fused / 3), (torch.sigmoid(a / 3) + torch.sigmoid(b / 3)) / 2, atol=1e-5)


def test_two_copies_of_one_teacher_distil_like_that_teacher():
    student, teacher = build_retinanet(), build_retinanet(fpn_width=64)
    terms = [Term("binary_kd", "cls_logits", temperature=2.0), Term("cwd", "features"), Term("delta_l1", "box_regression")]
    single = Distiller(copy.deepcopy(student), teacher, copy.deepcopy(terms)).train()
    double = Distiller(copy.deepcopy(student), [teacher, copy.deepcopy(teacher)], copy.deepcopy(terms), teacher_weights=[1, 3]).train()
    single_connectors = single.connectors.state_dict()
    both = {**single_connectors, **{k.replace("teacher0", "teacher1"): v for k, v in single_connectors.items()}}
    double.connectors.load_state_dict(both)  # both teachers' connectors start as the single one's
    images, targets = make_batch()
    one, two = _kd(single(images, targets)), _kd(double(images, targets))
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-6), key


# --- self-distillation ---------------------------------------------------------------------------
def test_ema_teacher_copies_the_student_in_the_warm_up_then_averages_with_a_ramped_decay():
    student = build_retinanet()
    distiller = Distiller.self_distillation(student, [Term("binary_kd", "cls_logits")], mode="ema", ema_decay=0.5, warmup_iters=2)
    distiller.train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    images, targets = make_batch()
    decays = []
    for step in range(12):
        teacher_before = distiller.teachers[0].head.classification_head.cls_logits.weight.clone()
        student_now = student.head.classification_head.cls_logits.weight.detach().clone()
        losses = distiller(images, targets)
        teacher_after = distiller.teachers[0].head.classification_head.cls_logits.weight
        # warm-up: a copy of the student; then min(0.5, (1 + n) / (10 + n)) after n distilled steps
        decay = 0.0 if step < 2 else min(0.5, (1 + step - 2) / (10 + step - 2))
        assert torch.allclose(teacher_after, decay * teacher_before + (1 - decay) * student_now, atol=1e-6), step
        decays.append(decay)
        kd = losses["kd_cls_logits_binary_kd"]
        if step < 2:
            assert kd == 0, (step, kd)  # no distillation in the warm-up
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert int(distiller.iteration) == 12
    assert kd > 0, kd  # the averaged teacher now differs from the student, and is distilled
    assert decays[:3] == [0.0, 0.0, 0.1] and decays[-1] == 0.5  # the ramp reached ema_decay


def test_snapshot_teacher_is_taken_when_the_warm_up_ends():
    student = build_fcos()
    distiller = Distiller.self_distillation(student, [Term("binary_kd", "cls_logits")], mode="snapshot", warmup_iters=1).train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    images, targets = make_batch()
    for _ in range(2):
        losses = distiller(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    snapshot = distiller.teachers[0].head.classification_head.cls_logits.weight
    assert not torch.equal(snapshot, student.head.classification_head.cls_logits.weight)
    distiller(images, targets)  # no further snapshot after the warm-up
    assert torch.equal(snapshot, distiller.teachers[0].head.classification_head.cls_logits.weight)


def test_schedules_change_weight_and_temperature_over_iterations():
    term = Term("binary_kd", "cls_logits", weight={"kind": "linear", "start_value": 0.0, "end_value": 1.0, "start_iter": 0, "end_iter": 4},
                temperature={"kind": "step", "values": [4.0, 2.0], "milestones": [2]})
    assert [term.weight_at(i) for i in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert [term.temperature_at(i) for i in (0, 1, 2)] == [4.0, 4.0, 2.0]
    distiller = Distiller(build_retinanet(), build_retinanet(fpn_width=64), [term]).train()
    images, targets = make_batch()
    assert distiller(images, targets)["kd_cls_logits_binary_kd"] == 0
    distiller(images, targets)
    assert distiller.last_terms["kd_cls_logits_binary_kd"]["weight"] == 0.25


# --- DistributedDataParallel -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distiller_trains_under_distributed_data_parallel():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        teacher = build_rcnn(fpn_width=32)
        distiller = Distiller(build_rcnn(fpn_width=16), teacher, [Term("kl", "roi_class_logits"), Term("cwd", "features")])
        wrapped = nn.parallel.DistributedDataParallel(distiller.train())
        losses = wrapped(*make_batch())
        sum(losses.values()).backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None for p in distiller.connectors.parameters())
        assert {k for k in losses if k.startswith("kd_")} == {"kd_roi_class_logits_kl", "kd_features_cwd"}
    finally:
        dist.destroy_process_group()
