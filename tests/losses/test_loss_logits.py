import math

import pytest
import torch
import torch.nn.functional as F

from densekd.losses import (
    binary_kd,
    decoupled_kd,
    focal_binary_kd,
    focal_kl_kd,
    kl_div_kd,
    margin_kd,
)


def _softmax(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _bernoulli_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _assert_student_only_grad(loss_fn, student, teacher, *args, **kwargs):
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    loss_fn(student, teacher, *args, **kwargs).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def _assert_empty_is_zero(loss_fn, shape, *args, **kwargs):
    student = torch.zeros(shape, requires_grad=True)
    loss = loss_fn(student, torch.zeros(shape), *args, **kwargs)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()


SOFTMAX_LOSSES = [kl_div_kd, focal_kl_kd, margin_kd]
SIGMOID_LOSSES = [binary_kd, focal_binary_kd]


# --------------------------------------------------------------------------- hand-computed values


def test_kl_div_kd_hand_computed():
    s, t, T = [1.0, 0.0, -1.0], [0.5, 0.5, 0.0], 2.0
    expected = T**2 * _kl(_softmax(t, T), _softmax(s, T))
    got = kl_div_kd(torch.tensor([s]), torch.tensor([t]), temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_focal_kl_kd_hand_computed():
    s, t, T, gamma = [1.0, 0.0, -1.0], [0.0, 2.0, 0.0], 1.5, 2.0
    p_s = _softmax(s, T)
    expected = (1 - p_s[1]) ** gamma * T**2 * _kl(_softmax(t, T), p_s)  # teacher argmax is class 1
    got = focal_kl_kd(torch.tensor([s]), torch.tensor([t]), temperature=T, gamma=gamma)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_margin_kd_hand_computed():
    # row 0: y=0, m(t)=3-1=2, m(s)=2-1=1 -> 1; row 1: y=2, m(t)=1-0=1, m(s)=5-0=5 -> 0
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    t = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert margin_kd(s, t).item() == pytest.approx(0.5)


def test_binary_kd_hand_computed():
    s, t, T = [0.3, -1.2], [1.0, 0.5], 2.0
    expected = sum(T**2 * _bernoulli_kl(_sigmoid(b / T), _sigmoid(a / T)) for a, b in zip(s, t)) / 2
    got = binary_kd(torch.tensor(s), torch.tensor(t), temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_focal_binary_kd_hand_computed():
    s, t, gamma = [0.3, -1.2], [1.0, 0.5], 2.0
    terms = []
    for a, b in zip(s, t):
        p_s, p_t = _sigmoid(a), _sigmoid(b)
        terms.append(abs(p_t - p_s) ** gamma * _bernoulli_kl(p_t, p_s))
    got = focal_binary_kd(torch.tensor(s), torch.tensor(t), gamma=gamma)
    assert got.item() == pytest.approx(sum(terms) / 2, rel=1e-5)


def test_decoupled_kd_hand_computed():
    s, t, y, T, alpha, beta = [1.0, 0.0, -1.0], [0.5, 2.0, 0.0], 1, 2.0, 1.0, 8.0
    p_s, p_t = _softmax(s, T), _softmax(t, T)
    tckd = _kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
    rest_s = _softmax([v for i, v in enumerate(s) if i != y], T)
    rest_t = _softmax([v for i, v in enumerate(t) if i != y], T)
    expected = T**2 * (alpha * tckd + beta * _kl(rest_t, rest_s))
    got = decoupled_kd(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), T, alpha, beta)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def _mdistiller_dkd(s, t, target, alpha, beta, T):
    """The official mdistiller formulation (masks, -1000 trick, log of summed probabilities)."""
    gt = F.one_hot(target, s.shape[1]).float()
    p_s, p_t = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)

    def cat_mask(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * (1 - gt)).sum(1, keepdim=True)], dim=1)

    tckd = F.kl_div(torch.log(cat_mask(p_s)), cat_mask(p_t), reduction="sum") * T**2 / s.shape[0]
    nckd = F.kl_div(
        F.log_softmax(s / T - 1000.0 * gt, dim=1), F.softmax(t / T - 1000.0 * gt, dim=1), reduction="sum"
    ) * T**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def test_decoupled_kd_matches_official_formulation():
    s, t = _pair((5, 4))
    target = torch.tensor([0, 1, 2, 3, 0])
    expected = _mdistiller_dkd(s, t, target, 1.0, 8.0, 4.0)
    assert torch.allclose(decoupled_kd(s, t, target, 4.0, 1.0, 8.0), expected, rtol=1e-4)


