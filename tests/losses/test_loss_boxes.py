import pytest
import torch

from densekd.losses import (
    delta_l1_kd,
    delta_l2_kd,
    delta_regression_kd,
    delta_smooth_l1_kd,
    giou_kd,
    teacher_bounded_regression,
)


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _boxes(n, seed=0):
    """(n, 4) valid (x1, y1, x2, y2) boxes."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 10
    wh = torch.rand(n, 2, generator=g) * 5 + 1
    return torch.cat([xy, xy + wh], dim=1)


KINDS = ["l1", "l2", "smooth_l1"]

S = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
T = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 3.0]])


# --------------------------------------------------------------------------- delta regression


@pytest.mark.parametrize(
    "kind, beta, expected",
    [
        ("l1", 1.0, (1 + 2) / 2),  # per box |d| summed: 1, 2
        ("l2", 1.0, (1 + 4) / 2),  # d^2 summed: 1, 4
        ("smooth_l1", 1.0, (0.5 + 1.5) / 2),  # |d| >= beta: |d| - beta/2 -> 0.5, 1.5
        ("smooth_l1", 4.0, (1 / 8 + 4 / 8) / 2),  # |d| < beta: d^2 / (2 beta) -> 1/8, 4/8
    ],
)
def test_delta_regression_hand_computed(kind, beta, expected):
    assert delta_regression_kd(S, T, kind=kind, beta=beta).item() == pytest.approx(expected)


def test_named_delta_wrappers_match_kind():
    s, t = _pair((3, 4))
    assert torch.equal(delta_l1_kd(s, t), delta_regression_kd(s, t, kind="l1"))
    assert torch.equal(delta_l2_kd(s, t), delta_regression_kd(s, t, kind="l2"))
    assert torch.equal(delta_smooth_l1_kd(s, t, beta=0.5), delta_regression_kd(s, t, "smooth_l1", 0.5))


@pytest.mark.parametrize("kind", KINDS)
def test_delta_regression_zero_when_equal(kind):
    s, t = _pair((2, 5, 4))
    assert delta_regression_kd(t, t.clone(), kind=kind).item() == 0.0
    assert delta_regression_kd(s, t, kind=kind).item() > 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_delta_regression_gradient_student_only(kind):
    s, t = _pair((3, 4))
    s.requires_grad_(True), t.requires_grad_(True)
    delta_regression_kd(s, t, kind=kind).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_delta_regression_empty(kind):
    s = torch.zeros(0, 4, requires_grad=True)
    loss = delta_regression_kd(s, torch.zeros(0, 4), kind=kind)
    assert loss.item() == 0.0
    loss.backward()


def test_delta_regression_weights():
    s, t = _pair((2, 3, 4))  # (N, HWA, 4)
    w = torch.rand(2, 3)  # deltas.shape[:-1]
    assert torch.allclose(delta_regression_kd(s, t, weights=w), delta_regression_kd(s, t, weights=2 * w))
    w = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(delta_regression_kd(s, t, weights=w), delta_regression_kd(s[0], t[0]))


def test_delta_regression_validates_kind_and_shape():
    with pytest.raises(ValueError, match="valid kinds: l1, l2, smooth_l1"):
        delta_regression_kd(S, T, kind="huber")
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        delta_regression_kd(torch.zeros(2, 5), torch.zeros(2, 5))


# --------------------------------------------------------------------------- teacher bounded


def test_teacher_bounded_hand_computed():
    y = torch.zeros(2, 4)
    s = torch.tensor([[1.0, 0, 0, 0], [0.1, 0, 0, 0]])  # errors 1, 0.01
    t = torch.tensor([[0.5, 0, 0, 0], [1.0, 0, 0, 0]])  # errors 0.25, 1
    # m=0: box 0: 1 > 0.25 -> 1; box 1: 0.01 > 1 is false -> 0
    assert teacher_bounded_regression(s, t, y).item() == pytest.approx(0.5)
    # m=1: box 1: 0.01 + 1 > 1 -> 0.01
    assert teacher_bounded_regression(s, t, y, margin=1.0).item() == pytest.approx((1 + 0.01) / 2)


def test_teacher_bounded_is_student_error_when_student_equals_teacher():
    # Not zero by design (Chen et al. 2017): with R_s == R_t and m > 0 the condition e + m > e
    # holds, so the loss is the student's own L2 regression error. (With m = 0 it is 0.)
    s, y = _pair((3, 4))
    expected = (s - y).pow(2).sum(-1).mean()
    assert torch.allclose(teacher_bounded_regression(s, s.clone(), y, margin=0.1), expected)


def test_teacher_bounded_zero_when_student_better_than_teacher():
    s, y = _pair((3, 4))
    assert teacher_bounded_regression(y.clone(), s, y).item() == 0.0


def test_teacher_bounded_gradient_student_only():
    s, t = _pair((3, 4))
    y = torch.zeros(3, 4)
    s, t = (3 * s).requires_grad_(True), (0.1 * t).requires_grad_(True)  # student worse: active
    teacher_bounded_regression(s, t, y).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_teacher_bounded_empty_and_weights():
    s = torch.zeros(0, 4, requires_grad=True)
    loss = teacher_bounded_regression(s, torch.zeros(0, 4), torch.zeros(0, 4))
    assert loss.item() == 0.0
    loss.backward()
    s, t = _pair((3, 4))
    y = torch.zeros(3, 4)
    w = torch.tensor([1.0, 2.0, 0.0])
    loss = teacher_bounded_regression(s, t, y, weights=w)
    assert torch.allclose(loss, teacher_bounded_regression(s, t, y, weights=5 * w))
    assert torch.allclose(loss, teacher_bounded_regression(s[:2], t[:2], y[:2], weights=w[:2]))


# --------------------------------------------------------------------------- GIoU


def test_giou_hand_computed():
    s = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    t = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou = 1 / 7  # intersection 1, union 4 + 4 - 1
    enclosing = 9  # (0, 0, 3, 3)
    expected = 1 - (iou - (enclosing - 7) / enclosing)
    assert giou_kd(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_giou_zero_when_equal():
    b = _boxes(4)
    assert giou_kd(b, b.clone()).item() == pytest.approx(0.0, abs=1e-6)  # eps in torchvision's union
    assert giou_kd(b, _boxes(4, seed=1)).item() > 0.1


def test_giou_gradient_student_only_and_leading_dims():
    s, t = _boxes(6).reshape(2, 3, 4), _boxes(6, seed=1).reshape(2, 3, 4)
    s.requires_grad_(True), t.requires_grad_(True)
    giou_kd(s, t, weights=torch.rand(2, 3)).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_giou_empty_and_weights():
    s = torch.zeros(0, 4, requires_grad=True)
    loss = giou_kd(s, torch.zeros(0, 4))
    assert loss.item() == 0.0
    loss.backward()
    s, t = _boxes(3), _boxes(3, seed=1)
    w = torch.tensor([0.0, 1.0, 3.0])
    assert torch.allclose(giou_kd(s, t, weights=w), giou_kd(s, t, weights=2 * w))
    assert torch.allclose(giou_kd(s, t, weights=w), giou_kd(s[1:], t[1:], weights=w[1:]))
