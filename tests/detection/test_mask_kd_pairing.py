"""Mask-logit distillation pairs teacher and student RoIs one to one: per positive RoI, the
binary KD of its mask at the RoI's label channel, the teacher's mask head run on exactly the
RoIs the student's mask head pooled."""
import copy

import torch
from torchvision.ops import box_iou

from densekd import Distiller, Term
from tiny_detectors import build_rcnn, make_batch

TERM = Term("binary_kd", "mask_logits", temperature=2.0)


def test_identical_teacher_gives_exactly_zero_mask_kd():
    student = build_rcnn(mask=True)
    distiller = Distiller(student, copy.deepcopy(student), [copy.deepcopy(TERM)]).train()
    distiller(*make_batch())
    assert distiller.last_terms[TERM.key]["unscaled"].item() == 0.0


def test_mask_kd_equals_a_hand_computation_on_the_recorded_rois():
    student = build_rcnn(mask=True)
    teacher = copy.deepcopy(student)  # same backbone and RoIs, a different mask head
    with torch.no_grad():
        for parameter in teacher.roi_heads.mask_predictor.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    distiller = Distiller(student, teacher, [copy.deepcopy(TERM)]).train()
    recorded = {}
    heads = student.roi_heads
    heads.mask_roi_pool.register_forward_pre_hook(lambda module, args: recorded.update(rois=args[1]))
    heads.mask_predictor.register_forward_hook(lambda module, args, output: recorded.update(logits=output.detach()))
    images, targets = make_batch()
    distiller(images, targets)

    rois = recorded["rois"]  # per image (P_i, 4), the positive RoIs the student's mask head pooled
    # label of each positive RoI: that of the ground-truth box it overlaps most (64 px images: no resize)
    labels = torch.cat([t["labels"][box_iou(t["boxes"], r).argmax(dim=0)] for t, r in zip(targets, rois)])  # (P,)
    with torch.no_grad():
        batch, _ = teacher.transform(images)
        features = teacher.backbone(batch.tensors)
        pooled = teacher.roi_heads.mask_roi_pool(features, rois, batch.image_sizes)
        teacher_logits = teacher.roi_heads.mask_predictor(teacher.roi_heads.mask_head(pooled))  # (P, K + 1, M, M)
    rows = torch.arange(labels.numel())
    s, t = recorded["logits"][rows, labels] / 2.0, teacher_logits[rows, labels] / 2.0  # (P, M, M) at T = 2
    # KL(Bern(p) || Bern(q)) with p = sigmoid(t), q = sigmoid(s), in log-sigmoids (finite when saturated)
    p, log_sigmoid = torch.sigmoid(t), torch.nn.functional.logsigmoid
    bernoulli_kl = p * (log_sigmoid(t) - log_sigmoid(s)) + (1 - p) * (log_sigmoid(-t) - log_sigmoid(-s))
    expected = 2.0**2 * bernoulli_kl.mean()
    assert labels.numel() > 0 and teacher_logits.shape == recorded["logits"].shape
    assert torch.allclose(distiller.last_terms[TERM.key]["unscaled"], expected, rtol=1e-4)
