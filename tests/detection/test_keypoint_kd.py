"""Keypoint R-CNN: its keypoint heatmaps are tapped on the student's positive RoIs, the teacher's
keypoint head is re-run on exactly those RoIs (one to one), and `spatial_kl` distils them."""
import copy

import pytest
import torch
from assertions import assert_same
from tiny_detectors import NUM_KEYPOINTS, build_keypoint_rcnn, build_rcnn, make_keypoint_batch
from torchvision.ops import box_iou

from densekd import Distiller, Tap, Term, adapter_for
from densekd.detection.adapters import RCNNAdapter
from densekd.detection.teacher_cache import offline_blockers

HEATMAP = 56  # torchvision's keypoint heatmap side: 14 px RoI pool, x2 deconvolution, x2 upsampling
TERM = Term("spatial_kl", "keypoint_logits", temperature=2.0)


def _run(model, images, targets, tapped: bool, seed: int = 3):
    torch.manual_seed(seed)  # RoI sampling is random: replay the same draws
    if not tapped:
        return model(images, targets)
    adapter = adapter_for(model)
    with Tap(model, outputs=adapter.tap_outputs(), inputs=adapter.tap_inputs()) as tap:
        result = model(images, targets)
        assert "roi_heads.keypoint_roi_pool:inputs" in tap.read()
    return result


def test_keypoint_rcnn_takes_the_rcnn_path_and_provides_keypoint_logits():
    adapter = adapter_for(build_keypoint_rcnn())
    assert isinstance(adapter, RCNNAdapter) and "keypoint_logits" in adapter.provides
    assert {"roi_class_logits", "rpn_objectness", "features"} <= adapter.provides
    assert "keypoint_logits" not in adapter_for(build_rcnn(mask=True)).provides


def test_tapped_equals_untapped_in_training_and_evaluation():
    model = build_keypoint_rcnn()
    images, targets = make_keypoint_batch(num_images=3)
    model.train()
    assert_same(_run(model, images, targets, tapped=True), _run(model, images, targets, tapped=False))
    model.eval()
    with torch.no_grad():
        assert_same(_run(model, images, None, tapped=True), _run(model, images, None, tapped=False))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"


def test_teacher_heatmaps_pair_one_to_one_with_the_students_positive_rois():
    student = build_keypoint_rcnn().train()
    teacher = copy.deepcopy(student).eval()
    adapter, teacher_adapter = adapter_for(student), adapter_for(teacher)
    images, targets = make_keypoint_batch(num_images=3)
    with Tap(student, outputs=adapter.tap_outputs(), inputs=adapter.tap_inputs()) as tap:
        student(images, targets)
        records = tap.read()
    outputs = adapter.collect(records)

    # the keypoint head saw the positive sampled RoIs, image by image, in order
    _, labels = adapter.assign_rois(outputs.roi_proposals, outputs.gt_boxes, outputs.gt_labels)
    positives = [rois[image_labels > 0] for rois, image_labels in zip(outputs.roi_proposals, labels)]
    assert_same(outputs.keypoint_proposals, positives)
    num_positive = sum(len(p) for p in positives)
    assert num_positive > 0 and len(positives[2]) == 0  # the third image has no boxes
    assert outputs.keypoint_logits.shape == (num_positive, NUM_KEYPOINTS, HEATMAP, HEATMAP)
    assert [k.shape for k in outputs.gt_keypoints] == [(2, NUM_KEYPOINTS, 3)] * 2 + [(0, NUM_KEYPOINTS, 3)]

    with torch.no_grad():
        paired = teacher_adapter.run(records["transform"][0], {"keypoint_logits"}, outputs)
    assert paired.keypoint_proposals is outputs.keypoint_proposals
    assert paired.keypoint_logits.shape == outputs.keypoint_logits.shape  # one teacher map per student map
    assert torch.allclose(paired.keypoint_logits, outputs.keypoint_logits, atol=1e-6)  # teacher == student


def test_identical_teacher_gives_exactly_zero_keypoint_kd():
    student = build_keypoint_rcnn()
    distiller = Distiller(student, copy.deepcopy(student), [copy.deepcopy(TERM)]).train()
    distiller(*make_keypoint_batch())
    assert distiller.last_terms[TERM.key]["unscaled"].item() == 0.0


