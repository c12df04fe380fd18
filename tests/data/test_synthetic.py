import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from densekd.data import synthetic
from densekd.data.synthetic import (
    PlannedImage,
    PlannedObject,
    SyntheticConfig,
    category_table,
    count_images_per_category,
    default_synthetic_root,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    lvis_frequency,
    plan_split,
    render_image,
    train_image_targets,
)


def tiny_config(**overrides) -> SyntheticConfig:
    values = dict(image_size=64, num_train=12, num_val=6, min_object_size=12, max_object_size=28, seed=3)
    values.update(overrides)
    return SyntheticConfig(**values)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("tiny"), tiny_config())


def _pixels(image_dir: Path):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(image_dir.glob("*.png"))}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, tiny_dataset):
    again = generate_synthetic_dataset(tmp_path / "again", tiny_config())
    other = generate_synthetic_dataset(tmp_path / "other", tiny_config(seed=4))
    for split in ("train", "val"):
        first_ann = getattr(tiny_dataset, f"{split}_ann").read_bytes()
        assert getattr(again, f"{split}_ann").read_bytes() == first_ann
        assert getattr(other, f"{split}_ann").read_bytes() != first_ann
        first, second, third = (_pixels(getattr(p, f"{split}_images")) for p in (tiny_dataset, again, other))
        assert first.keys() == second.keys() == third.keys()
        assert all(np.array_equal(first[name], second[name]) for name in first)
        assert not all(np.array_equal(first[name], third[name]) for name in first)


def test_default_train_plan_spans_all_lvis_groups():
    config = SyntheticConfig()
    plan = plan_split(config, "train")
    counts = count_images_per_category(plan, [c["id"] for c in category_table(config)])
    assert counts == train_image_targets(config)
    groups = [lvis_frequency(n) for n in counts.values()]
    assert groups.count("r") >= 2 and groups.count("c") >= 2 and groups.count("f") >= 2
    assert len(plan) == config.num_train
    assert all(1 <= len(image.objects) <= config.max_objects_per_image for image in plan)


def test_default_val_plan_is_class_balanced():
    config = SyntheticConfig()
    plan = plan_split(config, "val")
    counts = count_images_per_category(plan, [c["id"] for c in category_table(config)]).values()
    assert len(plan) == config.num_val
    assert min(counts) >= 20 and max(counts) <= 1.2 * min(counts)


def test_annotations_are_tight_boxes_of_visible_masks(tiny_dataset):
    document = json.loads(tiny_dataset.train_ann.read_text())
    size = tiny_config().image_size
    assert document["annotations"]
    for annotation in document["annotations"]:
        mask = mask_utils.decode(annotation["segmentation"])
        assert mask.shape == (size, size)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        tight = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        assert annotation["bbox"] == [float(v) for v in tight]
        x, y, w, h = annotation["bbox"]
        assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
        assert annotation["area"] == mask.sum()
        assert annotation["iscrowd"] == 0


def test_later_objects_occlude_earlier_ones():
    config = tiny_config()
    square, circle = (c["id"] for c in category_table(config) if c["name"] in ("red_square", "blue_circle"))
    planned = PlannedImage(1, 0, (PlannedObject(square, 10, 10, 20), PlannedObject(circle, 20, 20, 20)))
    _, (below, above) = render_image(config, planned, np.random.default_rng(0))
    assert not (below & above).any()
    assert below.sum() < 20 * 20 and below[10:20, 10:20].all()
    assert above.sum() == synthetic._shape_patch("circle", 20).sum()


def test_json_has_coco_and_lvis_fields(tiny_dataset):
    from pycocotools.coco import COCO

    train = json.loads(tiny_dataset.train_ann.read_text())
    val = json.loads(tiny_dataset.val_ann.read_text())
    for document in (train, val):
        assert {"info", "licenses", "images", "annotations", "categories"} <= document.keys()
        assert [c["id"] for c in document["categories"]] == list(range(1, 13))
        for category in document["categories"]:
            assert category["frequency"] in ("r", "c", "f")
            assert {"image_count", "instance_count", "name"} <= category.keys()
        for image in document["images"]:
            assert image["not_exhaustive_category_ids"] == []
            present = {a["category_id"] for a in document["annotations"] if a["image_id"] == image["id"]}
            assert present and not present & set(image["neg_category_ids"])
            assert len(image["neg_category_ids"]) <= 3
    assert val["categories"] == train["categories"]  # metadata describes the train split
    for category in train["categories"]:
        images = {a["image_id"] for a in train["annotations"] if a["category_id"] == category["id"]}
        assert category["image_count"] == len(images)
        assert category["frequency"] == lvis_frequency(len(images))
    coco = COCO(str(tiny_dataset.val_ann))
    assert len(coco.getImgIds()) == 6 and len(coco.getCatIds()) == 12


def test_ensure_reuses_existing_dataset(tmp_path, monkeypatch):
    config = tiny_config(num_train=6, num_val=4)
    first = ensure_synthetic_dataset(tmp_path, config)
    assert first.root.parent == tmp_path
    stamp = first.train_ann.stat().st_mtime_ns

    def must_not_generate(*args, **kwargs):
        raise AssertionError("an existing dataset was regenerated")

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", must_not_generate)
    second = ensure_synthetic_dataset(tmp_path, config)
    assert second == first and second.train_ann.stat().st_mtime_ns == stamp


def test_ensure_leaves_no_partial_folder_when_generation_fails(tmp_path, monkeypatch):
    calls = []
    real_render = synthetic.render_image

    def render_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt("simulated kill")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_image", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path, tiny_config(num_train=6, num_val=4))
    assert list(tmp_path.iterdir()) == []


def test_default_root_respects_densekd_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DENSEKD_CACHE", str(tmp_path))
    assert default_synthetic_root() == tmp_path / "synthetic"
    monkeypatch.delenv("DENSEKD_CACHE")
    assert default_synthetic_root() == Path.home() / ".cache" / "densekd" / "synthetic"


def test_invalid_config_says_what_to_fix():
    with pytest.raises(ValueError, match="unknown shapes.*choose from"):
        SyntheticConfig(shapes=("square", "star"))
    with pytest.raises(ValueError, match="max_object_size <= image_size"):
        SyntheticConfig(image_size=32)
