"""Batches of either task reach the model's device with their structure intact."""
import torch

from densekd.training.step import to_device


def test_detection_and_segmentation_batches_move_with_their_structure():
    meta = torch.device("meta")  # a non-CPU device available everywhere
    images = [torch.zeros(3, 4, 4), torch.zeros(3, 5, 5)]
    targets = [{"boxes": torch.zeros(1, 4), "image_id": 7}, {"boxes": torch.zeros(0, 4), "image_id": 8}]
    moved_images, moved_targets = to_device((images, targets), meta)
    assert isinstance(moved_images, list) and all(image.device == meta for image in moved_images)
    assert [t["image_id"] for t in moved_targets] == [7, 8] and all(t["boxes"].device == meta for t in moved_targets)

    stacked, masks = to_device((torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)), meta)
    assert stacked.device == meta and masks.device == meta and masks.dtype == torch.long
    batch = (images, targets)
    assert to_device(batch, torch.device("cpu")) is batch  # nothing to move
