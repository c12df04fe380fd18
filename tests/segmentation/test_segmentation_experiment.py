"""Segmentation experiments: which data, which sizes, what the teacher cache keys on, and the
augmentation a phase trains with."""
import sys
from pathlib import Path

import pytest
import torch

from densekd.data import BadDatasetError, SemanticSegmentationDataset
from densekd.experiment.config import ConfigError, load_experiment_config
from densekd.segmentation.experiment import SEGMENTATION, segmentation_data_files, segmentation_training_data

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "experiments" / "seg_demo.yaml"
TINY = ["data.synthetic={num_train: 24, num_val: 12, image_size: 64, max_object_size: 32}", "teacher.image_size=64",
        "student.image_size=64"]  # fmt: skip


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEKD_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_categories_change_the_data_fingerprint_and_sizes_must_agree(cache):
    everything = segmentation_data_files(load_experiment_config(DEMO, TINY))
    assert everything.dataset == "synthetic" and everything.image_size == 64
    subset = segmentation_data_files(load_experiment_config(DEMO, TINY + ["data.categories=[3, red_square]"]))
    assert subset.fingerprint != everything.fingerprint  # a teacher of other classes is another teacher
    dataset = SemanticSegmentationDataset(subset.train_images, subset.train_labels, categories=subset.categories)
    assert dataset.categories == ["red_circle", "red_square"]
    with pytest.raises(ConfigError, match=r"image sizes \[64, 96\]"):
        segmentation_data_files(load_experiment_config(DEMO, TINY + ["teacher.image_size=96"]))
    with pytest.raises(ConfigError, match="mask_root is not set"):
        segmentation_data_files(load_experiment_config(DEMO, ["data.dataset=mask_folder"]))


def test_training_data_augments_with_the_strength_schedule_and_refuses_mixup(cache):
    config = load_experiment_config(
        DEMO, TINY + ["augment={hflip: 0.5, scale_jitter: 0.2, strength: {kind: linear, start_value: 0.0, "
                      "end_value: 1.0, start_iter: 0, end_iter: 10}}"],
    )  # fmt: skip
    files = segmentation_data_files(config)
    data = segmentation_training_data(config, files, iterations=10)
    transform = data.dataset.transforms
    assert transform.strength == 0.0 and len(data.iteration_hooks) == 1
    data.iteration_hooks[0](5)
    assert transform.strength == pytest.approx(0.5)
    image, mask = data.dataset[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
    teacher_data = segmentation_training_data(config, files, iterations=10, augment=False)
    assert teacher_data.dataset.transforms.strength == 0.0 and not teacher_data.iteration_hooks
    mixing = load_experiment_config(DEMO, TINY + ["augment.mixup_prob=0.5"])
    with pytest.raises(ConfigError, match="no segmentation MixUp"):
        segmentation_training_data(mixing, files, iterations=10)


def test_command_line_data_flags_become_overrides():
    sys.path.insert(0, str(REPO / "tools"))
    from train_seg import overrides_from, parse_args

    coco = ["--train-ann", "a.json", "--train-images", "a", "--val-ann", "b.json", "--val-images", "b"]
    overrides = overrides_from(parse_args(coco + ["--categories", "voc"]))
    assert "data.dataset=coco" in overrides and "data.categories=voc" in overrides
    assert 'data.categories=[3, "person"]' in overrides_from(parse_args(coco + ["--categories", "3, person"]))
    with pytest.raises(ConfigError, match="not both"):
        overrides_from(parse_args(coco + ["--mask-folder", "root"]))
    with pytest.raises(ConfigError, match="needs --train-ann"):
        overrides_from(parse_args(["--categories", "voc"]))
    assert overrides_from(parse_args(["--mask-folder", "root"]))[:2] == ["data.dataset=mask_folder", "data.mask_root=root"]


def test_a_training_set_smaller_than_one_batch_is_refused_before_training(cache):
    from densekd.experiment.phases import check_training_set

    config = load_experiment_config(DEMO, TINY + ["data.batch_size=24"])
    files = segmentation_data_files(config)
    check_training_set(config, files, task=SEGMENTATION)  # 24 images fill one batch of 24
    too_big = load_experiment_config(DEMO, TINY + ["data.batch_size=25"])
    with pytest.raises(BadDatasetError, match=r"the training set has 24 image\(s\), 24 sample\(s\) per epoch: not one "
                                              r"full batch of data.batch_size=25.*--set data.batch_size=24"):  # fmt: skip
        check_training_set(too_big, files, task=SEGMENTATION)
