"""Every shipped recipe and experiment config builds and runs one distillation step."""
import math
from pathlib import Path

import pytest

from densekd import Distiller
from densekd.detection.experiment import DETECTION
from densekd.detection.models import build_detector
from densekd.experiment.config import RECIPES_DIR, ConfigError, load_experiment_config
from densekd.experiment.phases import build_distiller, data_files, train_student

EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiments"
TINY = [
    "data.synthetic={num_train: 24, num_val: 12, image_size: 64, max_object_size: 32}",
    "data.batch_size=2",
    "teacher.image_size=64",
    "student.image_size=64",
    "optim.iterations=1",
    "optim.warmup_iters=0",
    "log_every=1",
]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DENSEKD_CACHE", str(cache))
        config = load_experiment_config(EXPERIMENTS / "demo.yaml", TINY)
        yield data_files(config), cache


DETECTION_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.startswith("seg_"))
SEGMENTATION_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("seg_*.yaml"))  # tools/train_seg.py's


@pytest.mark.parametrize("recipe", DETECTION_RECIPES)
def test_every_recipe_builds_and_runs_one_distillation_step(recipe, tiny_files, tmp_path, monkeypatch):
    files, cache = tiny_files
    monkeypatch.setenv("DENSEKD_CACHE", str(cache))
    config = load_experiment_config(EXPERIMENTS / "demo.yaml", TINY + [f"recipe={recipe}"])
    assert config.distill and config.distill["terms"], recipe
    num_classes = 12
    teachers = [build_detector(s.name, num_classes, 64) for s in [config.teacher, *config.extra_teachers]]
    self_distilled = "self_distillation" in config.distill
    trained = []  # the hook sees the distiller that trained the student, its teachers included
    student, summary = train_student(config, files, num_classes, [] if self_distilled else teachers, tmp_path, "distilled",
                                     resume=False, task=DETECTION, trained=trained.append)  # fmt: skip
    assert summary["iterations"] == 1
    assert len(trained) == 1 and trained[0].student is student
    assert (trained[0].self_distillation_mode is not None) is self_distilled
    assert all(math.isfinite(v) for v in summary["final_losses"].values())
    fresh = build_detector(config.student.name, num_classes, 64)
    fresh.load_state_dict(student.state_dict(), strict=True)


@pytest.mark.parametrize("recipe", SEGMENTATION_RECIPES)
def test_every_segmentation_recipe_builds_and_runs_one_distillation_step(recipe, tiny_files, tmp_path, monkeypatch):
    from densekd.segmentation.experiment import SEGMENTATION, segmentation_data_files
    from densekd.segmentation.models import build_segmenter

    monkeypatch.setenv("DENSEKD_CACHE", str(tiny_files[1]))
    config = load_experiment_config(EXPERIMENTS / "seg_demo.yaml", TINY + [f"recipe={recipe}"])
    assert config.distill and config.distill["terms"], recipe
    files = segmentation_data_files(config)
    teachers = [build_segmenter(s.name, 12).eval() for s in [config.teacher, *config.extra_teachers]]
    student, summary = train_student(config, files, 12, teachers, tmp_path, "distilled", resume=False, task=SEGMENTATION)
    assert summary["iterations"] == 1
    assert all(math.isfinite(v) for v in summary["final_losses"].values())
    assert any(key.startswith("kd_") for key in summary["final_losses"])
    build_segmenter(config.student.name, 12).load_state_dict(student.state_dict(), strict=True)


def test_experiment_configs_and_overrides_validate(tmp_path):
    for path in EXPERIMENTS.glob("*.yaml"):
        load_experiment_config(path)
    with pytest.raises(ConfigError, match=r"unknown recipe 'long_tial'.*Did you mean 'long_tail'"):
        load_experiment_config(EXPERIMENTS / "demo.yaml", ["recipe=long_tial"])
    with pytest.raises(ConfigError, match=r"optim: unknown key 'lrr'. Did you mean 'lr'"):
        load_experiment_config(EXPERIMENTS / "demo.yaml", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"optim.iterations must be int"):
        load_experiment_config(EXPERIMENTS / "demo.yaml", ["optim.iterations=ten"])
    config = load_experiment_config(EXPERIMENTS / "demo.yaml", ["optim.lr=0.02", "data.sampler=class_aware"])
    assert config.optim.lr == 0.02 and config.data.sampler == "class_aware" and config.optim.iterations == 300
    bad = tmp_path / "r"
    bad.mkdir()
    (bad / "nested.yaml").write_text("recipe: vanilla_kd\n")
    from densekd.experiment.config import parse_experiment_config

    with pytest.raises(ConfigError, match="cannot name another recipe"):
        parse_experiment_config({"recipe": "nested"}, recipes_dir=bad)


def test_a_segmentation_only_setting_in_a_detection_experiment_is_refused_by_name(tiny_files, monkeypatch):
    monkeypatch.setenv("DENSEKD_CACHE", str(tiny_files[1]))
    config = load_experiment_config(EXPERIMENTS / "demo.yaml", TINY + ["distill.logit_resolution=input"])
    teacher, student = (build_detector(s.name, 12, 64) for s in (config.teacher, config.student))
    with pytest.raises(ConfigError, match=r"distill.logit_resolution is a segmentation setting; Distiller .* Remove it"):
        build_distiller(Distiller, student, [teacher], config, [10] * 12, [10] * 12)
