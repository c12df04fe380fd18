import math

import pytest
import torch

from densekd.core.weighting import (
    FREQUENCY_THRESHOLDS,
    WEIGHTING_METHODS,
    class_counts_from_labels,
    class_weights,
    label_channel_layout,
    lvis_frequency_groups,
    per_class_temperature,
    repeat_factors,
)


def _normalized(values):
    mean = sum(values) / len(values)
    return torch.tensor([v / mean for v in values], dtype=torch.float32)


# ----------------------------------------------------------------- class_weights


def test_none_is_all_ones():
    w = class_weights([1, 4, 100], method="none")
    assert w.shape == (3,) and w.dtype == torch.float32
    torch.testing.assert_close(w, torch.ones(3))


def test_inverse_hand_computed():
    # 1/1, 1/4, 1/100 = 1, 0.25, 0.01; mean 0.42
    w = class_weights([1, 4, 100], method="inverse")
    torch.testing.assert_close(w, _normalized([1.0, 0.25, 0.01]))


def test_sqrt_inverse_hand_computed():
    # 1/sqrt: 1, 0.5, 0.1; mean 1.6/3
    w = class_weights([1, 4, 100], method="sqrt_inverse")
    torch.testing.assert_close(w, _normalized([1.0, 0.5, 0.1]))
    torch.testing.assert_close(w, torch.tensor([1.875, 0.9375, 0.1875]))


def test_effective_number_hand_computed():
    beta = 0.9
    counts = [1, 2, 10]
    raw = [(1 - beta) / (1 - beta**n) for n in counts]  # 1, 1/1.9, 0.1/(1-0.9**10)
    w = class_weights(counts, method="effective_number", beta=beta)
    torch.testing.assert_close(w, _normalized(raw))
    assert raw[0] == pytest.approx(1.0) and raw[1] == pytest.approx(1 / 1.9)


