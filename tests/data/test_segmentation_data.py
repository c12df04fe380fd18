"""Semantic-segmentation data: COCO instances rendered to exact masks, mask folders and their
errors, joint image/mask transforms, collation."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from densekd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MaskFolderDataset,
    SemanticSegmentationDataset,
    build_segmentation_transforms,
    collate_segmentation,
)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box(shape, rows, cols) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return mask


def _instance(ann_id, image_id, category_id, mask, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": iscrowd,
            "area": float(mask.sum()), "bbox": [0, 0, 1, 1], "segmentation": _rle(mask)}  # fmt: skip


@pytest.fixture()
def two_images(tmp_path):
    """Image 1 (10x12): a large 'cat' (id 7) with a small 'car' (id 3) on top, listed first in
    the file; a 'cat' crowd region; a polygon 'kite' (id 42). Image 2 (8x8): two equal-area
    'car'/'kite' instances overlapping (the later one listed is on top) and a crowd region that
    an instance covers partly."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((10, 12, 3), 120, np.uint8)).save(images / "one.png")
    Image.fromarray(np.full((8, 8, 3), 60, np.uint8)).save(images / "two.png")
    one, two = (10, 12), (8, 8)
    annotations = [
        _instance(1, 1, 3, _box(one, (3, 5), (5, 7))),  # small car, 4 px, first in the file
        _instance(2, 1, 7, _box(one, (1, 7), (1, 9))),  # large cat, 48 px, under the car
        _instance(3, 1, 7, _box(one, (8, 10), (0, 4)), iscrowd=1),  # cat crowd -> ignore
        {"id": 4, "image_id": 1, "category_id": 42, "iscrowd": 0, "area": 4.0, "bbox": [9, 7, 2, 2],
         "segmentation": [[9, 7, 11, 7, 11, 9, 9, 9]]},  # polygon: pixels rows 7-8, cols 9-10
        _instance(5, 2, 42, _box(two, (1, 4), (1, 4))),  # 9 px
        _instance(6, 2, 3, _box(two, (2, 5), (2, 5))),  # 9 px, later: on top
        _instance(7, 2, 3, _box(two, (5, 8), (0, 8)), iscrowd=1),  # crowd rows 5-7
        _instance(8, 2, 7, _box(two, (6, 8), (6, 8))),  # instance inside the crowd wins
    ]  # fmt: skip
    document = {
        "images": [{"id": 1, "file_name": "one.png", "height": 10, "width": 12},
                   {"id": 2, "file_name": "two.png", "height": 8, "width": 8}],
        "categories": [{"id": 42, "name": "kite", "frequency": "r"}, {"id": 3, "name": "car", "frequency": "f"},
                       {"id": 7, "name": "cat", "frequency": "c"}],
        "annotations": annotations,
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(document))
    return images, path


def _expected_masks():
    """Labels in sorted category-id order: car (3) -> 1, cat (7) -> 2, kite (42) -> 3."""
    one = np.zeros((10, 12), np.uint8)
    one[1:7, 1:9] = 2  # cat
    one[3:5, 5:7] = 1  # car on top (smaller area), although listed first
    one[8:10, 0:4] = 255  # crowd
    one[7:9, 9:11] = 3  # kite polygon
    two = np.zeros((8, 8), np.uint8)
    two[1:4, 1:4] = 3  # kite
    two[2:5, 2:5] = 1  # car: equal area, later in the file -> on top
    two[5:8, 0:8] = 255  # crowd
    two[6:8, 6:8] = 2  # cat instance over the crowd
    return one, two


def test_instances_render_to_the_exact_semantic_mask(two_images):
    dataset = SemanticSegmentationDataset(*two_images)
    assert dataset.num_classes == 3 and dataset.categories == ["car", "cat", "kite"]
    assert dataset.label_to_category_id == {1: 3, 2: 7, 3: 42}
    assert dataset.frequency_groups == ["f", "c", "r"]
    expected_one, expected_two = _expected_masks()
    for index, expected in enumerate((expected_one, expected_two)):
        image, mask = dataset[index]
        assert image.shape == (3, *expected.shape) and image.dtype == torch.float32
        assert torch.allclose(image, torch.full_like(image, (120 if index == 0 else 60) / 255))
        assert mask.dtype == torch.int64
        np.testing.assert_array_equal(mask.numpy(), expected)
    assert dataset.image_labels() == [[1, 2, 3], [1, 2, 3]]
    assert dataset.image_counts == [2, 2, 2]
    pixels = [int((expected_one == c).sum() + (expected_two == c).sum()) for c in range(4)]  # background first
    assert dataset.pixel_counts == pixels[1:] and dataset.channel_pixel_counts == pixels
    assert dataset.channel_image_counts == [2, 2, 2, 2]


