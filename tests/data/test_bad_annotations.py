"""Bad COCO files and images: a clear error naming the record (or a reported skip), never a
crash deep inside torch. Each test starts from ``tiny_coco`` (3 images of 32 px) and breaks one thing."""
import json
import logging
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from broken_fixtures import SIZE, rle, tiny_coco
from PIL import Image
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from densekd.data import BadDatasetError, CocoDetectionDataset, collate_detection
from densekd.detection.experiment import training_data
from densekd.experiment.config import load_experiment_config
from densekd.experiment.phases import DataFiles

REPO = Path(__file__).resolve().parents[2]


def _dataset(fixture, **kwargs) -> CocoDetectionDataset:
    return CocoDetectionDataset(fixture.image_dir, fixture.annotation_file, **kwargs)


def _error(fixture, **kwargs) -> str:
    with pytest.raises(BadDatasetError) as caught:
        _dataset(fixture, **kwargs)
    message = str(caught.value)
    assert "\n" not in message  # one paragraph
    return message


def _record_error(fixture, **kwargs) -> str:
    """A bad record: the message names the file and offers skip_bad as a fix."""
    message = _error(fixture, **kwargs)
    assert str(fixture.annotation_file) in message and "skip_bad=True" in message and "--skip-bad" in message
    return message


# ------------------------------------------------------------------ the file itself
def test_missing_annotation_file_is_a_file_not_found_error(tmp_path):
    fixture = tiny_coco(tmp_path)
    missing = tmp_path / "nowhere.json"
    with pytest.raises(FileNotFoundError, match="annotation file not found") as caught:
        CocoDetectionDataset(fixture.image_dir, missing)
    assert isinstance(caught.value, BadDatasetError) and str(missing) in str(caught.value)


