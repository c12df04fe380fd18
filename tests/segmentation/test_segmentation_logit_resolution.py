"""Segmentation logit terms at the head's own resolution (``logit_resolution="head"``): the
logits are the classifiers' outputs before torchvision's upsampling, the masks are sampled at
each head cell's centre pixel, a term equals a hand computation there, the model's own loss is
torchvision's on the upsampled logits, and ``"input"`` mode reproduces densekd's values from
before the option existed."""
import copy

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
from torchvision.models.segmentation import LRASPP

from densekd import (
    SegmentationAdapter,
    SegmentationDistiller,
    Tap,
    Term,
    class_weights,
    segmentation_class_counts,
)
from densekd.core.outputs import SegmentationOutputs
from densekd.core.weighting import per_class_temperature
from densekd.experiment import config as experiment_config
from densekd.experiment.config import (
    ConfigError,
    distiller_kwargs,
    parse_distillation_config,
)
from densekd.losses import pixel_kl_kd
from densekd.segmentation.adapter import LOGIT_RESOLUTIONS
from densekd.segmentation.pairs import (
    SegmentationStepContext,
    masks_at,
    segmentation_term_loss,
)

# (N, K, h, w) of "out" and "aux" on 64 px images: ResNet-10 "out" at stride 32, "aux" at 16;
# MobileNetV3 "out"/"high" at 16, "aux"/"low" at 8; LRASPP's head answers at its "low" level.
HEAD_SIZES = {
    "fcn": {"out": (2, 2), "aux": (4, 4)},
    "deeplabv3": {"out": (2, 2)},
    "deeplabv3_mobilenet": {"out": (4, 4), "aux": (8, 8)},
    "lraspp": {"out": (8, 8)},
}


def _classifier_outputs(model, images):
    """{"out", "aux"}: the plain, untapped model's classifiers on its backbone, in its forward's
    order, without the upsampling."""
    features = model.backbone(images)
    outputs = {"out": model.classifier(features if isinstance(model, LRASPP) else features["out"])}
    if getattr(model, "aux_classifier", None) is not None:
        outputs["aux"] = model.aux_classifier(features["aux"])
    return outputs


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_head_logits_are_the_classifier_outputs_before_the_upsampling(family):
    model = BUILDERS[family]()
    images, masks = make_batch()
    adapter = SegmentationAdapter(model, logit_resolution="head")
    names = {"out": "seg_logits", "aux": "aux_logits"}
    # student side: recorded from the model's own (training) forward, dropout draws replayed
    model.train()
    torch.manual_seed(3)
    with Tap(model, outputs=adapter.tap_outputs()) as tap:
        result = model(images)
        recorded = adapter.collect(tap.read(), result, masks)
    torch.manual_seed(3)
    expected = _classifier_outputs(model, images)
    assert expected.keys() == result.keys()
    for key, logits in expected.items():
        head = getattr(recorded, names[key])
        assert head.shape == (2, NUM_CLASSES, *HEAD_SIZES[family][key])
        assert torch.equal(head, logits)
        # torchvision's upsampling is the only step between them and the forward's output
        assert torch.equal(F.interpolate(head, size=(64, 64), mode="bilinear", align_corners=False), result[key])
    # teacher side: driven by submodules, in eval mode
    model.eval()
    with torch.no_grad():
        expected = _classifier_outputs(model, images)
        driven = adapter.run(images, adapter.provides)
    for key, logits in expected.items():
        assert torch.equal(getattr(driven, names[key]), logits)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"


def test_input_mode_logits_stay_the_forwards_upsampled_outputs():
    model = build_fcn().eval()
    images, masks = make_batch()
    adapter = SegmentationAdapter(model, logit_resolution="input")
    with torch.no_grad(), Tap(model, outputs=adapter.tap_outputs()) as tap:
        result = model(images)
        recorded = adapter.collect(tap.read(), result, masks)
        driven = adapter.run(images, adapter.provides)
    for outputs in (recorded, driven):
        assert torch.equal(outputs.seg_logits, result["out"]) and torch.equal(outputs.aux_logits, result["aux"])


