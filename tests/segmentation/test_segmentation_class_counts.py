"""Per-class pixel and image counts of segmentation masks, for class weights."""
import pytest
import torch

from densekd import class_weights, segmentation_class_counts

MASKS = torch.tensor([
    [[0, 0, 1], [255, 1, 1]],  # class 0: 2 pixels, class 1: 3 pixels, one void pixel
    [[2, 2, 2], [2, 0, 255]],  # class 0: 1 pixel, class 2: 4 pixels
])


def test_pixel_and_image_counts_hand_computed():
    assert segmentation_class_counts(MASKS, 4).tolist() == [3, 3, 4, 0]
    assert segmentation_class_counts(MASKS, 4, by="images").tolist() == [2, 1, 1, 0]


def test_iterable_of_masks_of_different_sizes():
    masks = [MASKS[0], MASKS[1][:, :2], torch.full((5, 7), 3)]
    assert segmentation_class_counts(masks, 4).tolist() == [3, 3, 3, 35]
    assert segmentation_class_counts(masks, 4, by="images").tolist() == [2, 1, 1, 1]
    weights = class_weights(segmentation_class_counts(masks, 4), method="inverse")
    assert weights.shape == (4,) and weights[3] < weights[2]


def test_bad_labels_and_units_are_named():
    with pytest.raises(ValueError, match=r"labels \[255\] outside 0\.\.3"):
        segmentation_class_counts(MASKS, 4, ignore_index=None)
    with pytest.raises(ValueError, match=r"labels \[7\] outside 0\.\.3"):
        segmentation_class_counts(torch.tensor([[0, 7]]), 4)
    with pytest.raises(ValueError, match=r"unknown count unit 'pixel'.*Did you mean 'pixels'"):
        segmentation_class_counts(MASKS, 4, by="pixel")
    with pytest.raises(ValueError, match="integer"):
        segmentation_class_counts(MASKS.float(), 4)