def test_file_that_is_not_json(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.annotation_file.write_text('{"images": [')  # truncated
    message = _error(fixture)
    assert str(fixture.annotation_file) in message and "not valid JSON" in message and "line 1" in message


def test_top_level_that_is_not_an_object(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.annotation_file.write_text(json.dumps(fixture.document["images"]))
    assert "top level is a JSON list" in _error(fixture)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_section(tmp_path, key):
    fixture = tiny_coco(tmp_path)
    del fixture.document[key]
    message = _error(fixture.write())
    assert f"no '{key}' list" in message and str(fixture.annotation_file) in message


# ------------------------------------------------------------------ ids and references
def test_duplicate_image_ids(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.image(3)["id"] = 2
    assert "image id 2 is used by 2 images" in _record_error(fixture.write())


def test_duplicate_annotation_ids(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.annotation(3)["id"] = 1
    assert "annotation id 1 is used by more than one annotation" in _record_error(fixture.write())


def test_duplicate_category_ids_stop_even_with_skip_bad(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.document["categories"][1]["id"] = 1
    for skip_bad in (False, True):
        message = _error(fixture.write(), skip_bad=skip_bad)
        assert "category id 1 is used by more than one category" in message and "skip_bad cannot fix" in message


@pytest.mark.parametrize("with_annotations", [True, False], ids=["annotations", "no_annotations"])
def test_empty_categories_stop_even_with_skip_bad(tmp_path, with_annotations):
    fixture = tiny_coco(tmp_path)
    fixture.document["categories"] = []
    if not with_annotations:
        fixture.document["annotations"] = []
    fixture.write()
    for skip_bad in (False, True):
        message = _error(fixture, skip_bad=skip_bad)
        assert f"{fixture.annotation_file}: 'categories' is empty" in message and "list the classes" in message


def test_annotation_of_an_unknown_image(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.annotation(3)["image_id"] = 99
    assert "annotation 3 refers to image_id 99, which is not in 'images'" in _record_error(fixture.write())


def test_annotation_of_an_unknown_category(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.annotation(3)["category_id"] = 9
    message = _record_error(fixture.write())
    assert "annotation 3 (image 2) has category_id 9, which is not in 'categories' (ids 1, 2)" in message


@pytest.mark.parametrize(
    "section, index, value, expected",
    [
        ("images", 1, 7, "images[1] is not a JSON object"),
        ("images", 1, {"id": "2", "file_name": "b.png"}, "images[1] (b.png) has id '2'; give it an integer id"),
        ("images", 1, {"id": 2}, "image 2 has no 'file_name'"),
        ("annotations", 2, None, "annotations[2] is not a JSON object"),
        ("annotations", 2, {"image_id": 2, "category_id": 1, "bbox": [4, 6, 12, 6]}, "annotations[2] has id None"),
    ],
)
def test_malformed_records(tmp_path, section, index, value, expected):
    fixture = tiny_coco(tmp_path)
    fixture.document[section][index] = value
    assert expected in _record_error(fixture.write())


# ------------------------------------------------------------------ boxes
@pytest.mark.parametrize(
    "bbox, problem",
    [
        ([2, 2, 10], "a bbox is [x, y, width, height]: 4 numbers"),
        ([2, 2, "10", 10], "a bbox is [x, y, width, height]: 4 numbers"),
        ([2, 2, 0, 10], "with width or height <= 0"),
        ([2, 2, 10, -3], "with width or height <= 0"),
        ([2, float("nan"), 10, 10], "non-finite bbox"),
        ([2, 2, float("inf"), 10], "non-finite bbox"),
    ],
)
def test_bad_bbox(tmp_path, bbox, problem):
    fixture = tiny_coco(tmp_path)
    fixture.annotation(1)["bbox"] = bbox  # json writes NaN / Infinity, which json.load reads back
    message = _record_error(fixture.write())
    assert "annotation 1 (image 1)" in message and problem in message


@pytest.mark.parametrize("bbox", [[40, 2, 5, 5], [2, 32, 5, 5], [-10, 2, 10, 5], [2, -9, 5, 8.5]])
def test_box_entirely_outside_the_image(tmp_path, bbox):
    fixture = tiny_coco(tmp_path)
    fixture.annotation(1)["bbox"] = bbox
    assert "annotation 1 (image 1)" in (message := _record_error(fixture.write())) and "entirely outside" in message


def test_box_partly_outside_is_clipped_and_counted_once(tmp_path, caplog):
    fixture = tiny_coco(tmp_path)
    fixture.annotation(1)["bbox"] = [-4, 20, 10, 20]  # x -4..6, y 20..40 on a 32 px image
    fixture.write()
    with caplog.at_level(logging.WARNING, logger="densekd.data.coco"):
        dataset = _dataset(fixture)
        _dataset(fixture)  # the same dataset again (as each training phase builds it): logged once
    assert dataset.report.clipped_boxes == [1] and dataset.report.num_dropped_annotations == 0
    logged = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert len(logged) == 1 and "1 box(es) partly outside their image are clipped" in logged[0]
    assert dataset[0][1]["boxes"][0].tolist() == [0, 20, 6, 32]


# ------------------------------------------------------------------ images
def test_image_missing_on_disk(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.image_path(2).unlink()
    message = _record_error(fixture)
    assert f"image 2 not found at {fixture.image_path(2)}" in message


def test_image_that_is_not_an_image(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.image_path(2).write_bytes(b"<html>404</html>")
    message = _record_error(fixture)
    assert f"image 2 at {fixture.image_path(2)} cannot be read as an image" in message


def test_image_size_different_from_the_file(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.image(2)["height"] = 40
    message = _record_error(fixture.write())
    assert f"image 2 at {fixture.image_path(2)} is 32x32 (width x height) but the annotation file says 32x40" in message


def test_float_image_has_no_rgb_rendering(tmp_path):
    fixture = tiny_coco(tmp_path)
    Image.fromarray(np.full((SIZE, SIZE), 0.5, np.float32)).save(fixture.image_dir / "float.tif")
    fixture.image(2)["file_name"] = "float.tif"
    assert "image 2 at" in (message := _record_error(fixture.write())) and "pixel mode 'F'" in message


def test_truncated_image_names_its_path_when_decoded(tmp_path):
    fixture = tiny_coco(tmp_path)
    _truncate(fixture.image_path(2))
    dataset = _dataset(fixture)  # the header is intact: only decoding fails
    with pytest.raises(BadDatasetError, match="could not be decoded") as caught:
        dataset[1]
    assert f"image 2 at {fixture.image_path(2)}" in str(caught.value)


def test_truncated_image_in_a_dataloader_worker_names_its_path(tmp_path):
    fixture = tiny_coco(tmp_path)
    _truncate(fixture.image_path(2))
    loader = torch.utils.data.DataLoader(_dataset(fixture), batch_size=1, num_workers=1, collate_fn=collate_detection)
    with pytest.raises(BadDatasetError) as caught:
        list(loader)
    assert "DataLoader worker" in str(caught.value) and str(fixture.image_path(2)) in str(caught.value)


def test_transform_errors_say_which_image(tmp_path):
    def broken_transform(image, target):
        raise RuntimeError("transform bug")

    dataset = _dataset(tiny_coco(tmp_path), transforms=broken_transform)
    with pytest.raises(RuntimeError, match="transform bug") as caught:  # the type stays: a bug is not bad data
        dataset[1]
    if sys.version_info >= (3, 11):
        assert any(str(dataset.image_path(2)) in note for note in caught.value.__notes__)


def _truncate(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("L", (90 / 255,) * 3),
        ("RGBA", (30 / 255, 60 / 255, 90 / 255)),
        ("P", (10 / 255, 20 / 255, 30 / 255)),
        ("I;16", (30000 / 65535,) * 3),
        ("I", (30000 / 65535,) * 3),
    ],
)
def test_image_modes_load_as_three_channels_in_the_unit_range(tmp_path, mode, expected):
    fixture = tiny_coco(tmp_path)
    if mode == "L":
        image = Image.fromarray(np.full((SIZE, SIZE), 90, np.uint8))
    elif mode == "RGBA":
        image = Image.fromarray(np.full((SIZE, SIZE, 4), (30, 60, 90, 128), np.uint8))
    elif mode == "P":
        image = Image.fromarray(np.zeros((SIZE, SIZE), np.uint8), mode="P")
        image.putpalette([10, 20, 30] + [0] * 765)
    else:  # 16-bit grayscale: PNG opens as I;16, a 32-bit TIFF as I
        image = Image.fromarray(np.full((SIZE, SIZE), 30000, np.uint16 if mode == "I;16" else np.int32))
    name = "gray16.tif" if mode == "I" else f"mode_{mode.replace(';', '')}.png"
    image.save(fixture.image_dir / name)
    assert Image.open(fixture.image_dir / name).mode == mode
    fixture.image(2)["file_name"] = name
    tensor, _ = _dataset(fixture.write())[1]
    assert tensor.shape == (3, SIZE, SIZE) and tensor.dtype == torch.float32
    for channel, value in zip(tensor, expected):
        assert torch.allclose(channel, torch.full_like(channel, value), atol=0.5 / 255)  # 8-bit rounding, not clipping


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("polygon, count", [([2, 2, 12, 2], 4), ([2, 2, 12, 2, 12, 12, 2], 7), ([], 0)])
def test_malformed_polygons(tmp_path, polygon, count):
    fixture = tiny_coco(tmp_path)
    fixture.annotation(3)["segmentation"] = [[4, 6, 16, 6, 16, 12], polygon]
    message = _record_error(fixture.write(), with_masks=True)
    assert f"annotation 3 (image 2) has polygon 1 with {count} coordinates" in message
    assert len(_dataset(fixture)) == 3  # box-only training does not read segmentations


def test_rle_of_the_wrong_size(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.annotation(2)["segmentation"] = rle(np.ones((16, 16)))
    message = _record_error(fixture.write(), with_masks=True)
    assert "annotation 2 (image 1) has an RLE mask of size [16, 16]" in message and "[32, 32]" in message


def test_valid_masks_still_load(tmp_path):
    _, target = _dataset(tiny_coco(tmp_path), with_masks=True)[0]
    assert target["masks"].shape == (2, SIZE, SIZE) and target["masks"][1].sum() == 64


# ------------------------------------------------------------------ empty images
def _tiny_backbone() -> nn.Module:
    class Backbone(nn.Sequential):
        out_channels = 32

        def forward(self, x):
            return OrderedDict([("0", super().forward(x))])

    return Backbone(nn.Conv2d(3, 32, 3, stride=4, padding=1), nn.ReLU())


def _tiny_faster_rcnn() -> nn.Module:
    anchors = AnchorGenerator(((8, 16),), ((1.0,),))
    return FasterRCNN(_tiny_backbone(), num_classes=3, rpn_anchor_generator=anchors,
                      box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), min_size=SIZE, max_size=SIZE)  # fmt: skip


def _tiny_fcos() -> nn.Module:
    anchors = AnchorGenerator(((8,),), ((1.0,),))
    return FCOS(_tiny_backbone(), num_classes=3, anchor_generator=anchors, min_size=SIZE, max_size=SIZE)


@pytest.mark.parametrize("build", [_tiny_faster_rcnn, _tiny_fcos], ids=["faster_rcnn", "fcos"])
def test_image_without_annotations_trains(tmp_path, build):
    dataset = _dataset(tiny_coco(tmp_path))
    image, target = dataset[2]  # image 3 has no annotations
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    torch.manual_seed(0)
    model = build().train()
    for images, targets in (collate_detection([dataset[2]]), collate_detection([dataset[0], dataset[2]])):
        losses = model(images, targets)
        total = sum(losses.values())
        assert math.isfinite(total.item())
        total.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------ skip_bad
def _break_several(fixture):
    fixture.image_path(2).unlink()  # drops image 2 and its annotations 3 and 4
    fixture.annotation(2)["bbox"] = [16, 16, 0, 8]  # drops annotation 2 alone
    return fixture.write()


def test_skip_bad_drops_bad_records_and_reports_them(tmp_path, caplog):
    fixture = _break_several(tiny_coco(tmp_path))
    message = _record_error(fixture)
    assert "image 2 not found" in message and "here 1 image(s) and 3 annotation(s)" in message

    with caplog.at_level(logging.WARNING, logger="densekd.data.coco"):
        dataset = _dataset(fixture, skip_bad=True)
    report = dataset.report
    assert report.dropped_images == {"missing on disk": [2]}
    assert report.dropped_annotations == {"of a dropped image": [3, 4], "with width or height <= 0": [2]}
    assert (report.num_dropped_images, report.num_dropped_annotations, report.images_kept, report.annotations_kept) == (1, 3, 2, 1)
    summary = report.summary()
    assert "skip_bad dropped 1 of 3 images and 3 of 4 annotations" in summary
    assert "1 missing on disk (ids 2)" in summary and "2 of a dropped image (ids 3, 4)" in summary
    assert [r.getMessage() for r in caplog.records] == [summary]

    # what is left loads, and evaluation (dataset.coco) sees the same records
    assert dataset.image_ids == [1, 3] and sorted(dataset.coco.anns) == [1]
    assert [dataset[i][1]["labels"].tolist() for i in range(len(dataset))] == [[1], []]


def test_skip_bad_drops_every_image_of_a_duplicate_id(tmp_path):
    fixture = tiny_coco(tmp_path)
    fixture.image(3)["id"] = 2
    dataset = _dataset(fixture.write(), skip_bad=True)
    assert dataset.image_ids == [1] and dataset.report.dropped_images == {"with a duplicate id": [2, 2]}
    assert dataset.report.dropped_annotations == {"of a dropped image": [3, 4]}


def test_skip_bad_from_the_experiment_config(tmp_path):
    fixture = _break_several(tiny_coco(tmp_path))
    config = load_experiment_config(None, ["data.skip_bad=true"])
    assert config.data.skip_bad is True
    files = DataFiles(fixture.annotation_file, fixture.image_dir, fixture.annotation_file, fixture.image_dir, "test")
    data = training_data(config, files, iterations=1, augment=False)
    assert data.annotations.report.num_dropped_annotations == 3 and len(data.dataset) == 2


def test_train_det_reports_a_bad_file_without_a_traceback(tmp_path):
    good = tiny_coco(tmp_path / "val")
    bad = tiny_coco(tmp_path / "train")
    bad.annotation(3)["category_id"] = 9
    bad.write()
    env = {**os.environ, "DENSEKD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_det.py"), "--threads", "1", "--output", str(tmp_path / "out"),
         "--train-ann", str(bad.annotation_file), "--train-images", str(bad.image_dir),
         "--val-ann", str(good.annotation_file), "--val-images", str(good.image_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"train_det: {bad.annotation_file}: annotation 3 (image 2) has category_id 9" in done.stderr
    assert "--skip-bad" in done.stderr
    assert not list((tmp_path / "out").rglob("*.pt*")) and not (tmp_path / "cache" / "teachers").exists()
