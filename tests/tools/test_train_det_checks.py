"""tools/train_det.py refuses, before anything trains, an output folder it cannot use, teacher
checkpoints that are missing or list the dataset's categories in another order, a training
set that fills no batch, and a recipe whose terms cannot pair the student with the teacher."""
import collections
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import densekd.training.output_folder as output_checks
from densekd.data import BadDatasetError, SyntheticConfig, generate_synthetic_dataset
from densekd.data.categories import write_categories
from densekd.experiment.config import load_experiment_config
from densekd.experiment.phases import DataFiles

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_det():
    spec = importlib.util.spec_from_file_location("train_det", REPO / "tools" / "train_det.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def paths(tmp_path):
    config = SyntheticConfig(num_train=8, num_val=4, image_size=64, max_object_size=32)
    return generate_synthetic_dataset(tmp_path / "data", config)


@pytest.fixture
def run(tmp_path, monkeypatch, train_det, paths):
    """``run(*extra_args)`` -> exit code of train_det on a tiny COCO-format dataset, in-process."""
    monkeypatch.setenv("DENSEKD_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    data = ["--train-ann", str(paths.train_ann), "--train-images", str(paths.train_images),
            "--val-ann", str(paths.val_ann), "--val-images", str(paths.val_images)]  # fmt: skip
    yield lambda *args: train_det.main(["--threads", "1", *data, *args])
    torch.set_num_threads(threads)


def nothing_trained(tmp_path) -> bool:
    return not (tmp_path / "cache" / "teachers").exists() and not list(tmp_path.rglob("*.ckpt"))


def test_teacher_checkpoint_with_categories_in_another_order_is_refused(tmp_path, run, paths, capsys):
    categories = sorted(json.loads(Path(paths.val_ann).read_text())["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in categories]  # the dataset's label order
    teacher = tmp_path / "teacher.pth"
    torch.save({}, teacher)  # never loaded: the order is checked first
    write_categories(teacher, names[::-1])
    assert run("--teacher-ckpt", str(teacher), "--output", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert f"train_det: {teacher} was trained with the same categories in another order" in error
    assert f"label 1 is {names[-1]!r} there but {names[0]!r} here" in error
    assert nothing_trained(tmp_path)

    write_categories(teacher, [f"class{i}" for i in range(len(names))])
    assert run("--teacher-ckpt", str(teacher), "--output", str(tmp_path / "out")) == 2
    assert f"{teacher} was trained on other categories" in capsys.readouterr().err


def test_eval_det_refuses_a_checkpoint_whose_categories_come_in_another_order(tmp_path, paths, capsys):
    spec = importlib.util.spec_from_file_location("eval_det", REPO / "tools" / "eval_det.py")
    eval_det = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_det)
    names = [c["name"] for c in sorted(json.loads(Path(paths.val_ann).read_text())["categories"], key=lambda c: c["id"])]
    checkpoint = tmp_path / "student.pth"
    torch.save({}, checkpoint)  # never loaded: the order is checked first
    write_categories(checkpoint, names[1:] + names[:1])
    threads = torch.get_num_threads()
    try:
        code = eval_det.main(["--threads", "1", "--ckpt", str(checkpoint), "--val-ann", str(paths.val_ann),
                              "--val-images", str(paths.val_images)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 2
    assert f"eval_det: {checkpoint} was trained with the same categories in another order" in capsys.readouterr().err


def test_missing_teacher_checkpoint_is_refused_before_training(tmp_path, run, capsys):
    assert run("--teacher-ckpt", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "out")) == 2
    assert f"teacher.checkpoint {tmp_path / 'nope.pth'} does not exist" in capsys.readouterr().err
    assert nothing_trained(tmp_path)


def test_unusable_output_folder_is_refused_before_the_teacher_trains(tmp_path, run, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    assert run("--output", str(tmp_path / "a_file" / "out")) == 1
    assert f"Cannot create the output folder {tmp_path / 'a_file' / 'out'}" in capsys.readouterr().err

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output_checks.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 10**6, 10**6))
    assert run("--output", str(tmp_path / "out")) == 1
    error = capsys.readouterr().err
    assert f"Not enough free space in {tmp_path / 'out'}: this run's checkpoints and weights need about" in error
    assert "only 976.6 KiB (1000000 bytes) are free" in error
    assert nothing_trained(tmp_path)


def test_a_training_set_smaller_than_one_batch_is_refused_before_the_teacher_trains(tmp_path, run, paths, capsys):
    assert run("--output", str(tmp_path / "out"), "--set", "data.batch_size=12") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert (f"train_det: {paths.train_ann}: the training set has 8 image(s), 8 sample(s) per epoch: not one full batch "
            "of data.batch_size=12") in error  # fmt: skip
    assert "set data.batch_size to at most 8 (--set data.batch_size=8), or add training images." in error
    assert nothing_trained(tmp_path)


def test_training_set_check_counts_samples_per_process(paths):
    from densekd.detection.experiment import DETECTION
    from densekd.experiment.phases import check_training_set

    files = DataFiles(paths.train_ann, paths.train_images, paths.val_ann, paths.val_images, "test")
    config = load_experiment_config(None, ["data.dataset=coco", "data.batch_size=8"])
    check_training_set(config, files, task=DETECTION)  # 8 images fill one batch of 8
    with pytest.raises(BadDatasetError, match=r"8 image\(s\), 4 sample\(s\) per epoch on each of 2 processes.*"
                                              r"at most 4 \(--set data.batch_size=4\) or use fewer processes"):  # fmt: skip
        check_training_set(config, files, rank=1, world_size=2, task=DETECTION)


def test_a_recipe_whose_terms_cannot_pair_is_refused_before_the_teacher_trains(tmp_path, run, capsys):
    # The demo recipe distils FCOS's per-anchor cls_logits: a Faster R-CNN student has none.
    student = "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert run("--set", f"student.name={student}", "--set", "student.image_size=64", "--output", str(tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert f"recipe logit_cwd: its terms cannot distil {student} from fcos_resnet34_fpn128" in error
    assert "cls_logits" in error
    assert len(error.strip().splitlines()) == 1
    assert nothing_trained(tmp_path)
