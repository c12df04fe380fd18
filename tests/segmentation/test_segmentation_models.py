"""Segmentation model definitions and torchvision builders: K + 1 channels, plain torchvision
classes whose state_dicts reload strictly, wrapper checkpoints, clear errors."""
import pytest
import torch
from torch import nn
from torchvision.models.segmentation import LRASPP, DeepLabV3

from densekd import SegmentationTraining
from densekd.detection.models import build_detector
from densekd.experiment.config import model_definitions
from densekd.segmentation.models import SEGMENTATION_ARCHITECTURES, build_pretrained_segmenter, build_segmenter
from densekd.training.checkpoints import load_weights

SEGMENTERS = sorted(name for name, (architecture, _) in model_definitions().items() if architecture in SEGMENTATION_ARCHITECTURES)


@pytest.mark.parametrize("name", SEGMENTERS + ["lraspp_mobilenet_v3_large"])
def test_definitions_and_torchvision_builders_predict_background_plus_k(name):
    torch.manual_seed(0)
    model = build_segmenter(name, num_classes=5).eval()
    assert isinstance(model, (DeepLabV3, LRASPP))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    assert out["out"].shape == (2, 6, 64, 64)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    fresh = build_segmenter(name, num_classes=5)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_resnet18_deeplab_keeps_stride_16_and_has_an_aux_head():
    model = build_segmenter("deeplabv3_resnet18_aspp128", num_classes=3)
    features = model.backbone(torch.rand(1, 3, 96, 96))
    assert features["out"].shape == (1, 512, 6, 6) and features["aux"].shape == (1, 256, 6, 6)
    assert model.aux_classifier is not None and model.classifier[0].project[0].out_channels == 128


def test_wrapper_checkpoints_load_and_names_are_checked(tmp_path):
    model = build_segmenter("lraspp_mobilenet_v3_small", num_classes=2)
    torch.save({"model": SegmentationTraining(model).state_dict(), "iteration": 3}, tmp_path / "teacher.ckpt")
    fresh = build_segmenter("lraspp_mobilenet_v3_small", num_classes=2)
    load_weights(fresh, tmp_path / "teacher.ckpt")  # run_training's checkpoint of the baseline's trainer
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match=r"unknown segmentation model 'lraspp_mobilnet_v3_small'.*Did you mean 'lraspp_mobilenet_v3_small'"):
        build_segmenter("lraspp_mobilnet_v3_small", 2)
    with pytest.raises(ValueError, match="Unknown detector"):
        build_detector("lraspp_mobilenet_v3_small", 2, 64)  # a segmenter is no detector
    with pytest.raises(ValueError, match="torchvision segmentation builder"):
        build_pretrained_segmenter("lraspp_mobilenet_v3_small", "DEFAULT", 20)
