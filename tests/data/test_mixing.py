import pytest
import torch

from densekd.data import MixedDetectionDataset, cutmix, mixup


def _target(boxes, labels, size, image_id=0, masks=True):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    h, w = size
    t = {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.int64).reshape(-1),
        "image_id": image_id,
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
    }
    if masks:
        m = torch.zeros((len(boxes), h, w), dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            m[i, y0:y1, x0:x1] = 1
        t["masks"] = m
    return t


class _Toy(torch.utils.data.Dataset):
    """Four tiny samples of different sizes; sample 3 has no boxes."""

    def __init__(self, masks=True):
        self.items = [
            (torch.full((3, 16, 20), 0.2), _target([[1, 1, 5, 5]], [1], (16, 20), 10, masks)),
            (torch.full((3, 24, 12), 0.8), _target([[2, 2, 10, 20], [0, 0, 4, 4]], [2, 3], (24, 12), 11, masks)),
            (torch.full((3, 16, 16), 0.5), _target([[8, 8, 16, 16]], [4], (16, 16), 12, masks)),
            (torch.full((3, 16, 16), 0.1), _target([], [], (16, 16), 13, masks)),
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, target = self.items[i]
        return image.clone(), {k: (v.clone() if torch.is_tensor(v) else v) for k, v in target.items()}


def test_mixup_canvas_and_concatenation():
    toy = _Toy()
    image, target = mixup(toy[0], toy[1], lam=0.25)
    assert image.shape == (3, 24, 20)  # max height, max width
    assert torch.allclose(image[:, 0, 0], torch.tensor(0.25 * 0.2 + 0.75 * 0.8))  # both images
    assert torch.allclose(image[:, 20, 2], torch.tensor(0.75 * 0.8))  # only b (a is 16 tall)
    assert torch.allclose(image[:, 2, 15], torch.tensor(0.25 * 0.2))  # only a (b is 12 wide)
    assert torch.allclose(image[:, 20, 15], torch.tensor(0.0))  # neither
    assert target["labels"].tolist() == [1, 2, 3]
    assert target["boxes"].tolist() == [[1, 1, 5, 5], [2, 2, 10, 20], [0, 0, 4, 4]]
    assert target["mix_weights"].tolist() == [0.25, 0.75, 0.75]
    assert target["masks"].shape == (3, 24, 20)
    assert target["masks"][1].sum() == 8 * 18 and target["masks"][0].sum() == 16
    assert target["image_id"] == 10


def test_mixup_with_empty_target():
    toy = _Toy()
    image, target = mixup(toy[3], toy[3], lam=0.5)
    assert image.shape == (3, 16, 16)
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 16, 16)
    assert target["mix_weights"].shape == (0,)


def test_cutmix_keep_drop_rule():
    a_boxes = [
        [0, 0, 10, 10],  # patch covers 6x10 of 100 -> 40 % visible: kept whole
        [4, 0, 10, 10],  # patch covers all of it -> 0 % visible: dropped
        [0, 0, 10, 4],   # patch covers 6x4 of 40 -> 40 % visible: kept
        [20, 20, 30, 30],  # untouched
    ]
    b_boxes = [
        [8, 0, 18, 10],  # 2x10 of 100 inside the patch (x 4..10) -> 20 %: dropped
        [6, 2, 16, 6],   # 4x4 of 40 inside -> 40 %: kept, clipped to [6, 2, 10, 6]
        [20, 20, 24, 24],  # outside: dropped
    ]
    a = (torch.zeros(3, 32, 32), _target(a_boxes, [1, 2, 3, 4], (32, 32)))
    b = (torch.ones(3, 32, 32), _target(b_boxes, [5, 6, 7], (32, 32)))
    patch = (4, 0, 10, 10)  # x0, y0, x1, y1
    image, target = cutmix(a, b, patch, min_visible=0.3)
    assert image[:, 0:10, 4:10].eq(1).all() and image.sum() == 3 * 60
    assert target["labels"].tolist() == [1, 3, 4, 6]
    assert target["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 10, 4], [20, 20, 30, 30], [6, 2, 10, 6]]
    assert torch.allclose(target["mix_weights"], torch.tensor([0.4, 0.4, 1.0, 0.4]))
    # masks: a's lose the patch pixels, b's are cut to the patch; area follows the masks
    assert target["masks"].shape == (4, 32, 32)
    assert target["masks"][0, :, 4:10].sum() == 0 and target["masks"][0].sum() == 40
    assert target["masks"][3].sum() == 16 and target["area"].tolist() == [40, 16, 100, 16]


def test_cutmix_without_masks_scales_area():
    a = (torch.zeros(3, 32, 32), _target([[0, 0, 10, 10]], [1], (32, 32), masks=False))
    b = (torch.ones(3, 32, 32), _target([[6, 2, 16, 6]], [2], (32, 32), masks=False))
    _, target = cutmix(a, b, (4, 0, 10, 10))
    assert "masks" not in target
    assert torch.allclose(target["area"], torch.tensor([40.0, 16.0]))


def test_dataset_is_reproducible_and_mixes():
    toy = _Toy()
    mixed = MixedDetectionDataset(toy, mixup_prob=0.5, cutmix_prob=0.5, seed=3)
    first = [mixed[i] for i in range(len(mixed))]
    again = MixedDetectionDataset(_Toy(), mixup_prob=0.5, cutmix_prob=0.5, seed=3)
    for (ia, ta), (ib, tb) in zip(first, [again[i] for i in range(len(again))]):
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
        assert torch.equal(ta["mix_weights"], tb["mix_weights"])
    seen = []
    for epoch in range(6):
        mixed.set_epoch(epoch)
        for i in range(len(mixed)):
            image, target = mixed[i]
            n = len(target["boxes"])
            assert target["labels"].shape == (n,) and target["mix_weights"].shape == (n,)
            assert target["masks"].shape == (n, *image.shape[1:])
            assert ((target["mix_weights"] >= 0) & (target["mix_weights"] <= 1)).all()
            seen.append(image.shape != toy[i][0].shape or not torch.equal(image, toy[i][0]))
    assert any(seen)
    mixed.set_epoch(0)
    assert torch.equal(mixed[2][0], first[2][0])


def test_lam_bounds_and_no_mix():
    toy = _Toy(masks=False)
    plain = MixedDetectionDataset(toy)
    image, target = plain[1]
    assert torch.equal(image, toy[1][0]) and target["mix_weights"].tolist() == [1.0, 1.0]
    mixed = MixedDetectionDataset(toy, mixup_prob=1.0, seed=0)
    for epoch in range(10):
        mixed.set_epoch(epoch)
        _, target = mixed[0]  # a = sample 0 (1 box), weight lam in (0, 1)
        lam = float(target["mix_weights"][0])
        assert 0.0 < lam < 1.0
        assert torch.allclose(target["mix_weights"][1:], torch.tensor(1.0 - lam))


def test_errors():
    with pytest.raises(ValueError, match="mixup_prob \\+ cutmix_prob"):
        MixedDetectionDataset(_Toy(), mixup_prob=0.7, cutmix_prob=0.7)
    with pytest.raises(ValueError, match="mixup_alpha"):
        MixedDetectionDataset(_Toy(), mixup_alpha=0.0)
    with pytest.raises(ValueError, match="lam"):
        mixup(_Toy()[0], _Toy()[1], 1.5)
    with pytest.raises(ValueError, match="masks"):
        mixup(_Toy()[0], _Toy(masks=False)[1], 0.5)
    with pytest.raises(ValueError, match="inside both images"):
        cutmix(_Toy()[0], _Toy()[1], (0, 0, 20, 20))
