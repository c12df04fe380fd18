"""tools/train_det.py and tools/eval_det.py read YOLO and Pascal VOC folders (--data-format,
--data-root, --train-split, --val-split): the splits are converted to COCO-format files in the
cache and flow into the COCO path. Each run here stops, before anything trains, at a check that
needs the data resolved (a training set smaller than one batch, a checkpoint's category order).

The folders are tests/helpers/format_folders.py's: YOLO train 4 images, VOC train 3 images."""
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from format_folders import VOC_NAMES, tiny_voc, tiny_yolo

from densekd.data.categories import write_categories

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_det():
    return _tool("train_det")


@pytest.fixture
def run(tmp_path, monkeypatch, train_det):
    """``run(*args)`` -> exit code of train_det, in-process, with the cache in ``tmp_path/cache``."""
    monkeypatch.setenv("DENSEKD_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield lambda *args: train_det.main(["--threads", "1", "--output", str(tmp_path / "out"), *args])
    torch.set_num_threads(threads)


def _converted(tmp_path, name: str) -> Path:
    (path,) = (tmp_path / "cache" / "converted").glob(f"{name}-*.json")
    return path


@pytest.mark.parametrize("data_format, build, images", [("yolo", tiny_yolo, 4), ("voc", tiny_voc, 3)])
def test_a_yolo_or_voc_folder_reaches_the_coco_path(tmp_path, run, capsys, data_format, build, images):
    root = build(tmp_path / data_format)
    assert run("--data-format", data_format, "--data-root", str(root)) == 2  # demo batch 8 > the training set
    captured = capsys.readouterr()
    train_ann = _converted(tmp_path, f"{data_format}-train")
    assert f"{data_format} data {root} as COCO-format files: train -> {train_ann}, val -> " in captured.out
    assert str(_converted(tmp_path, f"{data_format}-val")) in captured.out
    assert (f"train_det: {train_ann}: the training set has {images} image(s), {images} sample(s) per epoch: not one "
            "full batch of data.batch_size=8") in captured.err  # fmt: skip
    assert not (tmp_path / "cache" / "teachers").exists()


def test_a_bad_yolo_line_stops_the_run_in_one_line_or_is_skipped_and_reported(tmp_path, run, capsys, caplog):
    root = tiny_yolo(tmp_path / "yolo")
    (root / "labels" / "train" / "b.txt").write_text("1 0.25 0.25 0.5\n")
    assert run("--data-format", "yolo", "--data-root", str(root)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"train_det: {root / 'labels' / 'train' / 'b.txt'}:1: ")
    with caplog.at_level(logging.WARNING, logger="densekd.data.conversion"):
        assert run("--data-format", "yolo", "--data-root", str(root), "--skip-bad") == 2  # then: batch 8 > 4 images
    assert "skip_bad dropped 0 of 4 images and 1 of 3 annotations" in caplog.text
    assert "the training set has 4 image(s)" in capsys.readouterr().err


def test_data_flags_of_the_other_format_are_refused(tmp_path, run, capsys):
    root = tiny_yolo(tmp_path / "yolo")
    assert run("--data-format", "yolo", "--data-root", str(root), "--train-ann", "a.json") == 2
    assert ("train_det: --train-ann name COCO-format files, but --data-format is yolo: give the dataset folder as "
            "--data-root") in capsys.readouterr().err  # fmt: skip
    assert run("--data-root", str(root)) == 2
    assert "--data-root and --class-names are for --data-format yolo or voc" in capsys.readouterr().err
    assert run("--data-format", "voc") == 2
    assert "--data-format voc needs --data-root" in capsys.readouterr().err


def test_class_names_file_and_splits_of_any_name(tmp_path, run, capsys):
    root = tiny_voc(tmp_path / "voc")
    (root / "ImageSets" / "Main" / "val.txt").rename(root / "ImageSets" / "Main" / "test.txt")
    names = tmp_path / "names.txt"
    names.write_text("aeroplane\nbird\ncat\ndog\n")
    assert run("--data-format", "voc", "--data-root", str(root), "--val-split", "test", "--class-names", str(names)) == 2
    assert "the training set has 3 image(s)" in capsys.readouterr().err
    categories = json.loads(_converted(tmp_path, "voc-test").read_text())["categories"]
    assert [c["name"] for c in categories] == ["aeroplane", "bird", "cat", "dog"]


def test_eval_det_reads_a_voc_folder_with_the_training_splits_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DENSEKD_CACHE", str(tmp_path / "cache"))
    root = tiny_voc(tmp_path / "voc")  # val holds only a cat: its classes still come from train
    checkpoint = tmp_path / "student.pth"
    torch.save({}, checkpoint)  # never loaded: the category order is checked first
    write_categories(checkpoint, VOC_NAMES[::-1])
    threads = torch.get_num_threads()
    try:
        code = _tool("eval_det").main(["--threads", "1", "--ckpt", str(checkpoint), "--data-format", "voc",
                                       "--data-root", str(root)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 2
    error = capsys.readouterr().err
    assert f"eval_det: {checkpoint} was trained with the same categories in another order" in error
    assert "label 1 is 'dog' there but 'bird' here" in error
