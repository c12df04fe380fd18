"""SegmentationDistiller: frozen teachers, zero loss for an identical teacher, terms equal to
hand computations on the recorded logits, connectors across channels and strides, one step per
family, several teachers, self-distillation, YAML terms and construction-time errors."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from tiny_segmenters import (
    BUILDERS,
    IGNORE,
    NUM_CLASSES,
    build_deeplabv3_mobilenet,
    build_fcn,
    build_lraspp,
    deterministic,
    make_batch,
    opinionated,
)

from densekd import Distiller, SegmentationDistiller, Term, class_weights, segmentation_class_counts
from densekd.core.outputs import SegmentationOutputs
from densekd.core.weighting import per_class_temperature
from densekd.experiment.config import build_terms, distiller_kwargs, load_distillation_config
from densekd.losses import pixel_kl_kd
from densekd.segmentation.pairs import SegmentationStepContext, fuse_over_positions, segmentation_term_loss


def _kd(losses):
    return {k: v for k, v in losses.items() if k.startswith("kd_")}


ZERO_WHEN_EQUAL_TERMS = [
    Term("pixel_kl", "seg_logits", temperature=2.0),
    Term("cwd", "seg_logits"),
    Term("focal_kl", "seg_logits"),
    Term("margin", "seg_logits"),
    Term("dkd", "seg_logits"),
    Term("pixel_kl", "aux_logits"),
    Term("hint", "features"),
    Term("cwd", "features"),
    Term("pkd", "features"),
    Term("attention", "features"),
    Term("relation", "features"),
    Term("pairwise_affinity", "features"),
]


def test_identical_teacher_gives_zero_for_every_segmentation_term():
    student = build_fcn()
    distiller = SegmentationDistiller(student, copy.deepcopy(student), copy.deepcopy(ZERO_WHEN_EQUAL_TERMS)).train()
    deterministic(student)
    losses = distiller(*make_batch())
    kd = {k: v.item() for k, v in _kd(losses).items()}
    assert len(kd) == len(ZERO_WHEN_EQUAL_TERMS)
    assert all(abs(v) < 1e-5 for v in kd.values()), kd
    assert {"loss_seg", "loss_aux"} <= set(losses)


def test_pixel_term_equals_a_hand_computation_with_void_class_weights_and_temperatures():
    student, teacher = build_lraspp(), opinionated(build_deeplabv3_mobilenet())
    images, masks = make_batch()
    weights = class_weights(segmentation_class_counts(masks, NUM_CLASSES), method="inverse")
    term = Term("pixel_kl", "seg_logits", temperature=2.0, class_weights=weights, class_temperature_spread=1.0)
    distiller = SegmentationDistiller(student, teacher, [term], logit_resolution="input").train()  # at 64 x 64
    recorded = {}
    student.register_forward_hook(lambda module, args, output: recorded.update(output))
    distiller(images, masks)
    with torch.no_grad():
        teacher_logits = teacher(images)["out"]
    valid = masks != IGNORE
    labels = masks.clamp(max=NUM_CLASSES - 1)
    temperature = torch.where(valid, per_class_temperature(weights, 2.0, spread=1.0)[labels], torch.tensor(2.0))
    # per pixel: T_p^2 KL(softmax(t / T_p) || softmax(s / T_p)), weighted by its class, void pixels out
    log_p_s = F.log_softmax(recorded["out"].detach() / temperature[:, None], dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature[:, None], dim=1)
    per_pixel = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature**2  # (N, H, W)
    pixel_weights = weights[labels] * valid
    expected = (per_pixel * pixel_weights).sum() / pixel_weights.sum()
    assert torch.allclose(distiller.last_terms["kd_seg_logits_pixel_kl"]["unscaled"], expected, rtol=1e-4)


def test_teacher_logits_of_another_resolution_are_aligned_to_the_students():
    student_logits, teacher_logits = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)
    masks = torch.randint(0, 3, (2, 16, 16))
    masks[:, 0] = IGNORE
    student = SegmentationOutputs(seg_logits=student_logits, masks=masks)
    context = SegmentationStepContext(student, [SegmentationOutputs(seg_logits=teacher_logits)], [1.0], None, {}, 0, IGNORE)
    aligned = F.interpolate(teacher_logits, size=(16, 16), mode="bilinear", align_corners=False)
    got = segmentation_term_loss(Term("pixel_kl", "seg_logits", temperature=2.0), context)
    assert torch.allclose(got, pixel_kl_kd(student_logits, aligned, 2.0, ignore=masks == IGNORE))


def test_gradients_reach_the_student_and_connectors_only_across_channels_and_strides():
    teacher, student = build_fcn(), build_lraspp()  # ResNet strides 16/32 vs MobileNet 8/16
    terms = [Term("hint", "features"), Term("attention", "features"), Term("pixel_kl", "seg_logits")]
    distiller = SegmentationDistiller(student, teacher, terms).train()
    assert distiller.level_pairs["features_hint"] == [[("low", "aux"), ("high", "out")]]
    projections = {k: type(c.project).__name__ for k, c in distiller.connectors.items()}
    assert all(v == "Conv2d" for k, v in projections.items() if k.startswith("features_hint"))
    assert all(v == "Identity" for k, v in projections.items() if k.startswith("features_attention"))
    running_mean = teacher.backbone.bn1.running_mean.clone()
    sum(distiller(*make_batch()).values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.equal(teacher.backbone.bn1.running_mean, running_mean) and not teacher.training
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.connectors.parameters())
    assert student.classifier.low_classifier.weight.grad.abs().sum() > 0


def test_feature_only_terms_stop_the_teacher_after_its_backbone():
    teacher = build_fcn()
    calls = []
    for name in ("backbone", "classifier", "aux_classifier"):
        getattr(teacher, name).register_forward_hook(lambda *args, n=name: calls.append(n))
    distiller = SegmentationDistiller(build_lraspp(), teacher, [Term("cwd", "features"), Term("pairwise_affinity", "features")])
    calls.clear()  # the construction-time dry run used the backbone
    distiller.train()(*make_batch())
    assert calls == ["backbone"]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_distillation_steps_lower_kd_loss_and_keep_student_plain(family):
    teacher = opinionated(build_fcn())
    student = BUILDERS[family]()
    terms = [Term("pixel_kl", "seg_logits", temperature=2.0), Term("hint", "features", weight=0.1)]
    if family in ("fcn", "deeplabv3_mobilenet"):
        terms.append(Term("pixel_kl", "aux_logits"))
    distiller = SegmentationDistiller(student, teacher, terms).train()
    deterministic(student)  # a fixed function of the weights: the kd loss must fall
    teacher_before = copy.deepcopy(teacher.state_dict())
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-3)
    images, masks = make_batch()

    def kd_loss():
        losses = distiller(images, masks)
        return sum(_kd(losses).values()), losses

    first, losses = kd_loss()
    assert set(losses) >= {"loss_seg", *(t.key for t in terms)}
    for _ in range(3):
        loss, _ = kd_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last, _ = kd_loss()
    assert last.item() < first.item(), (first.item(), last.item())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    fresh = BUILDERS[family]()
    fresh.load_state_dict(distiller.student.state_dict(), strict=True)
    assert type(distiller.student) is type(fresh) and int(distiller.iteration) == 5


# --- several teachers --------------------------------------------------------------------------
def test_two_copies_of_one_teacher_distil_like_that_teacher():
    student, teacher = build_lraspp(), opinionated(build_deeplabv3_mobilenet())
    terms = [
        Term("pixel_kl", "seg_logits", temperature=2.0),
        Term("cwd", "seg_logits", temperature=3.0),
        Term("dkd", "seg_logits", temperature=2.0),
        Term("hint", "features"),
    ]
    single = SegmentationDistiller(copy.deepcopy(student), teacher, copy.deepcopy(terms)).train()
    double = SegmentationDistiller(
        copy.deepcopy(student), [teacher, copy.deepcopy(teacher)], copy.deepcopy(terms), teacher_weights=[1, 3]
    ).train()
    connectors = single.connectors.state_dict()
    double.connectors.load_state_dict({**connectors, **{k.replace("teacher0", "teacher1"): v for k, v in connectors.items()}})
    for distiller in (single, double):
        deterministic(distiller.student)
    images, masks = make_batch()
    one, two = _kd(single(images, masks)), _kd(double(images, masks))
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-6), key


def test_fused_positions_average_each_teachers_distribution_over_kept_pixels():
    a, b = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    keep = torch.rand(1, 3, 3) > 0.3
    fused = fuse_over_positions([a, b], [0.25, 0.75], 2.0, keep)

    def kept_softmax(z):  # (1, 2, 3, 3) -> (2, kept) distributions over the kept positions
        return torch.softmax(z[0][:, keep[0]] / 2.0, dim=-1)

    assert torch.allclose(kept_softmax(fused), 0.25 * kept_softmax(a) + 0.75 * kept_softmax(b), atol=1e-6)


# --- self-distillation and warm-up ---------------------------------------------------------------
def test_ema_teacher_tracks_the_student_and_warm_up_skips_distillation():
    student = build_lraspp()
    distiller = Distiller.self_distillation(student, [Term("pixel_kl", "seg_logits")], mode="ema", ema_decay=0.5, warmup_iters=1)
    assert isinstance(distiller, SegmentationDistiller)
    distiller.train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    images, masks = make_batch()
    for step in range(2):
        teacher_before = distiller.teachers[0].classifier.high_classifier.weight.clone()
        student_now = student.classifier.high_classifier.weight.detach().clone()
        losses = distiller(images, masks)
        teacher_after = distiller.teachers[0].classifier.high_classifier.weight
        decay = 0.0 if step == 0 else 0.1  # a copy in the warm-up, then the ramp's first decay
        assert torch.allclose(teacher_after, decay * teacher_before + (1 - decay) * student_now, atol=1e-6)
        kd = losses["kd_seg_logits_pixel_kl"]
        assert (kd == 0) if step == 0 else (kd > 0), (step, kd)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert int(distiller.iteration) == 2 and "iteration" in distiller.state_dict()


def test_snapshot_teacher_is_taken_when_the_warm_up_ends():
    distiller = SegmentationDistiller.self_distillation(build_lraspp(), [Term("cwd", "seg_logits")], mode="snapshot", warmup_iters=1)
    distiller.train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.5)
    images, masks = make_batch()
    weight = lambda model: model.classifier.high_classifier.weight
    sum(distiller(images, masks).values()).backward()
    optimizer.step()
    distiller(images, masks)  # iteration 1 == warm-up: the snapshot of the trained student
    assert torch.equal(weight(distiller.teachers[0]), weight(distiller.student))
    optimizer.step()
    distiller(images, masks)
    assert not torch.equal(weight(distiller.teachers[0]), weight(distiller.student))


# --- API: dispatch, copies, evaluation, YAML -----------------------------------------------------------
def test_distiller_dispatches_segmentation_models_and_copies_survive():
    student = build_lraspp()
    distiller = Distiller(student, build_lraspp(), [Term("pixel_kl", "seg_logits")], teacher_geometry="student", probe_size=64)
    assert type(distiller) is SegmentationDistiller and distiller.student is student
    for clone in (copy.deepcopy(distiller), pickle.loads(pickle.dumps(distiller))):
        assert type(clone) is SegmentationDistiller
        assert torch.isfinite(clone.train()(*make_batch())["kd_seg_logits_pixel_kl"])
    images, _ = make_batch()
    with torch.no_grad():
        assert torch.equal(distiller.eval()(images)["out"], student(images)["out"])
    # Distiller's positional order (teacher_geometry before warmup_iters); segmentation keywords pass through
    distiller = Distiller(student, build_lraspp(), [], None, "student", 7, aux_weight=0.25, ignore_index=0)
    assert (distiller.warmup_iters, distiller.aux_weight, distiller.ignore_index) == (7, 0.25, 0)


def test_segmentation_terms_from_yaml_build_and_run(tmp_path):
    path = tmp_path / "seg_terms.yaml"
    path.write_text(
        "warmup_iters: 0\n"
        "terms:\n"
        "  - {loss: pixel_kl, on: seg_logits, temperature: 2.0, class_weights: {method: sqrt_inverse}}\n"
        "  - {loss: cwd, on: seg_logits, weight: 0.5}\n"
        "  - {loss: pairwise_affinity, on: features, levels: [high], params: {scale: 0.5}}\n"
    )
    config = load_distillation_config(path)
    images, masks = make_batch()
    pixels = segmentation_class_counts(masks, NUM_CLASSES, by="pixels")
    terms = build_terms(config, image_counts=segmentation_class_counts(masks, NUM_CLASSES, by="images"), annotation_counts=pixels)
    distiller = SegmentationDistiller(build_lraspp(), build_deeplabv3_mobilenet(), terms, **distiller_kwargs(config))
    losses = distiller.train()(images, masks)
    assert set(_kd(losses)) == {"kd_seg_logits_pixel_kl", "kd_seg_logits_cwd", "kd_features_pairwise_affinity"}
    assert all(torch.isfinite(v) for v in losses.values())


# --- construction-time errors --------------------------------------------------------------------
def test_invalid_output_pairs_and_missing_heads_are_named():
    with pytest.raises(ValueError, match=r"does not apply to output 'seg_logits'; valid losses there: pixel_kl, cwd"):
        Term("binary_kd", "seg_logits")
    with pytest.raises(ValueError, match=r"does not apply to output 'cls_logits'"):
        Term("pixel_kl", "cls_logits")
    with pytest.raises(ValueError, match=r"distills 'aux_logits', which the student \(LRASPP\).*aux_loss=True"):
        SegmentationDistiller(build_lraspp(), build_fcn(), [Term("pixel_kl", "aux_logits")])
    with pytest.raises(ValueError, match=r"which the teacher 0 \(DeepLabV3\) does not produce"):
        SegmentationDistiller(build_fcn(), build_deeplabv3_mobilenet(aux=False), [Term("pixel_kl", "aux_logits")])
    with pytest.raises(ValueError, match=r"distills 'cls_logits', which the student \(FCN\) does not produce"):
        SegmentationDistiller(build_fcn(), build_fcn(), [Term("binary_kd", "cls_logits")])


def test_other_construction_errors():
    student = build_lraspp()
    with pytest.raises(ValueError, match=r"predicts 6 classes and the student 4"):
        SegmentationDistiller(student, build_lraspp(num_classes=6), [Term("pixel_kl", "seg_logits")])
    SegmentationDistiller(student, build_lraspp(num_classes=6), [Term("hint", "features")])  # features still pair
    with pytest.raises(ValueError, match=r"class_weights has 3 entries; the student predicts 4 classes \(labels 0\.\.3\)"):
        SegmentationDistiller(student, build_lraspp(), [Term("pixel_kl", "seg_logits", class_weights=torch.ones(3))])
    with pytest.raises(ValueError, match="'masked_imitation' needs ground-truth boxes"):
        SegmentationDistiller(student, build_lraspp(), [Term("masked_imitation", "features")])
    with pytest.raises(ValueError, match="confidence_weighting .* applies to pixel-wise"):
        SegmentationDistiller(student, build_lraspp(), [Term("cwd", "seg_logits", confidence_weighting=True)])
    with pytest.raises(ValueError, match="teacher_geometry='student'"):
        SegmentationDistiller(student, build_lraspp(), [], teacher_geometry="own")
    with pytest.raises(TypeError, match="supported segmentation families"):
        SegmentationDistiller(student, torch.nn.Conv2d(3, 4, 1), [])
    with pytest.raises(ValueError, match=r"cannot pair student level 'low'.*'low' with 'aux'"):
        SegmentationDistiller(student, build_deeplabv3_mobilenet(aux=False), [Term("hint", "features")])
    SegmentationDistiller(student, build_deeplabv3_mobilenet(aux=False), [Term("hint", "features", levels=["high"])])
    with pytest.raises(ValueError, match="at least one teacher"):
        SegmentationDistiller(student, [], [])


def test_a_wrapped_segmentation_student_is_refused_with_the_fix():
    fix = r"wrapped in DataParallel; pass the plain FCN.*wrap the distiller instead, e\.g\. model = DistributedDataParallel\(distiller\)"
    for build in (Distiller, SegmentationDistiller):
        with pytest.raises(ValueError, match=fix):
            build(torch.nn.DataParallel(build_fcn()), build_fcn(), [Term("pixel_kl", "seg_logits")])
