"""Label smoothing on the student's hard classification loss, per head type."""
import copy

import pytest
import torch
from tiny_detectors import build_fcos, build_rcnn, build_retinanet, make_batch
from torchvision.ops import sigmoid_focal_loss

from densekd import Distiller, Term
from densekd.detection.label_smoothing import smoothed_targets


def test_smoothed_targets_spread_epsilon_over_the_channels():
    targets = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(smoothed_targets(targets, 0.2), torch.tensor([[0.05, 0.85, 0.05, 0.05]]))


def _losses(distiller, seed=5):
    torch.manual_seed(seed)  # same RPN/RoI sampling in both runs
    return distiller(*make_batch())


@pytest.mark.parametrize("build", [build_retinanet, build_fcos], ids=["retinanet", "fcos"])
def test_one_stage_classification_loss_changes_only_with_smoothing(build):
    student = build()
    plain = Distiller(copy.deepcopy(student), build(), [Term("binary_kd", "cls_logits")]).train()
    smoothed = Distiller(copy.deepcopy(student), build(), [Term("binary_kd", "cls_logits")], label_smoothing=0.1).train()
    a, b = _losses(plain), _losses(smoothed)
    assert not torch.isclose(a["classification"], b["classification"])
    assert torch.isclose(a["bbox_regression"], b["bbox_regression"])
    import torchvision.models.detection.fcos as fcos_module

    assert fcos_module.sigmoid_focal_loss is sigmoid_focal_loss  # restored after the forward


def test_rcnn_classifier_loss_is_cross_entropy_with_smoothing():
    student = build_rcnn()
    plain = Distiller(copy.deepcopy(student), build_rcnn(), [Term("kl", "roi_class_logits")]).train()
    smoothed = Distiller(copy.deepcopy(student), build_rcnn(), [Term("kl", "roi_class_logits")], label_smoothing=0.0001).train()
    zero = Distiller(copy.deepcopy(student), build_rcnn(), [Term("kl", "roi_class_logits")], label_smoothing=0.3).train()
    a, b, c = _losses(plain), _losses(smoothed), _losses(zero)
    assert torch.isclose(a["loss_classifier"], b["loss_classifier"], rtol=1e-3)  # same labels as torchvision's
    assert not torch.isclose(a["loss_classifier"], c["loss_classifier"])


def test_label_smoothing_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\)"):
        Distiller(build_fcos(), build_fcos(), [Term("binary_kd", "cls_logits")], label_smoothing=1.5)