def test_decoupled_kd_reconstructs_kd():
    # The reformulation of Zhao et al. 2022: KD = TCKD + (1 - p_t[target]) * NCKD, per sample.
    s, t = _pair((1, 5))
    target = torch.tensor([2])
    p_t_target = F.softmax(t / 3.0, dim=1)[0, 2].item()
    dkd = decoupled_kd(s, t, target, 3.0, alpha=1.0, beta=1.0 - p_t_target)
    assert torch.allclose(dkd, kl_div_kd(s, t, 3.0), rtol=1e-5)


# --------------------------------------------------------------------------- zero at equality


@pytest.mark.parametrize("loss_fn", SOFTMAX_LOSSES + SIGMOID_LOSSES)
def test_zero_when_equal_positive_otherwise(loss_fn):
    s, t = _pair((4, 3))
    assert loss_fn(t, t.clone()).item() == 0.0
    assert loss_fn(s, t).item() > 0.0


def test_decoupled_kd_zero_when_equal_positive_otherwise():
    s, t = _pair((4, 3))
    target = torch.tensor([0, 1, 2, 0])
    assert decoupled_kd(t, t.clone(), target).item() == pytest.approx(0.0, abs=1e-7)
    assert decoupled_kd(s, t, target).item() > 0.0


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("loss_fn", SOFTMAX_LOSSES + SIGMOID_LOSSES)
def test_gradient_reaches_student_not_teacher(loss_fn):
    s, t = _pair((4, 3))
    if loss_fn is margin_kd:
        s = t * 0.1  # student margins below the teacher's: the hinge is active
    _assert_student_only_grad(loss_fn, s, t)


def test_decoupled_kd_gradient_reaches_student_not_teacher():
    s, t = _pair((4, 3))
    _assert_student_only_grad(decoupled_kd, s, t, torch.tensor([0, 1, 2, 0]), 2.0)


def test_gradient_does_not_reach_tensor_weights():
    s, t = _pair((4, 3))
    w = torch.rand(4, requires_grad=True)
    kl_div_kd(s.requires_grad_(True), t, weights=w).backward()
    assert w.grad is None


# --------------------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("loss_fn", SOFTMAX_LOSSES)
def test_softmax_losses_empty(loss_fn):
    _assert_empty_is_zero(loss_fn, (0, 3))


@pytest.mark.parametrize("loss_fn", SIGMOID_LOSSES)
def test_sigmoid_losses_empty(loss_fn):
    _assert_empty_is_zero(loss_fn, (2, 0, 3))


def test_decoupled_kd_empty():
    _assert_empty_is_zero(decoupled_kd, (0, 3), torch.zeros(0, dtype=torch.long))


def test_kl_div_kd_empty_with_tensor_temperature():
    _assert_empty_is_zero(kl_div_kd, (0, 3), torch.zeros(0))


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("loss_fn", SOFTMAX_LOSSES)
def test_per_sample_weights_are_normalized(loss_fn):
    s, t = _pair((3, 4))
    w = torch.tensor([0.5, 2.0, 1.0])
    assert torch.allclose(loss_fn(s, t, weights=w), loss_fn(s, t, weights=2 * w))
    w0 = torch.tensor([1.0, 0.0, 1.0])
    expected = loss_fn(s[[0, 2]], t[[0, 2]])
    assert torch.allclose(loss_fn(s, t, weights=w0), expected)


def test_decoupled_kd_weights_are_normalized():
    s, t = _pair((3, 4))
    target = torch.tensor([0, 1, 3])
    w = torch.tensor([0.5, 2.0, 0.0])
    assert torch.allclose(decoupled_kd(s, t, target, weights=w), decoupled_kd(s, t, target, weights=3 * w))
    expected = decoupled_kd(s[:2], t[:2], target[:2], weights=w[:2])
    assert torch.allclose(decoupled_kd(s, t, target, weights=w), expected)


