"""Offline distillation through a teacher-output cache: same kd losses as online distillation
(fp32) or close to them (fp16), keyed so a stale cache is never read, written atomically, and
refused wherever the teacher's input or the teacher itself is not fixed per image."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_detectors import build_fcos, build_rcnn, build_retinanet

from densekd import Distiller, Term
from densekd.data import (
    CocoDetectionDataset,
    MixedDetectionDataset,
    SyntheticConfig,
    build_detection_transforms,
    collate_detection,
    generate_synthetic_dataset,
)
from densekd.detection.teacher_cache import TeacherOutputCache, teacher_caches_for
from densekd.experiment.config import ConfigError, load_experiment_config

EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiments"
SIGMOID_CHANNELS = 13  # labels 1..12 of the synthetic set index sigmoid channels 1..12

FAMILIES = {
    "fcos": (
        lambda: (build_fcos(fpn_width=64, num_classes=SIGMOID_CHANNELS), build_fcos(fpn_width=32, num_classes=SIGMOID_CHANNELS)),
        [
            Term("binary_kd", "cls_logits", temperature=2.0, confidence_weighting=True),
            Term("giou", "box_regression"),
            Term("binary_kd", "centerness"),
            Term("cwd", "features", temperature=4.0, levels=["0", "p6"]),
        ],
    ),
    "retinanet": (
        lambda: (build_retinanet(fpn_width=32, num_classes=SIGMOID_CHANNELS), build_retinanet(fpn_width=16, num_classes=SIGMOID_CHANNELS)),
        [
            Term("focal_binary_kd", "cls_logits", temperature=2.0),
            Term("delta_l1", "box_regression", confidence_weighting=True),
            Term("masked_imitation", "features", levels=["1"]),
        ],
    ),
    "faster_rcnn": (
        lambda: (build_rcnn(fpn_width=32, num_classes=12), build_rcnn(fpn_width=16, num_classes=12)),
        [
            Term("binary_kd", "rpn_objectness", temperature=2.0),
            Term("delta_smooth_l1", "rpn_box_regression", confidence_weighting=True),
            Term("hint", "features"),
        ],
    ),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = generate_synthetic_dataset(root, SyntheticConfig(num_train=12, num_val=12, image_size=64, max_object_size=32))
    return CocoDetectionDataset(paths.train_images, paths.train_ann)


def _online_and_offline(family: str):
    """Two distillers with the same teacher, student weights and connectors."""
    build, terms = FAMILIES[family]
    teacher, student = build()
    online = Distiller(student, teacher, terms, probe_size=64).train()
    offline = Distiller(copy.deepcopy(student), teacher, terms, probe_size=64).train()
    offline.connectors.load_state_dict(online.connectors.state_dict())
    return online, offline


def _kd(distiller, images, targets, seed=1):
    torch.manual_seed(seed)  # R-CNN samples anchors at random: both sides draw the same
    losses = distiller(images, targets)
    return {key: value.detach() for key, value in losses.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_teacher_gives_the_online_kd_losses(family, dataset, tmp_path):
    online, offline = _online_and_offline(family)
    images, targets = collate_detection([dataset[i] for i in (7, 2, 11, 0)])  # not the build's batches
    expected = _kd(online, images, targets)
    assert {k for k in expected if k.startswith("kd_")} == {t.key for t in FAMILIES[family][1]}

    fp32 = teacher_caches_for(offline, dataset, tmp_path, dtype="float32", batch_size=3)
    offline.use_teacher_cache(fp32)
    calls = []
    offline.teachers[0].backbone.register_forward_hook(lambda *args: calls.append(1))
    exact = _kd(offline, images, targets)
    assert not calls, "the teacher ran although its outputs are cached"
    for key, value in expected.items():
        torch.testing.assert_close(exact[key], value, rtol=1e-6, atol=1e-6, msg=key)

    fp16 = teacher_caches_for(offline, dataset, tmp_path, dtype="float16", batch_size=5)
    assert fp16[0].size_bytes < 0.6 * fp32[0].size_bytes
    close = _kd(offline.use_teacher_cache(fp16), images, targets)
    for key, value in expected.items():
        torch.testing.assert_close(close[key], value, rtol=2e-2, atol=1e-4, msg=key)

    # only the outputs the terms need, and of the features only the paired levels
    levels = {"fcos": {"0", "p6"}, "retinanet": {"1"}, "faster_rcnn": {"0", "1", "2", "pool"}}[family]
    stored = {p.name for p in fp32[0].folder.glob("*.npy")}
    assert {n[len("features.") : -4] for n in stored if n.startswith("features.")} == levels


def test_each_of_several_teachers_gets_its_own_cache(dataset, tmp_path):
    teachers = [build_fcos(fpn_width=64, num_classes=SIGMOID_CHANNELS), build_fcos(fpn_width=32, num_classes=SIGMOID_CHANNELS)]
    student = build_fcos(fpn_width=32, num_classes=SIGMOID_CHANNELS)
    terms = [Term("binary_kd", "cls_logits", temperature=2.0), Term("hint", "features", levels=["1"])]
    online = Distiller(student, teachers, terms, teacher_weights=[0.7, 0.3], probe_size=64).train()
    offline = Distiller(copy.deepcopy(student), teachers, terms, teacher_weights=[0.7, 0.3], probe_size=64).train()
    offline.connectors.load_state_dict(online.connectors.state_dict())
    images, targets = collate_detection([dataset[i] for i in (3, 8)])
    expected = _kd(online, images, targets)
    caches = teacher_caches_for(offline, dataset, tmp_path, dtype="float32")
    assert len({c.folder for c in caches}) == 2
    with pytest.raises(ValueError, match="one cache per teacher: 2, got 1"):
        offline.use_teacher_cache(caches[:1])
    with pytest.raises(ValueError, match="cannot stand in for teacher 0: it was built from another teacher"):
        offline.use_teacher_cache(caches[::-1])
    exact = _kd(offline.use_teacher_cache(caches), images, targets)
    for key, value in expected.items():
        torch.testing.assert_close(exact[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_a_changed_teacher_or_transform_is_never_served_from_the_old_cache(dataset, tmp_path):
    _, offline = _online_and_offline("fcos")
    first = teacher_caches_for(offline, dataset, tmp_path)[0]
    assert first.built and first.build_seconds > 0 and first.size_bytes > 0
    again = teacher_caches_for(offline, dataset, tmp_path)[0]
    assert not again.built and again.folder == first.folder

    with torch.no_grad():
        offline.teachers[0].head.classification_head.cls_logits.bias.add_(0.5)
    changed = teacher_caches_for(offline, dataset, tmp_path)[0]
    assert changed.built and changed.folder != first.folder
    with pytest.raises(ValueError, match="built from another teacher"):
        offline.use_teacher_cache(first)

    offline.student.transform.image_mean = [0.4, 0.4, 0.4]  # the teacher sees re-normalized pixels
    moved = teacher_caches_for(offline, dataset, tmp_path)[0]
    assert moved.built and moved.folder not in (first.folder, changed.folder)
    with pytest.raises(ValueError, match="input transform differs"):
        offline.use_teacher_cache(changed)

    offline.use_teacher_cache(moved)
    images, targets = collate_detection([dataset[0], dataset[1]])  # GroupNorm needs 2 images at 1x1 levels
    targets[1]["image_id"] = 10_000
    with pytest.raises(KeyError, match=r"Image ids \[10000\] are not in the teacher-output cache"):
        offline(images, targets)


def test_a_failed_or_truncated_build_is_never_used(dataset, tmp_path, monkeypatch):
    _, offline = _online_and_offline("fcos")
    run_teacher, calls = offline._run_teacher, []

    def crash_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the build were killed
        return run_teacher(*args)

    monkeypatch.setattr(offline, "_run_teacher", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        teacher_caches_for(offline, dataset, tmp_path, batch_size=4)
    assert list(tmp_path.iterdir()) == []  # no folder under the key, no temporary left over
    monkeypatch.setattr(offline, "_run_teacher", run_teacher)

    cache = teacher_caches_for(offline, dataset, tmp_path)[0]
    reference = np.load(cache.folder / "cls_logits.npy")
    with open(cache.folder / "cls_logits.npy", "r+b") as handle:
        handle.truncate(1000)  # a partially written file under the final name
    rebuilt = teacher_caches_for(offline, dataset, tmp_path)[0]
    assert rebuilt.built and np.array_equal(np.load(rebuilt.folder / "cls_logits.npy"), reference)
    (rebuilt.folder / "manifest.json").unlink()
    assert teacher_caches_for(offline, dataset, tmp_path)[0].built


def test_settings_that_cannot_be_replayed_are_refused_by_name(dataset, tmp_path):
    _, offline = _online_and_offline("fcos")
    flipped = CocoDetectionDataset(
        dataset.image_dir, dataset.annotation_file,
        transforms=build_detection_transforms(hflip=0.5, scale_jitter=0.0, color_jitter=0.1, seed=0),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"random augmentation \(hflip=0.5, color_jitter=0.1.*not mirror-symmetric"):
        teacher_caches_for(offline, flipped, tmp_path)
    with pytest.raises(ValueError, match=r"MixUp p=0.5, CutMix p=0.0.*augment.mixup_prob=0"):
        teacher_caches_for(offline, MixedDetectionDataset(dataset, mixup_prob=0.5, seed=0), tmp_path)

    teacher, student = build_rcnn(fpn_width=32, num_classes=12), build_rcnn(fpn_width=16, num_classes=12)
    roi = Distiller(student, teacher, [Term("kl", "roi_class_logits"), Term("delta_l1", "roi_box_regression"), Term("hint", "features")], probe_size=64)
    with pytest.raises(ValueError, match=r"'roi_class_logits_kl' \(on roi_class_logits\), 'roi_box_regression_delta_l1'.*student sampled"):
        teacher_caches_for(roi, dataset, tmp_path)
    ema = Distiller.self_distillation(build_fcos(num_classes=SIGMOID_CHANNELS), [Term("binary_kd", "cls_logits")], probe_size=64)
    with pytest.raises(ValueError, match=r"self-distillation \(ema\): the teacher .* changes during training"):
        teacher_caches_for(ema, dataset, tmp_path)
    own = Distiller(build_rcnn(fpn_width=16), build_rcnn(fpn_width=32), [Term("hint", "features")], teacher_geometry="own", probe_size=64)
    with pytest.raises(ValueError, match=r"teacher_geometry='own'"):
        teacher_caches_for(own, dataset, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_images_of_several_sizes_are_refused(tmp_path):
    sizes = [(64, 64), (48, 64)]  # (H, W): the student keeps both sizes, batches pad them
    images = []
    for index, (height, width) in enumerate(sizes, start=1):
        Image.new("RGB", (width, height), (index * 60, 90, 30)).save(tmp_path / f"{index}.png")
        images.append({"id": index, "file_name": f"{index}.png", "height": height, "width": width})
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0} for i in (1, 2)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}))
    _, offline = _online_and_offline("fcos")
    with pytest.raises(ValueError, match=r"Images \[2\] reach the student at \[\(48, 64\)\].*every\s+image at one size"):
        teacher_caches_for(offline, CocoDetectionDataset(tmp_path, ann), tmp_path / "cache")


TINY = [
    "data.synthetic={num_train: 24, num_val: 12, image_size: 64, max_object_size: 32}",
    "data.batch_size=2",
    "teacher.image_size=64",
    "student.image_size=64",
    "optim.iterations=2",
    "optim.warmup_iters=0",
    "log_every=1",
    "checkpoint_every=100",
]


def test_experiment_config_refuses_offline_runs_it_cannot_replay():
    def load(*overrides):
        return load_experiment_config(EXPERIMENTS / "demo.yaml", TINY + ["distill.teacher_cache=true", *overrides])

    config = load("recipe=logit_cwd")  # a partial distill override keeps the recipe's terms
    assert config.distill["teacher_cache"] is True and len(config.distill["terms"]) == 2
    with pytest.raises(ConfigError, match=r"(?s)augment.hflip=0.5.*augment.scale_jitter=0.2.*augment.color_jitter=0.2"):
        load("recipe=curriculum")
    with pytest.raises(ConfigError, match=r"(?s)augment.mixup_prob=0.5 \(MixUp.*distill.teacher_cache=false"):
        load("recipe=kd_label_smoothing_mixup")
    with pytest.raises(ConfigError, match=r"distill.self_distillation"):
        load("recipe=self_distillation_ema")
    roi = "distill={teacher_cache: true, terms: [{loss: kl, on: roi_class_logits}, {loss: hint, on: features}]}"
    with pytest.raises(ConfigError, match=r"distill.terms\[0\] \(kl on roi_class_logits"):
        load_experiment_config(EXPERIMENTS / "demo.yaml", TINY + [roi])
    with pytest.raises(ConfigError, match=r"teacher_cache_dtype must be one of float16, float32, got 'int8'"):
        load("distill.teacher_cache_dtype=int8")


def test_offline_training_run_matches_the_online_run_and_reuses_the_cache(tmp_path, monkeypatch):
    from densekd.detection.experiment import DETECTION
    from densekd.detection.models import build_detector
    from densekd.experiment.phases import data_files, train_student

    monkeypatch.setenv("DENSEKD_CACHE", str(tmp_path / "cache"))
    small = TINY + ["teacher.name=fcos_resnet18_fpn64"]  # the demo's recipe, a cheaper teacher
    offline = ["distill={teacher_cache: true, teacher_cache_dtype: float32}"]
    online_config = load_experiment_config(EXPERIMENTS / "demo.yaml", small)
    offline_config = load_experiment_config(EXPERIMENTS / "demo.yaml", small + offline)
    files = data_files(online_config)
    torch.manual_seed(0)
    teachers = [build_detector(online_config.teacher.name, 12, 64)]

    online, online_summary = train_student(online_config, files, 12, teachers, tmp_path / "online", "distilled", resume=False, task=DETECTION)
    student, summary = train_student(offline_config, files, 12, teachers, tmp_path / "offline", "distilled", resume=False, task=DETECTION)
    [cache] = summary["teacher_cache"]
    assert cache["built_now"] and cache["size_bytes"] > 0
    assert Path(cache["folder"]).parent == tmp_path / "cache" / "teacher_outputs"
    for key, value in online_summary["final_losses"].items():
        assert summary["final_losses"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for key, value in online.state_dict().items():
        torch.testing.assert_close(student.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)

    another_seed = load_experiment_config(EXPERIMENTS / "demo.yaml", small + offline + ["seed=3"])
    _, reused = train_student(another_seed, files, 12, teachers, tmp_path / "seed3", "distilled", resume=False, task=DETECTION)
    assert reused["teacher_cache"] == [{**cache, "built_now": False}]
