"""SegmentationTraining: torchvision's reference losses (CE + 0.5 aux CE, void pixels ignored),
label smoothing that ignores void pixels too, and clear errors on bad masks."""
import pytest
import torch
import torch.nn.functional as F
from tiny_segmenters import IGNORE, build_fcn, build_lraspp, make_batch

from densekd import SegmentationTraining
from densekd.segmentation.trainer import pixel_cross_entropy


def _frozen_randomness(model):
    """Dropout off, BatchNorm on running statistics: the same logits in train and eval mode."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Dropout, torch.nn.BatchNorm2d)):
            module.eval()
    return model


def test_losses_are_torchvision_references_criterion():
    model = build_fcn()
    training = SegmentationTraining(model).train()
    _frozen_randomness(model)
    images, masks = make_batch()
    losses = training(images, masks)
    with torch.no_grad():
        logits = model(images)
    assert set(losses) == {"loss_seg", "loss_aux"}
    assert torch.allclose(losses["loss_seg"], F.cross_entropy(logits["out"], masks, ignore_index=IGNORE))
    assert torch.allclose(losses["loss_aux"], 0.5 * F.cross_entropy(logits["aux"], masks, ignore_index=IGNORE))
    assert training.model is model


def test_model_without_aux_head_has_only_the_main_loss_and_eval_returns_the_models_output():
    model = build_lraspp()
    training = SegmentationTraining(model, aux_weight=0.4)
    assert set(training.train()(*make_batch())) == {"loss_seg"}
    images, _ = make_batch()
    with torch.no_grad():
        out = training.eval()(images)
        assert torch.equal(out["out"], model(images)["out"]) and set(out) == {"out"}


def test_label_smoothing_leaves_ignored_pixels_out():
    logits = torch.randn(2, 4, 5, 5)
    masks = torch.randint(0, 4, (2, 5, 5))
    masks[0, :2] = IGNORE
    smoothed = pixel_cross_entropy(logits, masks, IGNORE, label_smoothing=0.1)
    expected = F.cross_entropy(logits, masks, ignore_index=IGNORE, label_smoothing=0.1)
    assert torch.allclose(smoothed, expected)
    changed = logits.masked_fill((masks == IGNORE)[:, None], 30.0)  # other logits at void pixels only
    assert torch.allclose(pixel_cross_entropy(changed, masks, IGNORE, 0.1), smoothed)
    all_void = pixel_cross_entropy(logits.requires_grad_(True), torch.full_like(masks, IGNORE), IGNORE, 0.1)
    assert all_void.item() == 0.0
    all_void.backward()


def test_bad_masks_and_settings_are_named():
    training = SegmentationTraining(build_lraspp()).train()
    images, masks = make_batch()
    with pytest.raises(ValueError, match=r"masks must have shape \(N, H, W\) = \(2, 64, 64\)"):
        training(images, masks[:, :32])
    with pytest.raises(ValueError, match="integer class indices"):
        training(images, masks.float())
    bad = masks.clone()
    bad[0, 10, 10] = 9
    with pytest.raises(ValueError, match=r"labels \[9\] outside 0\.\.3 and not the ignore_index 255"):
        training(images, bad)
    with pytest.raises(ValueError, match="Training needs masks"):
        training(images)
    assert training(images, masks.to(torch.uint8))["loss_seg"] > 0  # any integer dtype is accepted
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        SegmentationTraining(build_lraspp(), label_smoothing=1.0)
    with pytest.raises(TypeError, match="supported segmentation families"):
        SegmentationTraining(torch.nn.Conv2d(3, 4, 1))
