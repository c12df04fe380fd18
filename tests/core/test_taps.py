"""Taps record without changing what the model computes."""
import pytest
import torch
from assertions import assert_same
from tiny_detectors import BUILDERS, NUM_CLASSES, make_batch
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

from densekd import Tap, adapter_for


def _run(model, images, targets, tapped: bool, seed: int = 3):
    torch.manual_seed(seed)  # RoI/anchor sampling is random: replay the same draws
    if not tapped:
        return model(images, targets)
    adapter = adapter_for(model)
    with Tap(model, outputs=adapter.tap_outputs(), inputs=adapter.tap_inputs()) as tap:
        result = model(images, targets)
        assert tap.read(), "the tap recorded nothing"
    return result


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_tapped_equals_untapped_in_training_and_evaluation(family):
    model = BUILDERS[family]()
    images, targets = make_batch(num_images=3)
    model.train()
    assert_same(_run(model, images, targets, tapped=True), _run(model, images, targets, tapped=False))
    model.eval()
    with torch.no_grad():
        assert_same(_run(model, images, None, tapped=True), _run(model, images, None, tapped=False))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"


def test_mobilenet_v3_fpn_faster_rcnn_is_tapped():
    model = fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, min_size=64, max_size=64
    ).eval()
    images, _ = make_batch()
    adapter = adapter_for(model)
    with torch.no_grad(), Tap(model, outputs=adapter.tap_outputs(), inputs=adapter.tap_inputs()) as tap:
        model(images)
        outputs = adapter.collect(tap.read())
    assert list(outputs.features) == ["0", "1", "pool"]
    assert outputs.rpn_objectness.shape == (2, sum(a.shape[0] for a in outputs.anchors) // 2)
    assert outputs.roi_class_logits.shape[1] == NUM_CLASSES + 1


def test_read_clears_and_exit_removes_hooks():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with Tap(model, outputs=["0"], inputs=["1"]) as tap:
        model(torch.ones(1, 2))
        records = tap.read()
        assert set(records) == {"0", "1:inputs"}
        assert torch.equal(records["0"], records["1:inputs"][0])
        assert tap.read() == {}
    assert not model[0]._forward_hooks and not model[1]._forward_pre_hooks


def test_unknown_tap_name_suggests_close_matches():
    model = BUILDERS["faster_rcnn"]()
    with pytest.raises(ValueError, match=r"no submodule named 'rpn\.haed'.*'rpn\.head'"):
        Tap(model, outputs=["rpn.haed"])


def test_data_parallel_wrapper_is_unwrapped():
    model = nn.Sequential(nn.Linear(2, 2))
    with Tap(nn.DataParallel(model), outputs=["0"]) as tap:
        model(torch.ones(1, 2))
        assert "0" in tap.read()
