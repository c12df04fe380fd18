"""YOLO and Pascal VOC folders become COCO-format files that the dataset and COCO evaluation
read unchanged; bad input is one line naming the file and record, or dropped and counted.

The folders and their hand-converted boxes are in tests/helpers/format_folders.py."""
import json
import logging
import os

import pytest
import torch
from format_folders import (
    VOC_BOXES,
    VOC_IMAGES,
    VOC_NAMES,
    YOLO_BOXES,
    YOLO_NAMES,
    tiny_voc,
    tiny_yolo,
    voc_xml,
)

from densekd.data import BadDatasetError, CocoDetectionDataset
from densekd.data.conversion import ConvertedDataset
from densekd.data.validation import DatasetFileNotFoundError
from densekd.data.voc import voc_class_names, voc_to_coco
from densekd.data.yolo import yolo_class_names, yolo_to_coco
from densekd.evaluation import evaluate_coco


@pytest.fixture
def yolo(tmp_path):
    return tiny_yolo(tmp_path / "yolo")


@pytest.fixture
def voc(tmp_path):
    return tiny_voc(tmp_path / "voc")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _boxes(converted: ConvertedDataset) -> list:
    """``[(file_name, category_id, bbox, iscrowd), ...]`` of the converted file, in annotation order."""
    document = json.loads(converted.annotation_file.read_text())
    files = {image["id"]: image["file_name"] for image in document["images"]}
    return [(files[a["image_id"]], a["category_id"], a["bbox"], a["iscrowd"]) for a in document["annotations"]]


def _perfect_detections(converted: ConvertedDataset, with_crowd: bool) -> list:
    document = json.loads(converted.annotation_file.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in document["annotations"] if with_crowd or not a["iscrowd"]]  # fmt: skip


def _one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ YOLO


def test_yolo_boxes_categories_and_images_convert_as_worked_out_by_hand(yolo, cache):
    train = yolo_to_coco(yolo, "train", cache_dir=cache)
    assert train.categories == YOLO_NAMES and train.image_dir == yolo / "images" / "train"
    assert train.annotation_file.parent == cache and train.annotation_file.name.startswith("yolo-train-")
    assert train.report.clean and train.report.annotations_kept == 3
    document = json.loads(train.annotation_file.read_text())
    assert document["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [(i["file_name"], i["width"], i["height"]) for i in document["images"]] == [
        ("a.png", 64, 32), ("b.png", 32, 48), ("c.png", 40, 40), ("d.png", 48, 48)]  # fmt: skip
    assert _boxes(train) == [(f, c, b, 0) for f, c, b in YOLO_BOXES["train"]]
    assert [a["area"] for a in document["annotations"]] == [256, 128, 384]  # 16*16, 16*8, 16*24
    val = yolo_to_coco(yolo, "val", cache_dir=cache)
    assert _boxes(val) == [(f, c, b, 0) for f, c, b in YOLO_BOXES["val"]]


def test_yolo_dataset_targets_and_perfect_detections_score_ap_one(yolo, cache):
    train = yolo_to_coco(yolo, "train", cache_dir=cache)
    dataset = CocoDetectionDataset(train.image_dir, train.annotation_file)
    assert dataset.categories == ["cat", "dog"] and len(dataset) == 4
    image, target = dataset[0]  # a.png
    assert image.shape == (3, 32, 64)
    assert torch.equal(target["boxes"], torch.tensor([[24.0, 8, 40, 24], [40, 4, 56, 12]]))  # xywh -> xyxy
    assert target["labels"].tolist() == [1, 2]
    assert dataset[2][1]["boxes"].shape == (0, 4) and dataset[3][1]["boxes"].shape == (0, 4)  # c: no file, d: empty
    metrics = evaluate_coco(train.annotation_file, _perfect_detections(train, with_crowd=False))
    assert metrics["AP"] == pytest.approx(1.0)


def test_yolo_names_from_an_index_dict_a_classes_file_or_a_names_file(yolo):
    (yolo / "data.yaml").write_text("names:\n  1: dog\n  0: cat\n")
    assert yolo_class_names(yolo) == ["cat", "dog"]
    (yolo / "data.yaml").unlink()
    (yolo / "classes.txt").write_text("cat\ndog\n\n")
    assert yolo_class_names(yolo) == ["cat", "dog"]
    (yolo / "classes.txt").unlink()
    (yolo / "obj.names").write_text("cat\ndog\n")
    assert yolo_class_names(yolo) == ["cat", "dog"]


