import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from densekd.data import CocoDetectionDataset, collate_detection


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@pytest.fixture()
def hand_written(tmp_path):
    """Three images (RGB 20x30, grayscale 16x16, RGBA 12x12) and categories 3, 7, 42."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(image_dir / "rgb.png")
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(image_dir / "gray.png")
    Image.fromarray(np.full((12, 12, 4), 30, np.uint8)).save(image_dir / "rgba.png")
    blob = np.zeros((20, 30), np.uint8)
    blob[4:8, 20:26] = 1
    document = {
        "images": [
            {"id": 5, "file_name": "rgb.png", "height": 20, "width": 30},
            {"id": 9, "file_name": "gray.png", "height": 16, "width": 16},
            {"id": 11, "file_name": "rgba.png", "height": 12, "width": 12},
        ],
        "categories": [
            {"id": 42, "name": "kite", "frequency": "r"},
            {"id": 3, "name": "car", "frequency": "f"},
            {"id": 7, "name": "dog", "frequency": "c"},
        ],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 3, 10, 5], "area": 50, "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]]},
            {"id": 2, "image_id": 5, "category_id": 42, "bbox": [20, 4, 6, 4], "area": 24, "iscrowd": 0,
             "segmentation": _rle(blob)},
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 30, 20], "area": 600, "iscrowd": 1,
             "segmentation": _rle(np.ones((20, 30)))},
            {"id": 5, "image_id": 9, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
             "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]},
        ],
    }
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps(document))
    return image_dir, annotation_file


def test_non_contiguous_ids_map_to_sorted_contiguous_labels(hand_written):
    dataset = CocoDetectionDataset(*hand_written)
    assert dataset.num_classes == 3
    assert dataset.label_to_category_id == {1: 3, 2: 7, 3: 42}
    assert dataset.category_id_to_label == {3: 1, 7: 2, 42: 3}
    assert dataset.categories == ["car", "dog", "kite"]
    assert dataset.frequency_groups == ["f", "c", "r"]
    # non-crowd annotations only
    assert dataset.annotation_counts == [1, 1, 1]
    assert dataset.image_counts == [1, 1, 1]
    assert dataset.image_labels() == [[2, 3], [1], []]


def test_lvis_frequencies_from_the_file_or_from_training_image_counts(hand_written, tmp_path):
    image_dir, annotation_file = hand_written
    dataset = CocoDetectionDataset(image_dir, annotation_file)
    assert dataset.lvis_frequencies() == {3: "f", 7: "c", 42: "r"}  # the file's, though every class has 1 image
    assert dataset.frequency_source == "the annotation file"
    document = json.loads(annotation_file.read_text())
    for category in document["categories"]:
        del category["frequency"]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(document))
    derived = CocoDetectionDataset(image_dir, plain)
    assert derived.frequency_groups is None
    assert derived.lvis_frequencies() == {3: "r", 7: "r", 42: "r"}  # 1 image each: rare (<= 10)
    assert derived.frequency_source == "the image counts of plain.json"


def test_crowd_annotations_are_dropped(hand_written):
    image, target = CocoDetectionDataset(*hand_written)[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 200 / 255))
    assert target["image_id"] == 5
    assert target["labels"].tolist() == [2, 3]
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [20, 4, 26, 8]]
    assert target["iscrowd"].tolist() == [0, 0]
    assert target["area"].tolist() == [50, 24]


def test_masks_from_polygons_and_rle(hand_written):
    _, target = CocoDetectionDataset(*hand_written, with_masks=True)[0]
    masks = target["masks"]
    assert masks.shape == (2, 20, 30) and masks.dtype == torch.uint8
    assert masks[1].sum() == 24 and masks[1, 4:8, 20:26].all()
    assert masks[0, 4:7, 3:11].all() and masks[0].sum() > 0


def test_grayscale_and_rgba_become_rgb_and_empty_image_has_empty_targets(hand_written):
    dataset = CocoDetectionDataset(*hand_written, with_masks=True)
    gray, _ = dataset[1]
    assert gray.shape == (3, 16, 16)
    rgba, target = dataset[2]
    assert rgba.shape == (3, 12, 12)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (0, 12, 12) and target["masks"].dtype == torch.uint8


def test_category_subset_and_unknown_ids(hand_written):
    dataset = CocoDetectionDataset(*hand_written, category_ids=[42, 7])
    assert dataset.label_to_category_id == {1: 7, 2: 42}
    assert dataset[0][1]["labels"].tolist() == [1, 2]
    assert dataset[1][1]["labels"].tolist() == []
    with pytest.raises(ValueError, match="available ids"):
        CocoDetectionDataset(*hand_written, category_ids=[8])


def test_transforms_hook_receives_numpy_and_may_drop_instances(hand_written):
    seen = {}

    def keep_first(image, target):
        seen["image"], seen["target"] = image, target
        target = dict(target)
        for key in ("boxes", "labels", "area", "iscrowd", "masks"):
            target[key] = target[key][:1]
        return image[:, ::-1], target

    _, target = CocoDetectionDataset(*hand_written, transforms=keep_first, with_masks=True)[0]
    assert seen["image"].dtype == np.uint8 and seen["image"].shape == (20, 30, 3)
    assert seen["target"]["boxes"].shape == (2, 4) and seen["target"]["masks"].shape == (2, 20, 30)
    assert target["labels"].tolist() == [2] and target["masks"].shape == (1, 20, 30)


def test_collate_detection(hand_written):
    dataset = CocoDetectionDataset(*hand_written)
    images, targets = collate_detection([dataset[0], dataset[2]])
    assert [tuple(i.shape) for i in images] == [(3, 20, 30), (3, 12, 12)]
    assert [t["image_id"] for t in targets] == [5, 11]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 3


def test_missing_files_give_clear_errors(hand_written, tmp_path):
    image_dir, annotation_file = hand_written
    with pytest.raises(FileNotFoundError, match="annotation file"):
        CocoDetectionDataset(image_dir, tmp_path / "missing.json")
    dataset = CocoDetectionDataset(image_dir, annotation_file)
    (image_dir / "gray.png").unlink()  # after construction, which checks that images exist
    with pytest.raises(FileNotFoundError, match="check image_dir"):
        dataset[1]
