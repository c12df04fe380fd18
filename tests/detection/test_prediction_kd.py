"""Prediction-level KD across families: a teacher's own detections as pseudo-targets of the
student's own loss and as matched GIoU targets, from a Faster R-CNN teacher into FCOS and SSDlite
students; what pairs and what is refused, and with which list of working terms."""
from pathlib import Path

import pytest
import torch
from tiny_detectors import NUM_CLASSES, build_fcos, build_rcnn, build_retinanet, make_batch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList

from densekd import Distiller, Term
from densekd.core.outputs import DenseOutputs
from densekd.detection import distiller as distiller_module
from densekd.detection import predictions
from densekd.detection.adapters import adapter_for, encode_boxes
from densekd.detection.models import ssdlite_mobilenet_v3
from densekd.detection.pairs import StepContext
from densekd.detection.teacher_cache import offline_blockers
from densekd.experiment.config import ConfigError, build_terms, load_distillation_config, parse_experiment_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "distill" / "cross_family_detections.yaml"
CHANNELS = NUM_CLASSES + 1  # labels 1..K on K + 1 class channels, in every family


def fcos_student():
    return build_fcos(num_classes=CHANNELS)  # FCOS's num_classes counts channels: label k on channel k


def prediction_terms(iou_threshold=0.5):
    # An untrained teacher scores about 1 / CHANNELS per class, and an untrained FCOS predicts
    # boxes about a pixel wide: low thresholds let one step exercise both terms.
    return [
        Term("pseudo_targets", on="detections", params={"score_threshold": 0.1}),
        Term("matched_giou", on="detections", params={"score_threshold": 0.1, "iou_threshold": iou_threshold}),
    ]


def _kd(losses):
    return {k: v for k, v in losses.items() if k.startswith("kd_")}


# --- one step, Faster R-CNN teacher into other families ------------------------------------------
def test_faster_rcnn_teacher_into_fcos_student_trains_a_plain_fcos():
    teacher, student = build_rcnn(fpn_width=32), fcos_student()
    terms = prediction_terms(iou_threshold=0.01) + [Term("cwd", on="features", levels=["0", "1", "2"])]
    distiller = Distiller(student, teacher, terms).train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01)
    losses = distiller(*make_batch())
    kd = _kd(losses)
    assert set(kd) == {"kd_detections_pseudo_targets", "kd_detections_matched_giou", "kd_features_cwd"}
    assert all(torch.isfinite(v) for v in losses.values()) and all(v > 0 for v in kd.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    # The student is still a plain torchvision FCOS: its state_dict loads strictly into a fresh one.
    fresh = fcos_student()
    assert set(fresh.state_dict()) == set(student.state_dict()) and type(student) is FCOS
    fresh.load_state_dict(student.state_dict(), strict=True)


def test_faster_rcnn_teacher_into_ssdlite_student():
    teacher = build_rcnn(fpn_width=32)
    student = ssdlite_mobilenet_v3(NUM_CLASSES, 64)  # K + 1 softmax classes, background 0
    distiller = Distiller(student, teacher, prediction_terms(iou_threshold=0.05)).train()
    losses = distiller(*make_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(v > 0 for v in _kd(losses).values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


# --- pseudo-targets: what the student's own loss sees --------------------------------------------
def test_pseudo_targets_below_the_threshold_are_not_used(monkeypatch):
    constructed = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [24.0, 12.0, 60.0, 58.0], [10.0, 10.0, 20.0, 30.0]]),
            "labels": torch.tensor([1, 2, 3]),
            "scores": torch.tensor([0.9, 0.3, 0.6]),
        },
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([4]), "scores": torch.tensor([0.2])},
    ]
    monkeypatch.setattr(distiller_module, "teacher_detections", lambda *args: constructed)
    student = fcos_student()
    distiller = Distiller(student, build_rcnn(), [Term("pseudo_targets", on="detections")]).train()  # threshold 0.5
    calls = []
    own_loss = student.compute_loss

    def recording_loss(targets, *args):
        calls.append((targets, own_loss(targets, *args)))
        return calls[-1][1]

    monkeypatch.setattr(student, "compute_loss", recording_loss)
    losses = distiller(*make_batch())
    (_, ground_truth_losses), (pseudo_targets, pseudo_losses) = calls  # the student's forward, then the term
    # Kept: image 0's detections 0 and 2 (scores 0.9 and 0.6); image 1's only one (0.2) is not.
    assert torch.equal(pseudo_targets[0]["boxes"], constructed[0]["boxes"][[0, 2]])
    assert pseudo_targets[0]["labels"].tolist() == [1, 3] and len(pseudo_targets[1]["boxes"]) == 0
    expected = (0.9 + 0.6) / 2 * sum(pseudo_losses.values())
    assert torch.allclose(losses["kd_detections_pseudo_targets"], expected)
    assert torch.equal(losses["classification"], ground_truth_losses["classification"])  # its own loss untouched