def test_masks_are_sampled_at_each_head_cells_centre_pixel():
    # 8 x 8 -> 2 x 2: each cell covers a 4 x 4 block; its centre pixel is (2, 2) within the block
    # (rows and columns ((2i + 1) * 8) // 4 = 2, 6), where torchvision's bilinear upsampling
    # (align_corners=False) puts the cell's logit.
    masks = torch.zeros(1, 8, 8, dtype=torch.int64)
    masks[0, 0, :] = IGNORE  # a void border on the top row: block (0, 0)'s corner, not its centre
    masks[0, :4, :4] = torch.where(masks[0, :4, :4] == IGNORE, IGNORE, 1)  # block (0, 0): class 1 below the border
    masks[0, 2, 4:] = IGNORE  # block (0, 1): a void boundary through its centre row
    masks[0, 6:8, 2:4] = 3  # block (1, 0): a small class (4 of 16 pixels) at its centre
    masks[0, 4:, 4:] = 2  # block (1, 1): all class 2
    assert torch.equal(masks_at(masks, (2, 2)), torch.tensor([[[1, IGNORE], [3, 2]]]))
    # (corner sampling, F.interpolate's "nearest", would ignore block (0, 0); a majority vote would
    # call block (1, 0) background)
    assert masks_at(masks, (8, 8)) is masks  # same size: the masks themselves
    # sizes that do not divide: 5 x 3 -> 2 x 2 picks rows (1, 3) and columns (0, 2)
    grid = torch.arange(15).reshape(1, 5, 3)
    assert torch.equal(masks_at(grid, (2, 2)), torch.tensor([[[3, 5], [9, 11]]]))
    # the same pixels as F.interpolate's "nearest-exact" (exact on class indices and 255 in float)
    generator = torch.Generator().manual_seed(0)
    for (height, width), size in [((64, 64), (8, 8)), ((64, 64), (2, 4)), ((97, 50), (13, 7)), ((96, 96), (12, 12))]:
        labels = torch.randint(0, 4, (2, height, width), generator=generator)
        labels[labels == 3] = IGNORE
        nearest_exact = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()
        assert torch.equal(masks_at(labels, size), nearest_exact), (height, width, size)


def test_pixel_term_at_head_resolution_equals_a_hand_computation():
    student, teacher = build_lraspp(), opinionated(build_deeplabv3_mobilenet())  # heads 8 x 8 and 4 x 4
    images, masks = make_batch()
    masks[:, :8, 8:16] = IGNORE  # covers the centre pixel (4, 12) of head cell (0, 1)
    weights = class_weights(segmentation_class_counts(masks, NUM_CLASSES), method="inverse")
    term = Term("pixel_kl", "seg_logits", temperature=2.0, class_weights=weights, class_temperature_spread=1.0)
    distiller = SegmentationDistiller(student, teacher, [term], logit_resolution="head").train()
    deterministic(student)
    recorded = []
    student.classifier.register_forward_hook(lambda module, args, output: recorded.append(output.detach()))
    losses = distiller(images, masks)
    with torch.no_grad():
        coarse = teacher.classifier(teacher.backbone(images)["out"])  # (2, 4, 4, 4)
        student_out = student(images)["out"]
    teacher_logits = F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)  # to the student's head
    student_logits = recorded[0]  # (2, 4, 8, 8)
    labels = masks[:, 4::8, 4::8]  # the centre pixel of every 8 x 8 block: rows and columns 4, 12, ..., 60
    valid = labels != IGNORE
    assert valid.sum() == 2 * 64 - 2 and (labels == 3).sum() == 2  # cell (0, 1) ignored; the rare class kept
    labels = labels.clamp(max=NUM_CLASSES - 1)
    temperature = torch.where(valid, per_class_temperature(weights, 2.0, spread=1.0)[labels], torch.tensor(2.0))
    log_p_s = F.log_softmax(student_logits / temperature[:, None], dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature[:, None], dim=1)
    per_cell = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature**2  # (2, 8, 8)
    cell_weights = weights[labels] * valid
    expected = (per_cell * cell_weights).sum() / cell_weights.sum()
    torch.testing.assert_close(distiller.last_terms["kd_seg_logits_pixel_kl"]["unscaled"], expected, rtol=1e-4, atol=0)
    # the model's own loss: torchvision's references, cross-entropy on the upsampled logits
    torch.testing.assert_close(losses["loss_seg"], F.cross_entropy(student_out, masks, ignore_index=IGNORE), rtol=1e-6, atol=0)


def test_own_losses_are_the_references_in_both_modes():
    images, masks = make_batch()
    student, teacher = deterministic(build_fcn()), build_fcn()
    with torch.no_grad():
        result = student(images)
    expected = {
        "loss_seg": F.cross_entropy(result["out"], masks, ignore_index=IGNORE),
        "loss_aux": 0.5 * F.cross_entropy(result["aux"], masks, ignore_index=IGNORE),
    }
    for mode in ("head", "input"):
        distiller = SegmentationDistiller(student, teacher, [Term("pixel_kl", "aux_logits")], logit_resolution=mode).train()
        deterministic(student)
        losses = distiller(images, masks)
        for key, value in expected.items():
            torch.testing.assert_close(losses[key], value, rtol=1e-6, atol=0, msg=f"{mode} {key}")