def test_category_mapping_orders_labels_and_drops_the_rest_to_background(two_images):
    dataset = SemanticSegmentationDataset(*two_images, categories=["kite", 3])  # by name or id, in label order
    assert dataset.categories == ["kite", "car"] and dataset.label_to_category_id == {1: 42, 2: 3}
    _, mask = dataset[0]
    expected = np.zeros((10, 12), np.uint8)
    expected[3:5, 5:7] = 2  # car; the cat and the cat crowd are background now
    expected[7:9, 9:11] = 1
    np.testing.assert_array_equal(mask.numpy(), expected)
    with pytest.raises(ValueError, match=r"categories \['airplane'.*are not in .*named car, cat, kite"):
        SemanticSegmentationDataset(*two_images, categories="voc")
    with pytest.raises(ValueError, match="twice"):
        SemanticSegmentationDataset(*two_images, categories=[3, "car"])


def test_synthetic_json_renders_every_visible_mask(tmp_path):
    from densekd.data import SyntheticConfig, generate_synthetic_dataset

    paths = generate_synthetic_dataset(tmp_path, SyntheticConfig(num_train=24, num_val=12, image_size=64, max_object_size=32))
    dataset = SemanticSegmentationDataset(paths.train_images, paths.train_ann)
    assert dataset.num_classes == 12 and dataset.frequency_groups is not None
    coco = dataset.coco
    for index in range(3):
        image_id = dataset.image_ids[index]
        _, mask = dataset[index]
        for annotation in coco.imgToAnns[image_id]:  # visible masks do not overlap: each keeps all its pixels
            pixels = torch.from_numpy(coco.annToMask(annotation)).bool()
            assert (mask[pixels] == dataset.category_id_to_label[annotation["category_id"]]).all()


def _write_mask_folder(root, masks, image_sizes=None, extra_images=(), extra_masks=()):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for stem, mask in masks.items():
        size = (image_sizes or {}).get(stem, mask.shape)
        Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(root / "images" / f"{stem}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    for name in extra_images:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / name)
    for name in extra_masks:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / name)
    return root / "images", root / "masks"


def test_mask_folder_pairs_by_stem_and_counts_classes(tmp_path):
    a = np.array([[0, 1, 1], [2, 255, 0]], np.uint8)
    b = np.array([[3, 3, 0], [0, 0, 1]], np.uint8)
    images, masks = _write_mask_folder(tmp_path, {"b": b, "a": a})
    dataset = MaskFolderDataset(images, masks, ["road", "car", "tree"])
    assert dataset.stems == ["a", "b"] and len(dataset) == 2
    image, mask = dataset[0]
    assert image.shape == (3, 2, 3)
    np.testing.assert_array_equal(mask.numpy(), a)
    assert dataset.image_labels() == [[1, 2], [1, 3]]
    assert dataset.image_counts == [2, 1, 1] and dataset.pixel_counts == [3, 1, 2]
    assert dataset.channel_image_counts == [2, 2, 1, 1] and dataset.channel_pixel_counts == [5, 3, 1, 2]  # 255 not counted
    batch_images, batch_masks = collate_segmentation([dataset[0], dataset[1]])
    assert batch_images.shape == (2, 3, 2, 3) and batch_masks.shape == (2, 2, 3) and batch_masks.dtype == torch.int64


def test_mask_folder_errors_name_the_problem(tmp_path):
    good = np.zeros((4, 4), np.uint8)
    images, masks = _write_mask_folder(tmp_path / "unpaired", {"a": good}, extra_images=["lonely.jpg"], extra_masks=["orphan.png"])
    with pytest.raises(ValueError, match=r"(?s)1 image\(s\).*lonely\.jpg.*1 mask\(s\) have no image.*orphan\.png"):
        MaskFolderDataset(images, masks, ["x"])

    images, masks = _write_mask_folder(tmp_path / "size", {"a": good}, image_sizes={"a": (5, 4)})
    with pytest.raises(ValueError, match=r"a\.jpg is 5x4 \(HxW\) but its mask a\.png is 4x4"):
        MaskFolderDataset(images, masks, ["x"])[0]

    bad = good.copy()
    bad[0, 0], bad[1, 1] = 7, 255  # 7 >= K + 1 = 3; 255 is fine
    images, masks = _write_mask_folder(tmp_path / "values", {"a": bad})
    with pytest.raises(ValueError, match=r"holds values \[7\] outside 0\.\.2"):
        MaskFolderDataset(images, masks, ["x", "y"])[0]

    images, masks = _write_mask_folder(tmp_path / "rgb", {"a": good})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(masks / "a.png")
    with pytest.raises(ValueError, match="mode RGB; masks must be single-channel"):
        MaskFolderDataset(images, masks, ["x"])[0]
    with pytest.raises(ValueError, match="class_names is empty"):
        MaskFolderDataset(images, masks, [])


