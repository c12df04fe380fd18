import math

import pytest
import torch

from densekd.losses import channel_wise_kd, hint_loss, masked_imitation_loss, pearson_kd


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _maps(positions_s, positions_t):
    """Lists of per-position channel vectors -> (1, C, 1, P) maps."""
    def to_map(vectors):  # (P, C) -> (1, C, 1, P)
        return torch.tensor(vectors).t().reshape(1, len(vectors[0]), 1, len(vectors))

    return to_map(positions_s), to_map(positions_t)


def _foreground(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 1, 3, 3, generator=g) > 0.5).float()


LOSSES = {
    "hint_l2": lambda s, t: hint_loss(s, t, kind="l2"),
    "hint_cosine": lambda s, t: hint_loss(s, t, kind="cosine"),
    "hint_raw": lambda s, t: hint_loss(s, t, normalize=False),
    "masked": lambda s, t: masked_imitation_loss(s, t, torch.ones_like(s[:, :1]) * (s[:, :1] > 0)),
    "cwd": channel_wise_kd,
    "pkd": pearson_kd,
}


# --------------------------------------------------------------------------- hand-computed values

# two positions: [3, 4] vs [4, 3] (normalized: [.6, .8] vs [.8, .6]) and an exact match [1, 0]
HINT_S, HINT_T = _maps([[3.0, 4.0], [1.0, 0.0]], [[4.0, 3.0], [1.0, 0.0]])


@pytest.mark.parametrize(
    "kind, normalize, expected",
    [
        ("l2", True, (0.2**2 + 0.2**2) / 2),
        ("cosine", True, (1 - 24 / 25) / 2),
        ("l2", False, (1 + 1) / 2),
    ],
)
def test_hint_hand_computed(kind, normalize, expected):
    got = hint_loss(HINT_S, HINT_T, kind=kind, normalize=normalize)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hint_mask_weights_positions():
    mask = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    assert hint_loss(HINT_S, HINT_T, mask=mask).item() == pytest.approx(0.08, rel=1e-5)
    assert torch.allclose(hint_loss(HINT_S, HINT_T, mask=3 * mask), hint_loss(HINT_S, HINT_T, mask=mask))


def test_masked_imitation_hand_computed():
    s = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    t = torch.zeros(1, 1, 1, 3)  # squared errors 1, 4, 9
    fg = torch.tensor([2.0, 1.0, 0.0]).reshape(1, 1, 1, 3)
    expected = 1.0 * (2 * 1 + 1 * 4) / 3 + 0.5 * 9
    assert masked_imitation_loss(s, t, fg, 1.0, 0.5).item() == pytest.approx(expected)


def test_masked_imitation_without_boxes_or_background():
    s, t = _pair((2, 3, 3, 3))
    per_position = (s - t).pow(2).mean(dim=1)
    no_boxes = masked_imitation_loss(s, t, torch.zeros(2, 1, 3, 3), bg_weight=0.5)
    assert torch.isfinite(no_boxes)
    assert no_boxes.item() == pytest.approx(0.5 * per_position.mean().item(), rel=1e-5)
    all_fg = masked_imitation_loss(s, t, torch.ones(2, 1, 3, 3), fg_weight=2.0)
    assert all_fg.item() == pytest.approx(2.0 * per_position.mean().item(), rel=1e-5)


def test_channel_wise_kd_hand_computed():
    T = 2.0
    s = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).reshape(1, 2, 1, 2)  # (N, C, H, W)
    t = torch.tensor([[0.0, 2.0], [1.0, -1.0]]).reshape(1, 2, 1, 2)

    def kl_positions(a, b):  # KL(softmax(b / T) || softmax(a / T)) over the 2 positions
        ea, eb = [math.exp(v / T) for v in a], [math.exp(v / T) for v in b]
        p, q = [v / sum(eb) for v in eb], [v / sum(ea) for v in ea]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    expected = T**2 * (kl_positions([1.0, 0.0], [0.0, 2.0]) + kl_positions([0.5, 0.5], [1.0, -1.0])) / 2
    assert channel_wise_kd(s, t, temperature=T).item() == pytest.approx(expected, rel=1e-5)


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_pearson_kd_hand_computed():
    # (MSE of standardized maps) / 2 == 1 - Pearson correlation, averaged over channels
    s0, t0, s1, t1 = [1.0, 2.0, 4.0], [1.0, 3.0, 2.0], [0.0, 1.0, 0.0], [2.0, 1.0, 0.0]
    s = torch.tensor([s0, s1]).reshape(1, 2, 1, 3)
    t = torch.tensor([t0, t1]).reshape(1, 2, 1, 3)
    expected = ((1 - _pearson(s0, t0)) + (1 - _pearson(s1, t1))) / 2
    assert pearson_kd(s, t).item() == pytest.approx(expected, rel=1e-4)


def test_pearson_kd_invariant_to_per_channel_affine_student():
    s, t = _pair((2, 3, 4, 4))
    scale = torch.tensor([0.5, 3.0, 10.0]).reshape(1, 3, 1, 1)
    shift = torch.tensor([-2.0, 0.0, 7.0]).reshape(1, 3, 1, 1)
    assert torch.allclose(pearson_kd(s * scale + shift, t), pearson_kd(s, t), atol=1e-5)
    assert pearson_kd(t * scale + shift, t).item() == pytest.approx(0.0, abs=1e-5)


# --------------------------------------------------------------------------- generic properties


@pytest.mark.parametrize("name", LOSSES)
def test_zero_when_equal_positive_otherwise(name):
    s, t = _pair((2, 3, 4, 4))
    assert LOSSES[name](t, t.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert LOSSES[name](s, t).item() > 1e-3


@pytest.mark.parametrize("name", LOSSES)
def test_gradient_reaches_student_not_teacher(name):
    s, t = _pair((2, 3, 4, 4))
    s.requires_grad_(True), t.requires_grad_(True)
    LOSSES[name](s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_masked_imitation_gradient_not_into_foreground():
    s, t = _pair((2, 3, 3, 3))
    fg = _foreground().requires_grad_(True)
    masked_imitation_loss(s.requires_grad_(True), t, fg).backward()
    assert fg.grad is None


@pytest.mark.parametrize("name", LOSSES)
def test_empty_batch_is_zero(name):
    s = torch.zeros(0, 3, 4, 4, requires_grad=True)
    loss = LOSSES[name](s, torch.zeros(0, 3, 4, 4))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()


def test_pearson_kd_single_position_is_finite():
    s, t = _pair((1, 3, 1, 1))
    assert torch.isfinite(pearson_kd(s, t))


@pytest.mark.parametrize("name", LOSSES)
def test_shape_mismatch_names_shapes(name):
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 5, 4, 4\)"):
        LOSSES[name](torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))


def test_position_map_shape_checked():
    s, t = _pair((2, 3, 4, 4))
    with pytest.raises(ValueError, match="foreground must have shape"):
        masked_imitation_loss(s, t, torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match="valid kinds"):
        hint_loss(s, t, kind="l1")
