import pytest
import torch

from densekd.detection.models import ARCHITECTURES, build_detector
from densekd.experiment.config import model_definitions
from densekd.training import save_checkpoint, warmup_cosine
from densekd.training.checkpoints import load_weights


def test_build_detector_typo_lists_valid_names():
    with pytest.raises(ValueError, match="fcos_resnet18_fpn64") as error:
        build_detector("fcos_resnet18_fpn46", num_classes=3, image_size=64)
    detectors = [name for name, (architecture, _) in model_definitions().items() if architecture in ARCHITECTURES]
    assert detectors and all(name in str(error.value) for name in detectors)
    assert "fasterrcnn_resnet50_fpn" in str(error.value)  # torchvision builders are valid names too


def test_torchvision_builders_get_one_class_channel_per_label_plus_background():
    model = build_detector("fasterrcnn_mobilenet_v3_large_fpn", num_classes=3, image_size=64)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.transform.min_size == (64,)


def test_load_weights_accepts_state_dicts_and_training_checkpoints_and_names_mismatches(tmp_path):
    student = build_detector("fcos_resnet18_fpn64", num_classes=3, image_size=64)
    torch.save(student.state_dict(), tmp_path / "plain.pth")
    torch.save({"model": student.state_dict(), "iteration": 5}, tmp_path / "ckpt.pth")
    for file in ("plain.pth", "ckpt.pth"):
        fresh = build_detector("fcos_resnet18_fpn64", num_classes=3, image_size=64)
        load_weights(fresh, tmp_path / file)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), student.state_dict().values()))
    other = build_detector("fcos_resnet34_fpn128", num_classes=3, image_size=64)
    with pytest.raises(ValueError, match=r"(?s)does not fit FCOS.*missing keys.*unexpected keys"):
        load_weights(other, tmp_path / "plain.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(other, tmp_path / "nope.pth")


def test_student_head_has_one_channel_per_label_and_reloads_strictly():
    student = build_detector("fcos_resnet18_fpn64", num_classes=3, image_size=64)
    # torchvision's FCOS indexes sigmoid channels by label: labels 1..3 need 4 channels
    assert student.head.classification_head.num_classes == 4
    again = build_detector("fcos_resnet18_fpn64", num_classes=3, image_size=64)
    again.load_state_dict(student.state_dict(), strict=True)


def test_box_bias_init_starts_boxes_at_anchor_size_and_keeps_the_regression_alive():
    plain = build_detector("fcos_resnet18_fpn64", num_classes=3, image_size=64)
    assert torch.equal(plain.head.regression_head.bbox_reg.bias, torch.zeros(4))  # torchvision's init
    photo = build_detector("fcos_resnet18_fpn64_box1", num_classes=3, image_size=64)
    assert torch.equal(photo.head.regression_head.bbox_reg.bias, torch.ones(4))
    outputs = []
    photo.head.regression_head.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    photo.eval()
    with torch.no_grad():
        photo([torch.rand(3, 64, 64)])
    assert bool((outputs[0] > 0).all())  # (N, HWA, 4) after the ReLU: every output alive at the start
    # same parameters as the plain architecture: the student is still a plain torchvision FCOS
    assert plain.state_dict().keys() == photo.state_dict().keys()


def test_warmup_cosine_shape():
    factor = warmup_cosine(iterations=100, warmup_iters=10)
    assert factor(0) == pytest.approx(1 / 11)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0, abs=1e-12)


def test_save_checkpoint_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint(path, {"w": torch.ones(2)})
    save_checkpoint(path, {"w": torch.zeros(2)})
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pth"]


def test_pretrained_teachers_come_from_torchvision_with_their_own_classes(monkeypatch):
    import torchvision

    from densekd.detection.models import build_pretrained

    calls = []
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kw: calls.append((name, kw)) or "model")
    assert build_pretrained("fcos_resnet50_fpn", "DEFAULT") == "model"
    assert calls == [("fcos_resnet50_fpn", {"weights": "DEFAULT"})]  # no num_classes override: 91 COCO channels

    def offline(name, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(RuntimeError, match="download the weights file on another machine"):
        build_pretrained("fcos_resnet50_fpn", "DEFAULT")
    with pytest.raises(ValueError, match="need a torchvision detection builder"):
        build_pretrained("fcos_resnet18_fpn64", "DEFAULT")