def _striped_sample(height=32, width=32):
    """Class c in columns [8c, 8c + 8) (c = 0..3), each class a distinct grey level."""
    mask = (np.arange(width)[None, :] // 8).repeat(height, axis=0).astype(np.uint8)  # (H, W)
    image = np.repeat((40 + 50 * mask)[..., None], 3, axis=2).astype(np.uint8)  # (H, W, 3)
    return image, mask


def _denormalize(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)


def test_flip_and_zoom_keep_image_and_mask_aligned():
    image, mask = _striped_sample()
    flipped = build_segmentation_transforms(32, hflip=1.0, seed=0)
    out_image, out_mask = flipped(image, mask, 1)
    np.testing.assert_array_equal(out_mask.numpy(), mask[:, ::-1])
    np.testing.assert_allclose(_denormalize(out_image), image[:, ::-1].astype(np.float32), atol=1e-3)

    zoom = build_segmentation_transforms(32, scale_jitter=0.5, seed=0)
    outs = [zoom(image, mask, key) for key in range(6)]
    assert any((m == 255).any() for _, m in outs) and any(not (m == 255).any() for _, m in outs)  # out and in
    for out_image, out_mask in outs:
        values = set(out_mask.unique().tolist())
        assert values <= {0, 1, 2, 3, 255}  # nearest-neighbour: no blended labels
        grey = _denormalize(out_image)[..., 0]
        labelled = out_mask.numpy()
        # away from stripe borders, every labelled pixel shows its class's grey level
        inner = np.zeros_like(labelled, dtype=bool)
        inner[1:-1, 1:-1] = (labelled[1:-1, 1:-1] == labelled[1:-1, :-2]) & (labelled[1:-1, 1:-1] == labelled[1:-1, 2:])
        inner &= labelled != 255
        assert inner.sum() > 100
        np.testing.assert_allclose(grey[inner], 40 + 50 * labelled[inner].astype(np.float32), atol=2.0)


def test_resize_keeps_aspect_ratio_pads_with_ignore_and_normalizes():
    image = np.full((20, 40, 3), [round(255 * m) for m in IMAGENET_MEAN], np.uint8)
    mask = np.ones((20, 40), np.uint8)
    out_image, out_mask = build_segmentation_transforms(16, strength=0.0)(image, mask, 0)
    assert out_image.shape == (3, 16, 16) and out_mask.shape == (16, 16)
    assert out_image.abs().max() < 0.01  # the ImageNet mean colour normalizes to 0 (padding too)
    rows = (out_mask == 1).all(dim=1)
    assert rows.sum() == 8 and (out_mask[~rows] == 255).all()  # 20x40 -> 8x16, centred, rest ignored


def test_seeded_draws_repeat_and_differ_by_epoch_and_key():
    image, mask = _striped_sample()
    options = dict(hflip=0.5, scale_jitter=0.3, color_jitter=0.3, seed=3)
    first, second = build_segmentation_transforms(32, **options), build_segmentation_transforms(32, **options)
    draws = [first(image, mask, key)[0] for key in range(4)]
    assert all(torch.equal(a, second(image, mask, key)[0]) for key, a in enumerate(draws))
    assert not torch.equal(draws[0], draws[1])
    first.set_epoch(1)
    assert not torch.equal(first(image, mask, 0)[0], draws[0])
    with pytest.raises(ValueError, match="must have the same size"):
        first(image, mask[:-1], 0)


def test_collate_refuses_mixed_sizes():
    with pytest.raises(ValueError, match="different sizes"):
        collate_segmentation([(torch.zeros(3, 4, 4), torch.zeros(4, 4)), (torch.zeros(3, 5, 4), torch.zeros(5, 4))])
