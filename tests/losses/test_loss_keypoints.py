"""spatial_softmax_kd: per keypoint map, T^2 * KL over the softmax of its cells, computed by hand."""
import math

import pytest
import torch

from densekd.losses import spatial_softmax_kd


def _softmax(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _map_kd(s, t, T):
    """T^2 * KL(softmax(t / T) || softmax(s / T)) over the cells of one map, given as flat lists."""
    return T**2 * _kl(_softmax(t, T), _softmax(s, T))


# One RoI, two keypoints, 2 x 2 maps: (P, K, S, S) = (1, 2, 2, 2), cells listed row by row.
S_MAPS = [[1.0, 0.0, -1.0, 0.5], [2.0, 2.0, 0.0, -2.0]]
T_MAPS = [[0.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]]
STUDENT = torch.tensor([S_MAPS]).reshape(1, 2, 2, 2)
TEACHER = torch.tensor([T_MAPS]).reshape(1, 2, 2, 2)


def test_hand_computed_mean_over_maps():
    T = 2.0
    expected = (_map_kd(S_MAPS[0], T_MAPS[0], T) + _map_kd(S_MAPS[1], T_MAPS[1], T)) / 2
    got = spatial_softmax_kd(STUDENT, TEACHER, temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_visible_only_keeps_the_visible_keypoints_maps():
    T, visible = 1.5, torch.tensor([[False, True]])  # keypoint 0 not visible in the ground truth
    got = spatial_softmax_kd(STUDENT, TEACHER, temperature=T, visible=visible, visible_only=True)
    assert got.item() == pytest.approx(_map_kd(S_MAPS[1], T_MAPS[1], T), rel=1e-5)
    # visible is read only with visible_only: without it every map counts
    everything = spatial_softmax_kd(STUDENT, TEACHER, temperature=T, visible=visible)
    assert everything.item() == pytest.approx((_map_kd(S_MAPS[0], T_MAPS[0], T) + _map_kd(S_MAPS[1], T_MAPS[1], T)) / 2, rel=1e-5)


def test_weights_and_per_roi_temperature():
    # two RoIs (the same maps twice), RoI 0 at T = 1 with weight 3, RoI 1 at T = 4 with weight 1
    student, teacher = STUDENT.repeat(2, 1, 1, 1), TEACHER.repeat(2, 1, 1, 1)  # (2, 2, 2, 2)
    weights = torch.tensor([[3.0], [1.0]])  # (P, 1), one weight per RoI
    per_roi = [sum(_map_kd(s, t, T) for s, t in zip(S_MAPS, T_MAPS)) for T in (1.0, 4.0)]  # summed over 2 maps
    expected = (3.0 * per_roi[0] + 1.0 * per_roi[1]) / (2 * 3.0 + 2 * 1.0)
    got = spatial_softmax_kd(student, teacher, temperature=torch.tensor([1.0, 4.0]), weights=weights)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_softmax_is_shift_invariant_per_map():
    # a constant added to a whole map changes no spatial softmax: the loss stays 0
    shifted = STUDENT + torch.tensor([5.0, -3.0])[None, :, None, None]
    assert spatial_softmax_kd(shifted, STUDENT, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_identical_maps_give_zero():
    maps = torch.randn(3, 4, 7, 7)
    assert spatial_softmax_kd(maps, maps.clone(), temperature=3.0).item() == 0.0


def test_no_gradient_reaches_the_teacher():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    spatial_softmax_kd(student, teacher, temperature=2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_invisible_keypoints_get_no_gradient_even_when_extreme():
    student = torch.tensor([S_MAPS]).reshape(1, 2, 2, 2)
    student[0, 0] = torch.tensor([[1e30, -1e30], [0.0, 0.0]])  # garbage on the invisible keypoint
    student.requires_grad_(True)
    loss = spatial_softmax_kd(student, TEACHER, visible=torch.tensor([[False, True]]), visible_only=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(student.grad[0, 0] == 0) and student.grad[0, 1].abs().sum() > 0


def test_empty_and_all_invisible_give_zero():
    empty = torch.zeros(0, 3, 56, 56, requires_grad=True)
    loss = spatial_softmax_kd(empty, torch.zeros(0, 3, 56, 56), temperature=2.0)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    hidden = spatial_softmax_kd(STUDENT, TEACHER, visible=torch.zeros(1, 2, dtype=torch.bool), visible_only=True)
    assert hidden.item() == 0.0


def test_bad_inputs_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match="same shape"):
        spatial_softmax_kd(STUDENT, TEACHER[:, :1])
    with pytest.raises(ValueError, match=r"\(P, K, S_h, S_w\)"):
        spatial_softmax_kd(STUDENT[0], TEACHER[0])
    with pytest.raises(ValueError, match="visible_only=True needs visible"):
        spatial_softmax_kd(STUDENT, TEACHER, visible_only=True)
    with pytest.raises(ValueError, match=r"visible must have shape \(P, K\) = \(1, 2\)"):
        spatial_softmax_kd(STUDENT, TEACHER, visible=torch.ones(2, 1, dtype=torch.bool), visible_only=True)
    with pytest.raises(ValueError, match=r"one per RoI"):
        spatial_softmax_kd(STUDENT, TEACHER, temperature=torch.ones(2))