def test_yolo_names_problems_are_one_line_errors_with_the_fix(yolo, cache):
    (yolo / "data.yaml").write_text("nc: 2\ntrain: images/train\n")
    with pytest.raises(BadDatasetError) as error:
        yolo_to_coco(yolo, "train", cache_dir=cache)
    assert _one_line_error(error).startswith(f"{yolo / 'data.yaml'} has no 'names'; add data.yaml with names: [cat, dog]")
    (yolo / "data.yaml").write_text("names: {0: cat, 2: dog}\n")
    with pytest.raises(BadDatasetError, match=r"names keys are \[0, 2\] but must be the class indices 0\.\.1"):
        yolo_class_names(yolo)
    (yolo / "data.yaml").write_text("nc: 3\nnames: [cat, dog]\n")
    with pytest.raises(BadDatasetError, match="says nc: 3 but names has 2 classes"):
        yolo_class_names(yolo)
    (yolo / "data.yaml").write_text("names: [cat, no]\n")  # YAML reads `no` as False
    with pytest.raises(BadDatasetError, match="class name 1 is False; .* quote names such as 'yes', 'no'"):
        yolo_class_names(yolo)
    (yolo / "data.yaml").unlink()
    with pytest.raises(BadDatasetError, match=f"{yolo}: no class names; add data.yaml"):
        yolo_class_names(yolo)
    assert yolo_to_coco(yolo, "train", names=["cat", "dog"], cache_dir=cache).categories == ["cat", "dog"]


@pytest.mark.parametrize(
    "line, problem",
    [
        ("0 0.5 0.5 0.25", "'0 0.5 0.5 0.25' has 4 number(s); a YOLO label line is 'class cx cy w h'"),
        ("2 0.5 0.5 0.25 0.25", "has class index 2, but there are 2 classes (indices 0..1); fix the index, or add"),
        ("0 0.5 0.5 0.25 1.5", "has a coordinate outside [0, 1]; YOLO coordinates are divided by the image's"),
        ("0 0.5 0.5 0 0.25", "has a box of width or height <= 0"),
        ("cat 0.5 0.5 0.25 0.25", "is not all numbers"),
    ],
)
def test_a_bad_yolo_line_names_the_file_and_line_or_is_dropped_and_counted(yolo, cache, line, problem, caplog):
    label_file = yolo / "labels" / "train" / "a.txt"
    label_file.write_text(f"0 0.5 0.5 0.25 0.5\n{line}\n")
    with pytest.raises(BadDatasetError) as error:
        yolo_to_coco(yolo, "train", cache_dir=cache)
    message = _one_line_error(error)
    assert message.startswith(f"{label_file}:2: ") and problem in message
    assert "pass skip_bad=True (--skip-bad) to drop bad records (here 0 image(s) and 1 box(es))" in message

    with caplog.at_level(logging.WARNING, logger="densekd.data.conversion"):
        kept = yolo_to_coco(yolo, "train", skip_bad=True, cache_dir=cache)
    assert kept.report.num_dropped_annotations == 1 and kept.report.annotations_kept == 2
    assert list(kept.report.dropped_annotations.values()) == [["labels/train/a.txt:2"]]
    assert _boxes(kept) == [("a.png", 1, [24, 8, 16, 16], 0), ("b.png", 2, [0, 0, 16, 24], 0)]
    assert "skip_bad dropped 0 of 4 images and 1 of 3 annotations" in caplog.text