def test_effective_number_limits():
    counts = [1, 4, 100]
    torch.testing.assert_close(class_weights(counts, method="effective_number", beta=0.0), torch.ones(3))
    # beta -> 1 approaches inverse frequency
    torch.testing.assert_close(
        class_weights(counts, method="effective_number", beta=1 - 1e-9),
        class_weights(counts, method="inverse"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_lvis_groups_hand_computed_and_override():
    counts = [5, 50, 500, 10, 101]  # r c f r f
    w = class_weights(counts, method="lvis_groups")
    torch.testing.assert_close(w, _normalized([3.0, 1.5, 1.0, 3.0, 1.0]))
    w = class_weights(counts, method="lvis_groups", group_multipliers={"r": 5.0})
    torch.testing.assert_close(w, _normalized([5.0, 1.5, 1.0, 5.0, 1.0]))


def test_lvis_groups_use_image_counts_even_with_annotation_counts():
    w = class_weights([5, 500], annotation_counts=[500, 5], method="lvis_groups")
    torch.testing.assert_close(w, _normalized([3.0, 1.0]))


def test_annotation_counts_used_when_given():
    w = class_weights([100, 1], annotation_counts=[1, 4], method="sqrt_inverse")
    torch.testing.assert_close(w, _normalized([1.0, 0.5]))


def test_power_softens():
    # inverse ** 0.5 == sqrt_inverse; power 0 == none
    torch.testing.assert_close(
        class_weights([1, 4, 100], method="inverse", power=0.5),
        class_weights([1, 4, 100], method="sqrt_inverse"),
    )
    torch.testing.assert_close(class_weights([1, 4, 100], method="inverse", power=0.0), torch.ones(3))


@pytest.mark.parametrize("method", sorted(WEIGHTING_METHODS))
def test_mean_is_one_and_rare_class_largest(method):
    counts = [3, 40, 7, 1000, 250]
    w = class_weights(counts, method=method)
    assert w.shape == (5,) and w.dtype == torch.float32
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(w).all() and (w > 0).all()
    assert float(w[0]) == pytest.approx(float(w.max()))  # count 3 is rarest
    if method != "none":
        assert float(w[0]) > float(w[3])


@pytest.mark.parametrize("method", sorted(WEIGHTING_METHODS))
def test_zero_count_gets_rarest_weight(method):
    w = class_weights([0, 2, 30, 0, 500], method=method)
    assert torch.isfinite(w).all()
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)
    # zeros behave like the rarest non-zero class (count 2)
    torch.testing.assert_close(w[0], w[1])
    torch.testing.assert_close(w[3], w[1])


def test_unknown_method_suggests_close_match():
    with pytest.raises(ValueError, match=r"sqrt_inverse") as info:
        class_weights([1, 2], method="sqrt_invers")
    assert "Did you mean 'sqrt_inverse'" in str(info.value)
    assert "effective_number" in str(info.value)  # lists valid names


def test_count_errors():
    with pytest.raises(ValueError, match="non-negative"):
        class_weights([1, -2, 3], method="inverse")
    with pytest.raises(ValueError, match="all image_counts are zero"):
        class_weights([0, 0, 0], method="inverse")
    # weighting switched off never fails on counts
    torch.testing.assert_close(class_weights([0, 0, 0], method="none"), torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        class_weights([0, -1], method="none")
    with pytest.raises(ValueError, match="all annotation_counts are zero"):
        class_weights([1, 1], annotation_counts=[0, 0], method="inverse")
    with pytest.raises(ValueError, match="annotation_counts has 3 classes"):
        class_weights([1, 2], annotation_counts=[1, 2, 3], method="inverse")
    with pytest.raises(ValueError, match="1-D"):
        class_weights([], method="inverse")


def test_parameter_errors():
    with pytest.raises(ValueError, match="beta"):
        class_weights([1, 2], method="effective_number", beta=1.0)
    with pytest.raises(ValueError, match="power"):
        class_weights([1, 2], method="inverse", power=-1.0)
    with pytest.raises(ValueError, match="unknown group 'rare'"):
        class_weights([1, 2], method="lvis_groups", group_multipliers={"rare": 2.0})
    with pytest.raises(ValueError, match="positive"):
        class_weights([1, 2], method="lvis_groups", group_multipliers={"r": 0.0})


# ----------------------------------------------------------------- LVIS groups


def test_lvis_frequency_group_boundaries():
    assert FREQUENCY_THRESHOLDS == (10, 100)
    assert lvis_frequency_groups([0, 1, 10, 11, 100, 101, 5000]) == ["r", "r", "r", "c", "c", "f", "f"]
    with pytest.raises(ValueError, match="non-negative"):
        lvis_frequency_groups([3, -1])


# ----------------------------------------------------------------- softmax layout


def test_label_channel_layout():
    w = class_weights([1, 4, 100], method="sqrt_inverse")  # (K,)
    s = label_channel_layout(w, 4)
    assert s.shape == (4,) and s.dtype == w.dtype
    assert float(s[0]) == 1.0  # background / unused channel 0, unweighted
    torch.testing.assert_close(s[1:], w)
    assert float(s[1:].mean()) == pytest.approx(1.0, abs=1e-6)
    assert label_channel_layout(w, 3) is w  # a head with K channels
    assert float(label_channel_layout(w, 4, fill=2.5)[0]) == 2.5
    with pytest.raises(ValueError, match="1-D"):
        label_channel_layout(torch.ones(2, 3), 4)
    with pytest.raises(ValueError, match="cannot be laid out over 7"):
        label_channel_layout(w, 7)


# ----------------------------------------------------------------- temperature


def test_per_class_temperature_monotone_and_clamped():
    w = torch.tensor([0.1, 0.5, 1.0, 1.4, 2.0])  # mean 1
    t = per_class_temperature(w, base=2.0, spread=1.0)
    assert t.shape == w.shape
    torch.testing.assert_close(t, torch.tensor([0.5, 1.0, 2.0, 2.8, 4.0]))  # 0.2 clamped up to base/4
    assert bool((t[1:] >= t[:-1]).all())
    # spread 0.5: base * sqrt(w)
    torch.testing.assert_close(
        per_class_temperature(w, base=2.0, spread=0.5), (2.0 * w.sqrt()).clamp(0.5, 8.0)
    )
    # nine classes at 0.1 and one at 9.1 (mean 1): 0.1 -> base/4, 9.1 -> base*4
    big = per_class_temperature(torch.tensor([0.1] * 9 + [9.1]), base=1.0, spread=1.0)
    torch.testing.assert_close(big, torch.tensor([0.25] * 9 + [4.0]))
    # max_ratio widens the clamp
    wide = per_class_temperature(torch.tensor([0.1] * 9 + [9.1]), base=1.0, max_ratio=20.0)
    torch.testing.assert_close(wide, torch.tensor([0.1] * 9 + [9.1]))


def test_per_class_temperature_spread_zero_is_constant():
    w = class_weights([1, 4, 100, 7], method="inverse")
    torch.testing.assert_close(per_class_temperature(w, base=3.0, spread=0.0), torch.full((4,), 3.0))


def test_per_class_temperature_rarer_is_warmer():
    w = class_weights([2, 50, 900], method="sqrt_inverse")
    t = per_class_temperature(w, base=4.0)
    assert float(t[0]) > float(t[1]) > float(t[2])


def test_per_class_temperature_errors():
    with pytest.raises(ValueError, match="base"):
        per_class_temperature(torch.ones(3), base=0.0)
    with pytest.raises(ValueError, match="spread"):
        per_class_temperature(torch.ones(3), base=1.0, spread=-1.0)
    with pytest.raises(ValueError, match="strictly positive"):
        per_class_temperature(torch.tensor([1.0, 0.0]), base=1.0)


# ----------------------------------------------------------------- counts & repeat factors


def test_class_counts_from_labels():
    labels = [[0, 0, 2], [2], [], [1, 2]]
    images, annotations = class_counts_from_labels(labels, num_classes=4)
    assert images.tolist() == [1, 1, 3, 0]
    assert annotations.tolist() == [2, 1, 3, 0]
    # torchvision targets: 1..K with first_label=1; tensors accepted
    images1, _ = class_counts_from_labels([torch.tensor([1, 1, 3]), [3]], num_classes=3, first_label=1)
    assert images1.tolist() == [1, 0, 2]


def test_labels_out_of_range_explain_first_label():
    with pytest.raises(ValueError, match="first_label=1"):
        class_counts_from_labels([[1, 3]], num_classes=3)  # 3 is out of 0..2
    with pytest.raises(ValueError, match="outside"):
        repeat_factors([[0]], num_classes=3, first_label=1)


def test_repeat_factors_hand_computed():
    # 10 images; class 0 in all 10 (f=1), class 1 in 2 (f=0.2), class 2 in 1 (f=0.1)
    labels = [[0]] * 7 + [[0, 1], [0, 1, 1], [0, 2]] + [[]]
    # note: 11 images in total (last one has no annotations)
    n = len(labels)
    assert n == 11
    t = 0.5
    f = [10 / n, 2 / n, 1 / n]
    r = [max(1.0, math.sqrt(t / fc)) for fc in f]  # [1, sqrt(2.75), sqrt(5.5)]
    expected = [r[0]] * 7 + [r[1], r[1], r[2], 1.0]
    out = repeat_factors(labels, num_classes=3, threshold=t)
    assert out.shape == (11,) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32))
    assert out[7].item() == pytest.approx(math.sqrt(2.75), rel=1e-6)


def test_repeat_factors_default_threshold_is_one_on_balanced_data():
    out = repeat_factors([[0], [1], [0, 1]], num_classes=2)
    torch.testing.assert_close(out, torch.ones(3))


def test_repeat_factors_errors():
    with pytest.raises(ValueError, match="empty"):
        repeat_factors([], num_classes=2)
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors([[0]], num_classes=2, threshold=-0.1)
