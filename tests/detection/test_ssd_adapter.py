"""SSD / SSDlite as student or teacher: taps change nothing, outputs have the documented shapes,
an identical teacher gives zero loss and no teacher gradient, feature terms pair with an FCOS
teacher by stride while per-anchor terms across families are refused, class weights follow the
K + 1 layout, one distillation step trains, and tools/train_det.py runs with an SSDlite student."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from densekd import Distiller, Tap, Term, adapter_for
from densekd.detection.models import build_detector, ssdlite_mobilenet_v3
from densekd.losses.logits import kl_div_kd
from tiny_detectors import IMAGE_SIZE, NUM_CLASSES, build_fcos, make_batch

REPO = Path(__file__).resolve().parents[2]


def tiny_ssd(width_mult: float = 0.25) -> nn.Module:
    # GroupNorm: a from-scratch MobileNetV3 under frozen or eval-mode BatchNorm (identity statistics)
    # shrinks its activations to ~1e-15, and train-mode BatchNorm differs from an eval-mode teacher copy.
    return ssdlite_mobilenet_v3(NUM_CLASSES, IMAGE_SIZE, width_mult=width_mult, norm_layer=lambda c: nn.GroupNorm(1, c))


def _collect(model, images, targets):
    adapter = adapter_for(model)
    with Tap(model, outputs=adapter.tap_outputs()) as tap:
        result = model(images, targets)
        return result, adapter.collect(tap.read())


def test_tapped_equals_untapped_and_the_driven_teacher_equals_the_tapped_head():
    model = tiny_ssd()
    images, targets = make_batch(num_images=3)
    model.train()
    losses, recorded = _collect(model, images, targets)
    untapped = model(images, targets)
    assert losses.keys() == untapped.keys() and all(torch.equal(losses[k], untapped[k]) for k in losses)
    model.eval()
    with torch.no_grad():
        detections, _ = _collect(model, images, None)
        for tapped, plain in zip(detections, model(images)):
            assert all(torch.equal(tapped[k], plain[k]) for k in plain)
        batch, _ = model.transform(images)
        driven = adapter_for(model).run(batch, {"anchor_class_logits"}, recorded)
    assert torch.allclose(driven.anchor_class_logits, recorded.anchor_class_logits, atol=1e-6)
    assert torch.allclose(driven.anchor_box_regression, recorded.anchor_box_regression, atol=1e-6)
    assert not any(m._forward_hooks for m in model.modules()), "hooks left behind"


def test_outputs_have_documented_shapes_and_the_teacher_computes_only_what_terms_need():
    model = tiny_ssd().train()
    images, targets = make_batch(num_images=3)
    _, out = _collect(model, images, targets)
    n, anchors_per_cell = 3, 6  # DefaultBoxGenerator([[2, 3]] * 6): 2 + 2 * 2 boxes per cell
    assert list(out.features) == ["0", "1", "2", "3", "4", "5"]
    num_anchors = sum(f.shape[-2] * f.shape[-1] for f in out.features.values()) * anchors_per_cell  # HWA
    assert out.anchor_class_logits.shape == (n, num_anchors, NUM_CLASSES + 1)  # background at 0
    assert out.anchor_box_regression.shape == (n, num_anchors, 4)
    assert [a.shape for a in out.anchors] == [(num_anchors, 4)] * n
    assert out.cls_logits is None and out.box_regression is None  # sigmoid-head names stay empty
    assert [len(b) for b in out.gt_boxes] == [2, 2, 0]
    batch, _ = model.transform(images)
    with torch.no_grad():
        features_only = adapter_for(model).run(batch, {"features"}, out)
    assert features_only.anchor_class_logits is None and list(features_only.features) == list(out.features)


ZERO_WHEN_EQUAL_TERMS = [
    Term("kl", "anchor_class_logits", temperature=2.0),
    Term("focal_kl", "anchor_class_logits"),
    Term("margin", "anchor_class_logits"),
    Term("dkd", "anchor_class_logits"),
    Term("delta_l1", "anchor_box_regression"),
    Term("giou", "anchor_box_regression"),
    Term("teacher_bounded", "anchor_box_regression"),
    Term("cwd", "features"),
    Term("hint", "features"),
]


def test_identical_teacher_gives_zero_terms_and_no_teacher_gradient():
    student = tiny_ssd()
    teacher = copy.deepcopy(student)
    distiller = Distiller(student, teacher, ZERO_WHEN_EQUAL_TERMS, probe_size=IMAGE_SIZE).train()
    losses = distiller(*make_batch(num_images=3))
    for term in ZERO_WHEN_EQUAL_TERMS:
        assert losses[term.key].abs().item() < 1e-6, term.name
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_feature_terms_from_an_fcos_teacher_pair_ssd_maps_by_stride():
    student, teacher = tiny_ssd(), build_fcos()
    distiller = Distiller(student, teacher, [Term("cwd", "features", temperature=4.0)], probe_size=IMAGE_SIZE)
    # SSDlite's maps "0".."5" start at stride 16: FCOS's "1" (16), "2" (32), then "p6" (64; at 64 px the
    # first of FCOS's 1 x 1 maps, as SSD's "3".."5" are), not the same-named FCOS levels at strides 8, 16, 32
    pairs = [("0", "1"), ("1", "2"), ("2", "p6"), ("3", "p6"), ("4", "p6"), ("5", "p6")]
    assert distiller.level_pairs["features_cwd"] == [pairs]
    losses = distiller.train()(*make_batch())
    assert torch.isfinite(losses["kd_features_cwd"]) and losses["kd_features_cwd"] > 0
    losses["kd_features_cwd"].backward()
    assert all(p.grad is not None for p in distiller.connectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_per_anchor_terms_across_families_are_refused_naming_what_pairs():
    only_features = r".*Terms that pair these models: features"  # the distiller's list of what pairs
    with pytest.raises(ValueError, match=r"(?s)'anchor_class_logits', which the teacher 0 \(FCOS\).*only between SSD" + only_features):
        Distiller(tiny_ssd(), build_fcos(), [Term("kl", "anchor_class_logits")])
    with pytest.raises(ValueError, match=r"(?s)'anchor_box_regression', which the teacher 0 \(FCOS\)" + only_features):
        Distiller(tiny_ssd(), build_fcos(), [Term("giou", "anchor_box_regression")])
    with pytest.raises(ValueError, match=r"(?s)'cls_logits', which the student \(SSD\).*on='anchor_class_logits'" + only_features):
        Distiller(tiny_ssd(), build_fcos(), [Term("binary_kd", "cls_logits")])
    with pytest.raises(ValueError, match=r"(?s)'box_regression', which the teacher 0 \(SSD\) does not produce" + only_features):
        Distiller(build_fcos(), tiny_ssd(), [Term("giou", "box_regression")])
    with pytest.raises(ValueError, match=r"output 'anchor_class_logits'; valid losses there: kl, focal_kl, margin, dkd"):
        Term("binary_kd", "anchor_class_logits")  # a softmax head: Bernoulli KD is refused by the table
    other_boxes = tiny_ssd()
    other_boxes.anchor_generator.aspect_ratios = [[2]] * 6  # another DefaultBoxGenerator layout
    with pytest.raises(ValueError, match=r"anchors differ.*Terms that still work: feature"):
        Distiller(tiny_ssd(), other_boxes, [Term("kl", "anchor_class_logits")], probe_size=IMAGE_SIZE)


def test_class_weights_follow_the_k_plus_one_layout():
    adapter = adapter_for(tiny_ssd())
    assert adapter.class_channels == NUM_CLASSES + 1 and adapter.num_classes == NUM_CLASSES
    assert adapter.per_label(torch.tensor([2.0, 3.0, 4.0, 5.0])).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # background 1
    with pytest.raises(ValueError, match=r"class_weights has 5 entries.*background on channel 0: give 4 weights"):
        Distiller(tiny_ssd(), tiny_ssd(0.5), [Term("kl", "anchor_class_logits", class_weights=torch.ones(NUM_CLASSES + 1))])

    # Weight 0 for every label: only the default boxes SSD's matcher leaves on background count.
    student, teacher = tiny_ssd(), tiny_ssd(0.5)
    term = Term("kl", "anchor_class_logits", temperature=2.0, class_weights=torch.zeros(NUM_CLASSES))
    distiller = Distiller(student, teacher, [term], probe_size=IMAGE_SIZE).train()
    images, targets = make_batch()
    value = distiller(images, targets)[term.key]
    with torch.no_grad():
        _, out = _collect(student, images, targets)
        batch, _ = student.transform(images, copy.deepcopy(targets))
        teacher_logits = adapter_for(teacher).run(batch, {"anchor_class_logits"}, out).anchor_class_logits
    background = torch.cat([
        student.proposal_matcher(box_iou(boxes, anchors)) < 0 for boxes, anchors in zip(out.gt_boxes, out.anchors)
    ])  # (N * HWA,) torchvision's SSD assignment
    assert 0 < int((~background).sum()) < background.numel()
    rows = lambda logits: logits.flatten(0, 1)[background]  # (N, HWA, K + 1) -> (B, K + 1)  # noqa: E731
    expected = kl_div_kd(rows(out.anchor_class_logits), rows(teacher_logits), 2.0)
    assert torch.allclose(value, expected, atol=1e-6)


def test_one_distillation_step_trains_a_plain_torchvision_ssd():
    student, teacher = tiny_ssd(), tiny_ssd(0.5)
    terms = [
        Term("kl", "anchor_class_logits", temperature=2.0),
        Term("giou", "anchor_box_regression", class_weights=torch.ones(NUM_CLASSES)),
        Term("cwd", "features", weight=0.5),
    ]
    distiller = Distiller(student, teacher, terms, probe_size=IMAGE_SIZE).train()
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    before, teacher_before = copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())
    losses = distiller(*make_batch())
    assert {"bbox_regression", "classification"} | {t.key for t in terms} == set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    tiny_ssd().load_state_dict(distiller.student.state_dict(), strict=True)


def test_built_ssdlite_reloads_strictly_and_pairs_anchors_with_torchvision_ssdlite():
    student = build_detector("ssdlite_mobilenet_v3_small", NUM_CLASSES, IMAGE_SIZE)
    build_detector("ssdlite_mobilenet_v3_small", NUM_CLASSES, IMAGE_SIZE).load_state_dict(student.state_dict(), strict=True)
    teacher = build_detector("ssdlite320_mobilenet_v3_large", NUM_CLASSES, IMAGE_SIZE)  # resized to 64 px
    assert teacher.transform.fixed_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert adapter_for(student).anchor_signature() == adapter_for(teacher).anchor_signature()
    terms = [Term("kl", "anchor_class_logits"), Term("delta_l1", "anchor_box_regression")]
    Distiller(student, teacher, terms, probe_size=IMAGE_SIZE)  # same default boxes and grids: per-anchor terms pair


def test_train_det_runs_with_an_ssdlite_student_and_feature_terms(tmp_path, monkeypatch, capsys):
    """The demo's pipeline (FCOS teacher, baseline, distilled student, evaluation) with an SSDlite
    student; the demo recipe's cls_logits term does not pair with SSD, so the terms are CWD on features."""
    spec = importlib.util.spec_from_file_location("train_det", REPO / "tools" / "train_det.py")
    train_det = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_det)
    monkeypatch.setenv("DENSEKD_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    settings = [
        "student.name=ssdlite_mobilenet_v3_small", "distill={terms: [{loss: cwd, on: features, temperature: 4.0, weight: 0.2}]}",
        "data.synthetic={num_train: 16, num_val: 8, image_size: 64, max_object_size: 32}", "data.batch_size=2",
        "teacher.image_size=64", "student.image_size=64", "teacher_optim.iterations=1", "teacher_optim.warmup_iters=0",
        "optim.iterations=2", "optim.warmup_iters=0", "log_every=1",
    ]  # fmt: skip
    output = tmp_path / "out"
    try:
        overrides = [argument for setting in settings for argument in ("--set", setting)]
        code = train_det.main(["--quick", "--threads", "1", "--output", str(output), *overrides])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    assert "kd_features_cwd=" in capsys.readouterr().out
    report = json.loads((output / "metrics.json").read_text())
    assert set(report["models"]) == {"teacher", "baseline", "distilled"}
    build_detector("ssdlite_mobilenet_v3_small", 12, 64).load_state_dict(
        torch.load(output / "student_distilled.pth", weights_only=True), strict=True
    )