def test_keypoint_kd_equals_a_hand_computation_on_the_recorded_rois():
    student = build_keypoint_rcnn()
    teacher = copy.deepcopy(student)  # same backbone and RoIs, a different keypoint predictor
    with torch.no_grad():
        for parameter in teacher.roi_heads.keypoint_predictor.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    every = Term("spatial_kl", "keypoint_logits", temperature=2.0, name="every")
    visible = Term("spatial_kl", "keypoint_logits", temperature=2.0, params={"visible_only": True}, name="visible")
    distiller = Distiller(student, teacher, [every, visible]).train()
    recorded = {}
    heads = student.roi_heads
    heads.keypoint_roi_pool.register_forward_pre_hook(lambda module, args: recorded.update(rois=args[1]))
    heads.keypoint_predictor.register_forward_hook(lambda module, args, output: recorded.update(logits=output.detach()))
    images, targets = make_keypoint_batch()
    distiller(images, targets)

    rois = recorded["rois"]  # per image (P_i, 4), the positive RoIs the student's keypoint head pooled
    with torch.no_grad():
        batch, _ = teacher.transform(images)  # 64 px images: no resize
        pooled = teacher.roi_heads.keypoint_roi_pool(teacher.backbone(batch.tensors), rois, batch.image_sizes)
        teacher_logits = teacher.roi_heads.keypoint_predictor(teacher.roi_heads.keypoint_head(pooled))
    # visible: the matched GT box's keypoint is labelled (v > 0) and its 56 x 56 cell lies in the RoI
    shown = []
    for target, image_rois in zip(targets, rois):
        keypoints = target["keypoints"][box_iou(target["boxes"], image_rois).argmax(dim=0)]  # (P_i, K_kp, 3)
        origin, side = image_rois[:, None, :2], image_rois[:, None, 2:] - image_rois[:, None, :2]  # (P_i, 1, 2)
        cell = ((keypoints[..., :2] - origin) * HEATMAP / side).floor()  # (P_i, K_kp, 2)
        shown.append((keypoints[..., 2] > 0) & ((cell >= 0) & (cell < HEATMAP)).all(dim=-1))
    shown = torch.cat(shown)  # (P, K_kp)
    T = 2.0
    log_p_s = torch.log_softmax(recorded["logits"].flatten(2) / T, dim=-1)  # (P, K_kp, 56 * 56)
    log_p_t = torch.log_softmax(teacher_logits.flatten(2) / T, dim=-1)
    per_map = T**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # (P, K_kp)
    assert teacher_logits.shape == recorded["logits"].shape and 0 < shown.sum() < shown.numel()
    terms = distiller.last_terms
    assert torch.allclose(terms["kd_every"]["unscaled"], per_map.mean(), rtol=1e-4)
    assert torch.allclose(terms["kd_visible"]["unscaled"], per_map[shown].mean(), rtol=1e-4)


def test_one_distillation_step_with_a_keypoint_and_a_box_term():
    student = build_keypoint_rcnn()
    teacher = build_keypoint_rcnn(fpn_width=48, head_width=48)  # a wider teacher
    terms = [
        Term("spatial_kl", "keypoint_logits", temperature=2.0, params={"visible_only": True}),
        Term("delta_l1", "roi_box_regression"),
    ]
    distiller = Distiller(student, teacher, terms).train()
    before = {k: v.clone() for k, v in student.roi_heads.keypoint_predictor.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    losses = distiller(*make_keypoint_batch(num_images=3))
    assert {"loss_keypoint", "kd_keypoint_logits_spatial_kl", "kd_roi_box_regression_delta_l1"} <= losses.keys()
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["kd_keypoint_logits_spatial_kl"].item() > 0
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    after = student.roi_heads.keypoint_predictor.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_keypoint_terms_are_refused_without_a_matching_keypoint_head():
    student = build_keypoint_rcnn()
    with pytest.raises(ValueError, match=r"which the teacher 0 \(FasterRCNN\) does not produce.*need a KeypointRCNN"):
        Distiller(student, build_rcnn(), [copy.deepcopy(TERM)])
    with pytest.raises(ValueError, match=r"which the student \(MaskRCNN\) does not produce.*need a KeypointRCNN"):
        Distiller(build_rcnn(mask=True), student, [copy.deepcopy(TERM)])
    with pytest.raises(ValueError, match=r"\(keypoints, keypoint RoI pool size\) is \(5, \(14, 14\)\) for teacher 0"):
        Distiller(student, build_keypoint_rcnn(num_keypoints=5), [copy.deepcopy(TERM)])
    with pytest.raises(ValueError, match="valid losses there: spatial_kl"):
        Term("kl", "keypoint_logits")
    with pytest.raises(ValueError, match="takes no parameter 'visible'"):
        Term("spatial_kl", "keypoint_logits", params={"visible": True})
    distiller = Distiller(student, copy.deepcopy(student), [copy.deepcopy(TERM)])
    assert any("keypoint_logits" in blocker for blocker in offline_blockers(distiller))  # RoI-level: not cacheable