def test_yolo_tolerates_rounding_polygons_and_the_roboflow_layout(tmp_path, yolo, cache):
    (yolo / "labels" / "train" / "b.txt").write_text("1 0.5 0.5 0.5 1.0004\n0 0.25 0.25 0.5 0.25 0.5 0.75\n")
    converted = yolo_to_coco(yolo, "train", cache_dir=cache)  # 1.0004: within the tolerance (the dataset clips)
    assert _boxes(converted)[2:] == [("b.png", 2, [8.0, pytest.approx(-0.0096), 16.0, pytest.approx(48.0192)], 0),
                                     ("b.png", 1, [8.0, 12.0, 8.0, 24.0], 0)]  # polygon x 0.25..0.5, y 0.25..0.75  # fmt: skip
    roboflow = tmp_path / "roboflow"
    (roboflow / "valid").mkdir(parents=True)
    (yolo / "images" / "val").rename(roboflow / "valid" / "images")
    (yolo / "labels" / "val").rename(roboflow / "valid" / "labels")
    (roboflow / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnames: [cat, dog]\n")
    converted = yolo_to_coco(roboflow, "valid", cache_dir=cache)
    assert converted.image_dir == roboflow / "valid" / "images"
    assert _boxes(converted) == [("e.png", 1, [8, 8, 16, 16], 0)]
    hint = r"no images/val/ \(nor val/images/\) folder \(data.yaml says val: \.\./valid/images; .*check the dataset root"
    with pytest.raises(DatasetFileNotFoundError, match=hint):
        yolo_to_coco(roboflow, "val", cache_dir=cache)


def test_an_unreadable_yolo_image_is_named_or_dropped_with_its_labels(yolo, cache):
    (yolo / "images" / "train" / "b.png").write_bytes(b"not a png")
    with pytest.raises(BadDatasetError, match=f"{yolo / 'images' / 'train' / 'b.png'} cannot be read as an image"):
        yolo_to_coco(yolo, "train", cache_dir=cache)
    kept = yolo_to_coco(yolo, "train", skip_bad=True, cache_dir=cache)
    assert kept.report.dropped_images == {"unreadable": ["images/train/b.png"]}
    assert [f for f, *_ in _boxes(kept)] == ["a.png", "a.png"]


def test_the_cache_file_is_named_by_its_content_and_written_once(yolo, cache, monkeypatch):
    first = yolo_to_coco(yolo, "train", cache_dir=cache)
    written = first.annotation_file.stat().st_mtime_ns
    assert yolo_to_coco(yolo, "train", cache_dir=cache).annotation_file == first.annotation_file
    assert first.annotation_file.stat().st_mtime_ns == written  # not rewritten: the teacher cache keys on mtime
    (yolo / "labels" / "train" / "b.txt").write_text("0 0.25 0.25 0.5 0.5\n")
    changed = yolo_to_coco(yolo, "train", cache_dir=cache)
    assert changed.annotation_file != first.annotation_file
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.annotation_file.name, changed.annotation_file.name])
    monkeypatch.setenv("DENSEKD_CACHE", str(cache / "root"))
    assert yolo_to_coco(yolo, "train").annotation_file.parent == cache / "root" / "converted"


# ------------------------------------------------------------------------------------------ VOC


def test_voc_boxes_shift_by_one_pixel_and_difficult_boxes_become_crowd(voc, cache):
    train = voc_to_coco(voc, "train", cache_dir=cache)
    assert train.categories == VOC_NAMES and train.image_dir == voc / "JPEGImages"
    assert train.annotation_file.name.startswith("voc-train-")
    assert _boxes(train) == VOC_BOXES["train"]
    document = json.loads(train.annotation_file.read_text())
    assert [(i["file_name"], i["width"], i["height"]) for i in document["images"]] == [
        ("img1.jpg", 64, 48), ("img2.jpg", 32, 32), ("img3.jpg", 40, 32)]  # fmt: skip
    val = voc_to_coco(voc, "val", cache_dir=cache)  # names from the train split: bird stays category 1
    assert val.categories == VOC_NAMES and _boxes(val) == VOC_BOXES["val"]
    assert voc_class_names(voc, "val") == ["cat"]


def test_voc_dataset_leaves_difficult_boxes_out_and_evaluation_ignores_them(voc, cache):
    train = voc_to_coco(voc, "train", cache_dir=cache)
    dataset = CocoDetectionDataset(train.image_dir, train.annotation_file)
    _, target = dataset[0]  # img1: the difficult dog is not a training target
    assert torch.equal(target["boxes"], torch.tensor([[4.0, 8, 20, 24]])) and target["labels"].tolist() == [2]
    assert dataset[1][1]["boxes"].tolist() == [[0.0, 0.0, 32.0, 32.0]]  # xmin 1 .. xmax 32 covers the image
    for with_crowd in (False, True):  # missing the difficult box costs nothing; finding it gains nothing
        metrics = evaluate_coco(train.annotation_file, _perfect_detections(train, with_crowd))
        assert metrics["AP"] == pytest.approx(1.0)