@pytest.mark.parametrize("loss_fn", SIGMOID_LOSSES)
def test_sigmoid_losses_broadcast_position_times_class_weights(loss_fn):
    s, t = _pair((2, 5, 3))  # (N, HWA, K)
    position = torch.rand(2, 5, 1)
    cls = torch.tensor([1.0, 0.0, 2.0])
    w = position * cls  # (N, HWA, K)
    assert torch.allclose(loss_fn(s, t, weights=w), loss_fn(s, t, weights=4 * w))
    # zero class weight removes class 1 entirely
    keep = [0, 2]
    expected = loss_fn(s[..., keep], t[..., keep], weights=w[..., keep])
    assert torch.allclose(loss_fn(s, t, weights=w), expected)


def test_all_zero_weights_give_zero_not_nan():
    s, t = _pair((3, 4))
    loss = kl_div_kd(s, t, weights=torch.zeros(3))
    assert loss.item() == 0.0


# --------------------------------------------------------------------------- temperature


def _grad_norm(loss_fn, s, t, T):
    s = s.clone().requires_grad_(True)
    loss_fn(s, t, temperature=T).backward()
    return s.grad.norm().item()


@pytest.mark.parametrize("loss_fn", [kl_div_kd, binary_kd])
def test_t_squared_keeps_gradient_scale_across_temperatures(loss_fn):
    # For small logits, d/ds [T^2 * KL(T)] = T * (p_s - p_t) ~ (s - t)/C (softmax) or (s - t)/4
    # (sigmoid), independent of T. Without the T^2 factor the T=4 gradient would be 16x smaller.
    s, t = _pair((6, 5))
    s, t = 0.1 * s, 0.1 * t
    ratio = _grad_norm(loss_fn, s, t, 4.0) / _grad_norm(loss_fn, s, t, 1.0)
    assert 0.8 < ratio < 1.25


def test_kl_per_sample_temperature():
    s, t = _pair((2, 4))
    for shape in [(2,), (2, 1)]:
        same = torch.full(shape, 3.0)
        assert torch.allclose(kl_div_kd(s, t, same), kl_div_kd(s, t, 3.0))
    per_sample = torch.tensor([1.0, 4.0])
    expected = (kl_div_kd(s[:1], t[:1], 1.0) + kl_div_kd(s[1:], t[1:], 4.0)) / 2
    assert torch.allclose(kl_div_kd(s, t, per_sample), expected)


def _dkd_fixed_target(s, t, T):
    return decoupled_kd(s, t, torch.tensor([0, 2]), T)


@pytest.mark.parametrize("loss_fn", [focal_kl_kd, _dkd_fixed_target])
def test_other_softmax_losses_accept_per_sample_temperature(loss_fn):
    s, t = _pair((2, 4))
    assert torch.allclose(loss_fn(s, t, torch.tensor([2.0, 2.0])), loss_fn(s, t, 2.0))


@pytest.mark.parametrize("loss_fn", SIGMOID_LOSSES)
def test_sigmoid_per_class_temperature(loss_fn):
    s, t = _pair((2, 5, 3))  # (N, HWA, K)
    assert torch.allclose(loss_fn(s, t, torch.full((3,), 2.0)), loss_fn(s, t, 2.0))
    per_class = torch.tensor([1.0, 2.0, 4.0])
    expected = sum(loss_fn(s[..., k], t[..., k], float(per_class[k])) for k in range(3)) / 3
    assert torch.allclose(loss_fn(s, t, per_class), expected)


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize("loss_fn", SOFTMAX_LOSSES + SIGMOID_LOSSES)
def test_shape_mismatch_names_shapes(loss_fn):
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 4))


def test_kl_per_sample_temperature_shape_checked():
    with pytest.raises(ValueError, match=r"temperature\[labels\]"):
        kl_div_kd(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


def test_margin_kd_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        margin_kd(torch.zeros(3, 1), torch.zeros(3, 1))


def test_decoupled_kd_validates_target():
    with pytest.raises(ValueError, match="target"):
        decoupled_kd(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 classes"):
        decoupled_kd(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
