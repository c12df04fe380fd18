"""The segmentation adapter records without changing what the model computes, and drives a
teacher's submodules to exactly what its own forward returns."""
import pytest
import torch
import torch.nn.functional as F
from tiny_segmenters import BUILDERS, NUM_CLASSES, build_fcn, make_batch
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large

from densekd import SegmentationAdapter, Tap, adapter_for, is_segmentation_model
from densekd.segmentation.adapter import upsampled


def _forward(model, images, tapped: bool, seed: int = 3):
    torch.manual_seed(seed)  # dropout in the heads: replay the same draws
    if not tapped:
        return model(images), None
    adapter = SegmentationAdapter(model)
    with Tap(model, outputs=adapter.tap_outputs()) as tap:
        result = model(images)
        return result, tap.read()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_tapped_equals_untapped_and_features_are_recorded(family):
    model = BUILDERS[family]()
    images, masks = make_batch()
    for training in (True, False):
        model.train(training)
        with torch.set_grad_enabled(training):
            tapped, records = _forward(model, images, tapped=True)
            plain, _ = _forward(model, images, tapped=False)
        assert tapped.keys() == plain.keys()
        assert all(torch.equal(tapped[k], plain[k]) for k in plain)
    outputs = SegmentationAdapter(model, logit_resolution="input").collect(records, tapped, masks)  # the forward's logits
    assert list(outputs.features) == (["low", "high"] if family == "lraspp" else list(model.backbone(images)))
    assert outputs.seg_logits.shape == (2, NUM_CLASSES, 64, 64)
    assert (outputs.aux_logits is not None) == ("aux" in tapped)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_teacher_driven_by_submodules_matches_its_own_forward(family):
    teacher = BUILDERS[family]().eval()
    adapter = SegmentationAdapter(teacher, logit_resolution="input")  # logits upsampled as the forward does
    images, _ = make_batch(seed=1)
    with torch.no_grad():
        expected = teacher(images)
        driven = adapter.run(images, {"seg_logits", "aux_logits"} & adapter.provides)
    assert torch.equal(driven.seg_logits, expected["out"])
    if "aux" in expected:
        assert torch.equal(driven.aux_logits, expected["aux"])
    assert driven.features.keys() == dict(teacher.backbone(images)).keys()


def test_feature_needs_run_the_backbone_only():
    teacher = build_fcn().eval()
    calls = []
    for name in ("backbone", "classifier", "aux_classifier"):
        getattr(teacher, name).register_forward_hook(lambda *args, n=name: calls.append(n))
    with torch.no_grad():
        outputs = SegmentationAdapter(teacher).run(make_batch()[0], {"features"})
    assert calls == ["backbone"] and outputs.seg_logits is None and outputs.aux_logits is None


def test_model_facts_and_family_detection():
    fcn = build_fcn(num_classes=6)
    adapter = adapter_for(fcn)
    assert isinstance(adapter, SegmentationAdapter) and adapter.num_classes == 6
    assert adapter.provides == {"features", "seg_logits", "aux_logits"}
    assert SegmentationAdapter(BUILDERS["lraspp"](num_classes=5)).num_classes == 5
    assert is_segmentation_model(torch.nn.DataParallel(fcn)) and not is_segmentation_model(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="supported segmentation families: FCN, DeepLabV3"):
        SegmentationAdapter(torch.nn.Conv2d(1, 1, 1))


def test_logits_of_another_resolution_are_resized_bilinearly():
    logits = torch.randn(2, 3, 16, 16)
    assert torch.equal(upsampled(logits, (64, 48)), F.interpolate(logits, size=(64, 48), mode="bilinear", align_corners=False))
    assert upsampled(logits, (16, 16)) is logits


def test_torchvision_builders_expose_their_levels():
    images = make_batch()[0]
    for model, levels, provides_aux in [
        (deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True), ["aux", "out"], True),
        (lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES), ["low", "high"], False),
    ]:
        adapter = SegmentationAdapter(model.eval(), logit_resolution="input")
        with torch.no_grad():
            outputs = adapter.run(images, adapter.provides)
            expected = model(images)
        assert list(outputs.features) == levels and ("aux_logits" in adapter.provides) == provides_aux
        assert torch.equal(outputs.seg_logits, expected["out"])
