import pytest
import torch

from densekd.engine import save_checkpoint, warmup_cosine
from densekd.models import DETECTORS, build_detector


def test_build_detector_typo_lists_valid_names():
    with pytest.raises(ValueError, match="fcos_resnet18_fpn64") as error:
        build_detector("fcos_resnet18_fpn46", num_classes=3, image_size=64)
    assert all(name in str(error.value) for name in DETECTORS)


def test_student_head_has_one_channel_per_label_and_reloads_strictly():
    student = build_detector("fcos_resnet18_fpn64", num_classes=3, image_size=64)
    # torchvision's FCOS indexes sigmoid channels by label: labels 1..3 need 4 channels
    assert student.head.classification_head.num_classes == 4
    again = build_detector("fcos_resnet18_fpn64", num_classes=3, image_size=64)
    again.load_state_dict(student.state_dict(), strict=True)


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