def test_detections_the_student_cannot_learn_are_dropped():
    # An FCOS teacher may emit label 0; to an R-CNN student label 0 is background.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0]] * 3)
    detections = [{"boxes": boxes, "labels": torch.tensor([0, 1, 4]), "scores": torch.ones(3)}]
    kept = predictions._student_labels_only(detections, adapter_for(build_rcnn()))
    assert kept[0]["labels"].tolist() == [1, 4]
    assert predictions._student_labels_only(detections, adapter_for(fcos_student()))[0]["labels"].tolist() == [0, 1, 4]


# --- matched GIoU: zero when the student predicts the teacher's boxes ------------------------------
def _context(adapter, student_outputs, detections):
    teacher = DenseOutputs(image_sizes=student_outputs.image_sizes, batch_shape=student_outputs.batch_shape)
    teacher.detections = detections
    return StepContext(student_outputs, [teacher], [1.0], adapter, nn.ModuleDict(), {}, 0)


TEACHER_BOXES = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [24.0, 12.0, 60.0, 58.0]]), torch.tensor([[10.0, 10.0, 50.0, 30.0]])]
DETECTIONS = [
    {"boxes": TEACHER_BOXES[0], "labels": torch.tensor([1, 3]), "scores": torch.tensor([0.9, 0.7])},
    {"boxes": TEACHER_BOXES[1], "labels": torch.tensor([2]), "scores": torch.tensor([0.8])},
]


def test_matched_giou_is_zero_when_dense_predictions_are_the_teachers_boxes():
    adapter = adapter_for(fcos_student())
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (64, 64)])
    features = adapter.features_of(images.tensors)
    anchors = adapter.model.anchor_generator(images, list(features.values()))  # per image (HWA, 4)
    # Every location predicts the teacher box nearest to it in index order: exactly a teacher box.
    targets = [boxes[torch.arange(len(a)) % len(boxes)] for boxes, a in zip(TEACHER_BOXES, anchors)]
    deltas = torch.stack([encode_boxes(adapter.model.box_coder, t, a) for t, a in zip(targets, anchors)])
    student = DenseOutputs(image_sizes=images.image_sizes, batch_shape=(64, 64), anchors=anchors)
    student.box_regression = deltas.requires_grad_()  # (N, HWA, 4)
    term = Term("matched_giou", on="detections")
    loss = predictions.detection_term_loss(term, _context(adapter, student, DETECTIONS))
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    student.box_regression = deltas.detach() + 0.3  # shifted predictions: a positive loss
    assert predictions.detection_term_loss(term, _context(adapter, student, DETECTIONS)) > 0.01


def test_matched_giou_is_zero_when_rois_predict_the_teachers_boxes_at_their_class():
    adapter = adapter_for(build_rcnn())
    coder = adapter.box_coder_for("roi_box_regression")
    proposals = [boxes + torch.tensor([1.0, -1.0, 2.0, 1.0]) for boxes in TEACHER_BOXES]  # one RoI near each detection
    deltas = torch.zeros(3, CHANNELS, 4)  # (R, K + 1, 4): other classes predict something else
    for row, (box, proposal, label) in enumerate(
        zip(torch.cat(TEACHER_BOXES), torch.cat(proposals), torch.cat([d["labels"] for d in DETECTIONS]))
    ):
        deltas[row, label] = encode_boxes(coder, box[None], proposal[None])[0]
    student = DenseOutputs(image_sizes=[(64, 64)] * 2, batch_shape=(64, 64), roi_proposals=proposals)
    student.roi_box_regression = deltas.reshape(3, -1).requires_grad_()
    loss = predictions.detection_term_loss(Term("matched_giou", on="detections"), _context(adapter, student, DETECTIONS))
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


# --- what pairs, what is refused -------------------------------------------------------------------
def test_unpairable_per_anchor_term_is_refused_with_the_terms_that_work():
    with pytest.raises(ValueError) as refusal:
        Distiller(fcos_student(), build_rcnn(), [Term("binary_kd", on="cls_logits")])
    message = str(refusal.value)
    assert "distills 'cls_logits', which the teacher 0 (FasterRCNN) does not produce" in message
    assert "Terms that pair these models: features (hint, masked_imitation, cwd," in message
    assert "detections (pseudo_targets, matched_giou)." in message
    # Same family, other anchors: per-anchor terms are refused and detections still listed.
    with pytest.raises(ValueError, match=r"anchors differ.*Terms that still work: features \(.*detections \(pseudo"):
        Distiller(build_retinanet(), build_retinanet(anchor_sizes=(32, 64, 128, 256, 512)), [Term("binary_kd", "cls_logits")])