def test_finer_teacher_logits_are_resized_to_the_students_head_with_antialiasing():
    student_logits, teacher_logits = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 16, 16)
    masks = torch.randint(0, 3, (2, 16, 16))
    masks[:, 2] = IGNORE  # row 2: the centre row of the first row of head cells
    student = SegmentationOutputs(seg_logits=student_logits, masks=masks)
    context = SegmentationStepContext(student, [SegmentationOutputs(seg_logits=teacher_logits)], [1.0], None, {}, 0, IGNORE)
    aligned = F.interpolate(teacher_logits, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(context.teacher_logits("seg_logits")[0], aligned)
    labels = masks[:, 2::4, 2::4]  # centres: rows and columns 2, 6, 10, 14
    got = segmentation_term_loss(Term("pixel_kl", "seg_logits", temperature=2.0), context)
    torch.testing.assert_close(got, pixel_kl_kd(student_logits, aligned, 2.0, ignore=labels == IGNORE), rtol=1e-6, atol=0)
    assert bool((labels[:, 0] == IGNORE).all())


def test_identical_teacher_gives_zero_for_every_logit_term_at_head_resolution():
    student = build_fcn()  # "out" 2 x 2 and "aux" 4 x 4: each output gets masks of its own size
    terms = [
        Term("pixel_kl", "seg_logits", temperature=2.0),
        Term("cwd", "seg_logits"),
        Term("focal_kl", "seg_logits", confidence_weighting=True),
        Term("margin", "seg_logits"),
        Term("dkd", "seg_logits"),
        Term("pixel_kl", "aux_logits"),
        Term("cwd", "aux_logits"),
    ]
    distiller = SegmentationDistiller(student, copy.deepcopy(student), terms, logit_resolution="head").train()
    deterministic(student)
    losses = distiller(*make_batch())
    kd = {k: v.item() for k, v in losses.items() if k.startswith("kd_")}
    assert len(kd) == len(terms) and all(abs(v) < 1e-5 for v in kd.values()), kd


# Recorded with densekd at commit 928b49f (before logit_resolution existed: logits upsampled to
# the input size) by the same construction as below, torch 2.14.1 on CPU.
VALUES_BEFORE_THE_OPTION = {
    "loss_seg": 1.399521827697754,
    "loss_aux": 0.7088876962661743,
    "kd_seg_logits_pixel_kl": 0.001587495906278491,
    "kd_seg_logits_cwd": 0.0006093252450227737,
    "kd_seg_logits_dkd": 0.015188532881438732,
    "kd_seg_logits_focal_kl": 0.001054599299095571,
    "kd_seg_logits_margin": 0.09806900471448898,
    "kd_aux_logits_pixel_kl": 0.03892050310969353,
}


def test_input_mode_reproduces_the_values_from_before_the_option():
    torch.manual_seed(0)
    student, teacher = build_fcn(), opinionated(build_deeplabv3_mobilenet())
    images, masks = make_batch()
    weights = class_weights(segmentation_class_counts(masks, NUM_CLASSES), method="inverse")
    terms = [
        Term("pixel_kl", "seg_logits", temperature=2.0, class_weights=weights, class_temperature_spread=1.0),
        Term("cwd", "seg_logits", temperature=3.0, class_weights=weights),
        Term("dkd", "seg_logits", temperature=2.0),
        Term("focal_kl", "seg_logits", confidence_weighting=True),
        Term("margin", "seg_logits"),
        Term("pixel_kl", "aux_logits", temperature=2.0),
    ]
    distiller = SegmentationDistiller(student, teacher, terms, probe_size=64, logit_resolution="input").train()
    deterministic(student)
    losses = {k: v.item() for k, v in distiller(images, masks).items()}
    assert losses.keys() == VALUES_BEFORE_THE_OPTION.keys()
    for key, value in VALUES_BEFORE_THE_OPTION.items():
        assert losses[key] == pytest.approx(value, rel=1e-5, abs=0), key


def test_the_setting_from_python_and_yaml():
    student = build_lraspp()
    assert SegmentationDistiller(student, build_lraspp(), []).logit_resolution == "head"  # the default
    assert experiment_config._LOGIT_RESOLUTIONS == LOGIT_RESOLUTIONS  # the config checks the distiller's values
    with pytest.raises(ValueError, match=r"logit_resolution must be 'head' or 'input', got 'full'"):
        SegmentationDistiller(student, build_lraspp(), [], logit_resolution="full")
    config = parse_distillation_config({"logit_resolution": "input", "terms": []})
    distiller = SegmentationDistiller(student, build_lraspp(), [], **distiller_kwargs(config))
    assert distiller.logit_resolution == "input" and distiller.student_adapter.logit_resolution == "input"
    assert all(adapter.logit_resolution == "input" for adapter in distiller.teacher_adapters)
    assert "logit_resolution" not in distiller_kwargs(parse_distillation_config({"terms": []}))  # the distiller's default
    with pytest.raises(ConfigError, match=r"logit_resolution must be one of head, input, got 'Head'"):
        parse_distillation_config({"logit_resolution": "Head", "terms": []})