def test_voc_explicit_names_and_a_class_outside_them(voc, cache):
    names = ["aeroplane", "bird", "cat", "dog"]
    assert voc_to_coco(voc, "val", names=names, cache_dir=cache).categories == names
    assert _boxes(voc_to_coco(voc, "val", names=names, cache_dir=cache)) == [("img4.jpg", 3, [2, 2, 16, 16], 0)]
    with pytest.raises(BadDatasetError) as error:
        voc_to_coco(voc, "train", names=["cat", "dog"], cache_dir=cache)
    assert _one_line_error(error).startswith(
        f"{voc / 'Annotations' / 'img3.xml'}: object 1 (bird): class 'bird' is not one of the 2 class names (cat, dog); "
        "fix the name, or add the class to names (--class-names FILE).")  # fmt: skip


def test_a_voc_xml_without_size_is_named_or_dropped_and_counted(voc, cache, caplog):
    xml = voc / "Annotations" / "img2.xml"
    xml.write_text(voc_xml("img2", *VOC_IMAGES["img2"]).replace("<size><width>32</width><height>32</height>", "<size>"))
    with pytest.raises(BadDatasetError) as error:
        voc_to_coco(voc, "train", cache_dir=cache)
    message = _one_line_error(error)
    assert message.startswith(f"{xml} has no <size> with positive integer <width> and <height>; add the image's size")
    assert "(here 1 image(s) and 0 box(es))" in message
    with caplog.at_level(logging.WARNING, logger="densekd.data.conversion"):
        kept = voc_to_coco(voc, "train", skip_bad=True, cache_dir=cache)
    assert kept.report.dropped_images == {"without a <size>": ["Annotations/img2.xml"]}
    assert [f for f, *_ in _boxes(kept)] == ["img1.jpg", "img1.jpg", "img3.jpg"]
    assert "skip_bad dropped 1 of 3 images and 0 of 3 annotations" in caplog.text


def test_a_voc_split_entry_without_its_xml_names_the_split_file_line(voc, cache):
    split_file = voc / "ImageSets" / "Main" / "train.txt"
    split_file.write_text("img1\nimg2\n\nimg9\nimg3\n")
    with pytest.raises(BadDatasetError) as error:
        voc_to_coco(voc, "train", cache_dir=cache)
    assert _one_line_error(error).startswith(
        f"{split_file}:4: image id 'img9' has no annotation file {voc / 'Annotations' / 'img9.xml'}; add the XML or "
        "remove the id from the split file.")  # fmt: skip
    assert voc_to_coco(voc, "train", skip_bad=True, cache_dir=cache).report.num_dropped_images == 1
    with pytest.raises(DatasetFileNotFoundError, match=r"test.txt \(splits there: train, val\)"):
        voc_to_coco(voc, "test", cache_dir=cache)


def test_bad_voc_objects_and_image_sizes_are_named(voc, cache):
    xml = voc / "Annotations" / "img1.xml"
    xml.write_text(voc_xml("img1", 64, 48, [("cat", 20, 9, 5, 24, 0), ("dog", 31, 1, 50, 10, 1)]))
    with pytest.raises(BadDatasetError, match=f"{xml}: object 1 \\(cat\\) has xmin 20, ymin 9, xmax 5, ymax 24"):
        voc_to_coco(voc, "train", cache_dir=cache)
    kept = voc_to_coco(voc, "train", skip_bad=True, cache_dir=cache)
    assert kept.report.dropped_annotations == {"with xmax < xmin or ymax < ymin": ["Annotations/img1.xml object 1"]}
    xml.write_text(voc_xml("img1", 48, 64, []))
    with pytest.raises(BadDatasetError, match=r"says <size> 48x64 \(width x height\) but .*img1.jpg is 64x48"):
        voc_to_coco(voc, "train", cache_dir=cache)
    xml.write_text(voc_xml("img1", 64, 48, []))
    (voc / "JPEGImages" / "img1.jpg").rename(voc / "JPEGImages" / "img1.png")
    with pytest.raises(BadDatasetError, match=f"{xml}: its image is missing \\(no JPEGImages/img1.jpg in {voc}\\); add"):
        voc_to_coco(voc, "train", cache_dir=cache)
    xml.write_text(voc_xml("img1", 64, 48, []).replace("img1.jpg", "img1.png"))  # <filename> names the file
    assert voc_to_coco(voc, "train", cache_dir=cache).report.clean
    assert not [p for p in cache.iterdir() if p.name.startswith(".")] and os.listdir(cache)  # no temporary files left