def test_detection_terms_refuse_other_label_spaces_several_teachers_and_pseudo_target_class_weights():
    with pytest.raises(ValueError, match=r"labels 1\.\.4 \(5 class channels\).*labels 0\.\.3 \(4\)") as refusal:
        Distiller(build_fcos(), build_rcnn(), [Term("pseudo_targets", on="detections")])
    assert "Terms that pair these models: features (" in str(refusal.value)
    assert "detections (" not in str(refusal.value)
    with pytest.raises(ValueError, match="detection terms take one teacher, got 2"):
        Distiller(fcos_student(), [build_rcnn(), build_rcnn()], [Term("matched_giou", on="detections")])
    with pytest.raises(ValueError, match="class_weights cannot apply"):
        Distiller(fcos_student(), build_rcnn(), [Term("pseudo_targets", on="detections", class_weights=torch.ones(4))])
    weighted = Term("matched_giou", on="detections", class_weights=torch.tensor([1.0, 2.0, 1.0, 0.5]))
    Distiller(fcos_student(), build_rcnn(), [weighted])  # class weights apply per matched detection's label


def test_teacher_with_its_own_geometry_gives_detections_in_the_students_frame(monkeypatch):
    adapter = adapter_for(build_rcnn())
    found = [{"boxes": torch.tensor([[12.0, 24.0, 48.0, 96.0]]), "labels": torch.tensor([1]), "scores": torch.ones(1)}]
    detect = lambda *args: found
    monkeypatch.setitem(predictions._FAMILIES, type(adapter), predictions._Family(detect, None, None))
    teacher_batch = ImageList(torch.zeros(1, 3, 128, 96), [(128, 96)])
    moved = predictions.teacher_detections(adapter, teacher_batch, None, [(64, 48)])  # half the teacher's size
    assert torch.equal(moved[0]["boxes"], torch.tensor([[6.0, 12.0, 24.0, 48.0]]))
    monkeypatch.undo()

    teacher = build_rcnn(fpn_width=32)
    teacher.transform.min_size, teacher.transform.max_size = (96,), 96
    distiller = Distiller(fcos_student(), teacher, prediction_terms(), teacher_geometry="own").train()
    assert all(torch.isfinite(v) for v in distiller(*make_batch()).values())


def test_same_family_pairs_detections_too():
    distiller = Distiller(fcos_student(), fcos_student(), prediction_terms() + [Term("binary_kd", "cls_logits")]).train()
    assert all(torch.isfinite(v) for v in distiller(*make_batch()).values())


# --- YAML and the teacher cache ---------------------------------------------------------------------
def test_shipped_cross_family_config_builds_and_runs_a_faster_rcnn_into_fcos_step():
    terms = build_terms(load_distillation_config(CONFIG))
    assert {(t.loss, t.on) for t in terms} >= {("pseudo_targets", "detections"), ("matched_giou", "detections")}
    distiller = Distiller(fcos_student(), build_rcnn(), terms).train()
    losses = distiller(*make_batch())
    assert {t.key for t in terms} <= set(losses) and all(torch.isfinite(v) for v in losses.values())


def test_teacher_cache_refuses_detection_terms():
    distiller = Distiller(fcos_student(), build_rcnn(), prediction_terms())
    assert any("teacher's detections" in blocker for blocker in offline_blockers(distiller))
    distill = {"teacher_cache": True, "terms": [{"loss": "pseudo_targets", "on": "detections"}]}
    with pytest.raises(ConfigError, match=r"terms\[0\] \(pseudo_targets on detections: the cache does not store"):
        parse_experiment_config({"distill": distill})


@pytest.mark.parametrize("build", [build_fcos, build_retinanet])
def test_teacher_detections_reuse_the_dense_head_outputs_per_anchor_terms_computed(build):
    # A same-family pair with a per-anchor term and a detection term: the teacher's head runs once,
    # and the detections from its recorded outputs equal those of a fresh run of the head.
    teacher = build().eval()
    images, _ = make_batch(num_images=2)
    adapter = adapter_for(teacher)
    with torch.no_grad():
        batch, _ = teacher.transform(images)
        outputs = adapter.run(batch, {"features", "cls_logits", "box_regression", "centerness"}, None)
        calls = []
        teacher.head.register_forward_hook(lambda module, args, result: calls.append(1))
        reused = predictions.teacher_detections(adapter, batch, outputs, batch.image_sizes)
        assert calls == []
        outputs.cls_logits = None  # nothing recorded: the head runs
        fresh = predictions.teacher_detections(adapter, batch, outputs, batch.image_sizes)
        assert calls == [1]
    for a, b in zip(reused, fresh):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(a[key], b[key])
