import json

import numpy as np
import pytest
from PIL import Image

from densekd.data import CocoDetectionDataset, DetectionTransform, build_detection_transforms


def _sample(size=64, boxes=((10, 5, 20, 25), (30, 30, 50, 40), (0, 50, 8, 64)), masks=True, image_id=7):
    """uint8 (size, size, 3) gradient image; rectangle masks equal to the boxes; labels 1..M."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    m = np.zeros((len(b), size, size), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(b.astype(int)):
        m[i, y0:y1, x0:x1] = 1
    target = {
        "boxes": b,
        "labels": np.arange(1, len(b) + 1, dtype=np.int64),
        "image_id": image_id,
        "area": ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float32),
        "iscrowd": np.zeros(len(b), np.int64),
        "track": np.arange(100, 100 + len(b)),  # an extra per-instance field
    }
    if masks:
        target["masks"] = m
    return image, target


def _mask_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_flip_moves_box_and_mask_together():
    image, target = _sample()
    transform = build_detection_transforms(strength=1.0, hflip=1.0, scale_jitter=0.0, color_jitter=0.0, seed=0)
    out_image, out = transform(image, target)
    assert out_image.shape == (64, 64, 3) and out_image.dtype == np.uint8
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    # a box at x 10-20 in a 64 px image flips to 44-54
    np.testing.assert_allclose(out["boxes"][0], [44, 5, 54, 25])
    np.testing.assert_allclose(out["boxes"][1], [14, 30, 34, 40])
    assert out["labels"].tolist() == [1, 2, 3]
    assert out["track"].tolist() == [100, 101, 102]
    assert out["masks"].shape == (3, 64, 64) and out["masks"].dtype == np.uint8
    for box, mask in zip(out["boxes"], out["masks"]):
        np.testing.assert_allclose(_mask_box(mask), box)
    np.testing.assert_allclose(out["area"], target["area"])
    assert out["image_id"] == 7


def test_dropped_boxes_keep_other_fields_aligned():
    boxes = [(2, 2, 12, 12), (27, 27, 37, 37), (52, 52, 62, 62), (2, 52, 12, 62), (40, 4, 60, 14)]
    dropped_somewhere = False
    for seed in range(6):
        image, target = _sample(boxes=boxes)
        transform = build_detection_transforms(scale_jitter=0.6, seed=seed)
        _, out = transform(image, target)
        m = len(out["boxes"])
        dropped_somewhere |= m < len(boxes)
        assert out["labels"].shape == (m,) and out["iscrowd"].shape == (m,) and out["area"].shape == (m,)
        assert out["masks"].shape == (m, 64, 64)
        assert (out["track"] - 100 + 1).tolist() == out["labels"].tolist()
        for box, mask, area in zip(out["boxes"], out["masks"], out["area"]):
            np.testing.assert_allclose(_mask_box(mask), box, atol=1.5)
            assert area == mask.sum()
    assert dropped_somewhere, "a 1.6x zoom should push a corner box out in 6 draws"


def test_boxes_without_masks_scale_area_with_the_box():
    image, target = _sample(masks=False)
    _, out = build_detection_transforms(scale_jitter=0.3, hflip=0.0, color_jitter=0.0, seed=3)(image, target)
    assert "masks" not in out
    kept = out["labels"] - 1
    old = target["boxes"][kept]
    ratio = ((out["boxes"][:, 2] - out["boxes"][:, 0]) * (out["boxes"][:, 3] - out["boxes"][:, 1])) / (
        (old[:, 2] - old[:, 0]) * (old[:, 3] - old[:, 1])
    )
    np.testing.assert_allclose(out["area"], target["area"][kept] * ratio, rtol=1e-5)


def test_strength_zero_is_identity_and_set_strength_rebuilds():
    image, target = _sample()
    transform = build_detection_transforms(strength=0.0, hflip=1.0, scale_jitter=0.0, color_jitter=0.0, seed=0)
    out_image, out = transform(image.copy(), {k: (v.copy() if hasattr(v, "copy") else v) for k, v in target.items()})
    np.testing.assert_array_equal(out_image, image)
    assert out.keys() == target.keys()
    for key in target:
        np.testing.assert_array_equal(out[key], target[key])
    transform.set_strength(1.0)  # flip p = 1 at strength 1
    _, flipped = transform(image, target)
    np.testing.assert_allclose(flipped["boxes"][0], [44, 5, 54, 25])
    assert transform.pipeline is not None
    transform.set_strength(0.0)
    assert transform.pipeline is None


def test_same_seed_same_output_and_epochs_differ():
    image, target = _sample()
    a, b = build_detection_transforms(seed=11), build_detection_transforms(seed=11)
    first_a = [a(image, target) for _ in range(3)]
    first_b = [b(image, target) for _ in range(3)]
    for (ia, ta), (ib, tb) in zip(first_a, first_b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ta["boxes"], tb["boxes"])
        np.testing.assert_array_equal(ta["masks"], tb["masks"])
    # repeated image within an epoch gets fresh draws; replaying the epoch repeats them
    assert not all(np.array_equal(first_a[0][0], x[0]) for x in first_a[1:])
    a.set_epoch(0)
    np.testing.assert_array_equal(a(image, target)[0], first_a[0][0])
    a.set_epoch(1)
    assert not np.array_equal(a(image, target)[0], first_a[0][0])
    other = build_detection_transforms(seed=12)
    assert not np.array_equal(other(image, target)[0], first_a[0][0])


def test_empty_target():
    image, target = _sample(boxes=np.zeros((0, 4)))
    _, out = build_detection_transforms(seed=0)(image, target)
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["masks"].shape == (0, 64, 64)


def test_errors():
    with pytest.raises(ValueError, match="strength"):
        build_detection_transforms(strength=-1)
    with pytest.raises(ValueError, match="scale_jitter"):
        build_detection_transforms(strength=2.0, scale_jitter=0.5)
    with pytest.raises(ValueError, match="probability"):
        build_detection_transforms(hflip=1.5)
    with pytest.raises(ValueError, match="uint8"):
        build_detection_transforms()(np.zeros((8, 8, 3), np.float32), _sample(size=8, boxes=np.zeros((0, 4)))[1])
    assert "seed=3" in repr(DetectionTransform(seed=3))


def test_plugs_into_coco_dataset(tmp_path):
    image, target = _sample(size=32, boxes=((4, 4, 12, 20),))
    Image.fromarray(image).save(tmp_path / "a.png")
    document = {
        "images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}],
        "categories": [{"id": 1, "name": "box"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 8, 16], "area": 128,
                         "iscrowd": 0, "segmentation": [[4, 4, 12, 4, 12, 20, 4, 20]]}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(document))
    transforms = build_detection_transforms(hflip=1.0, scale_jitter=0.0, color_jitter=0.0, seed=0)
    dataset = CocoDetectionDataset(tmp_path, tmp_path / "ann.json", transforms=transforms, with_masks=True)
    out_image, out = dataset[0]
    assert out_image.shape == (3, 32, 32)
    assert out["boxes"].tolist() == [[20.0, 4.0, 28.0, 20.0]]
    assert out["masks"].shape == (1, 32, 32)
