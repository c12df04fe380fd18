import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from densekd.data import (
    ClassAwareSampler,
    CocoDetectionDataset,
    RandomSampler,
    RepeatFactorSampler,
    build_sampler,
)


def test_repeat_factor_integer_and_fractional():
    sampler = RepeatFactorSampler(torch.tensor([2.0, 1.3, 1.0, 0.5]), seed=0)
    counts = np.zeros(4)
    epochs = 400
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        c = Counter(sampler)
        assert c[0] == 2 and c[2] == 1  # integer factors: exact every epoch
        assert c[1] in (1, 2) and c[3] in (0, 1)
        counts += [c[i] for i in range(4)]
    mean = counts / epochs
    # Bernoulli(0.3) mean over 400 epochs: sd = sqrt(.21 / 400) ~ 0.023; 4 sd bound
    assert abs(mean[1] - 1.3) < 0.1 and abs(mean[3] - 0.5) < 0.1
    assert len(sampler) == 5  # ceil(expected 4.8)


def test_repeat_factor_shuffles_per_epoch_and_is_seeded():
    factors = torch.full((20,), 1.0)
    a, b = RepeatFactorSampler(factors, seed=5), RepeatFactorSampler(factors, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(20))
    assert list(RepeatFactorSampler(factors, shuffle=False)) == list(range(20))


@pytest.mark.parametrize(
    "make",
    [
        lambda r, n: RandomSampler(11, seed=2, num_replicas=n, rank=r),
        lambda r, n: RepeatFactorSampler(torch.tensor([1.0, 2.0, 1.5, 3.0, 1.0, 1.2]), seed=2, num_replicas=n, rank=r),
        lambda r, n: ClassAwareSampler([[1], [2], [1, 2], [3], []], num_samples=10, seed=2, num_replicas=n, rank=r),
    ],
)
def test_sharding_disjoint_and_covering(make):
    whole = make(0, 1)
    whole.set_epoch(3)
    epoch = list(whole)
    shards = []
    for rank in range(3):
        sampler = make(rank, 3)
        sampler.set_epoch(3)
        shards.append(list(sampler))
    assert len({len(s) for s in shards}) == 1  # equal length
    per_rank = len(shards[0])
    assert per_rank * 3 - len(epoch) < 3  # padding only
    padded = epoch + epoch[: 3 * per_rank - len(epoch)]
    for rank in range(3):
        assert shards[rank] == padded[rank::3]
    # every position of the padded epoch goes to exactly one rank: together they are the epoch + padding
    assert Counter(sum(shards, [])) == Counter(padded)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandomSampler(20, seed=9, num_replicas=2, rank=1),
        lambda: RepeatFactorSampler(torch.linspace(1.0, 3.0, 12), seed=9, num_replicas=2, rank=1),
        lambda: ClassAwareSampler([[1], [2], [2], [3, 1]], num_samples=30, seed=9, num_replicas=2, rank=1),
    ],
)
def test_resume_equals_uninterrupted(make):
    reference = make()
    reference.set_epoch(4)
    uninterrupted = list(reference)
    first = make()
    first.set_epoch(4)
    consumed = []
    for index in first:
        consumed.append(index)
        if len(consumed) == 7:
            break
    resumed = make()
    resumed.set_epoch(4)
    resumed.skip(7)
    assert len(resumed) == len(uninterrupted) - 7 or isinstance(resumed, RepeatFactorSampler)
    assert consumed + list(resumed) == uninterrupted
    resumed.set_epoch(5)
    assert resumed.start == 0


def test_class_aware_rare_image_drawn_half_the_time():
    labels = [[1]] + [[2]] * 50 + [[]]
    sampler = ClassAwareSampler(labels, num_samples=2000, seed=0)
    c = Counter(sampler)
    assert len(sampler) == 2000
    assert abs(c[0] / 2000 - 0.5) < 0.05  # sd ~ 0.011
    assert 51 not in c  # no labels: never drawn
    assert set(c) == set(range(51))


def test_errors_and_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="rank"):
        RandomSampler(4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="repeat_factors"):
        RepeatFactorSampler(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="no image has a label"):
        ClassAwareSampler([[], []])
    with pytest.raises(ValueError, match="skip|num_samples"):
        RandomSampler(4).skip(-1)
    with pytest.raises(ValueError, match="Did you mean 'class_aware'"):
        build_sampler("class_awre", dataset=[0, 1])
    with pytest.raises(TypeError, match="image_labels"):
        build_sampler("repeat_factor", dataset=[0, 1])


def test_build_sampler_from_coco_dataset(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    images = [{"id": i, "file_name": "a.png", "height": 8, "width": 8} for i in range(1, 6)]
    annotations = [  # category 7 in image 1 only; category 3 in images 1..4; image 5 empty
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
    ] + [{"id": 1 + i, "image_id": i, "category_id": 3, "bbox": [1, 1, 3, 3], "area": 9, "iscrowd": 0} for i in range(1, 5)]
    document = {"images": images, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}], "annotations": annotations}
    (tmp_path / "ann.json").write_text(json.dumps(document))
    dataset = CocoDetectionDataset(tmp_path, tmp_path / "ann.json")
    random_sampler = build_sampler("random", dataset, seed=1)
    assert sorted(random_sampler) == list(range(5))
    rfs = build_sampler("repeat_factor", dataset, seed=1, rfs_threshold=0.8)
    # f(7) = 1/5 -> r = sqrt(0.8 / 0.2) = 2 for image 0; f(3) = 4/5 -> r = 1
    assert rfs.repeat_factors.tolist() == pytest.approx([2.0, 1.0, 1.0, 1.0, 1.0])
    assert Counter(rfs)[0] == 2
    class_aware = build_sampler("class_aware", dataset, seed=1, num_replicas=2, rank=1)
    assert 4 not in set(class_aware) and len(class_aware) == 3
