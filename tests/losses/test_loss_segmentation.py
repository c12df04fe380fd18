"""Segmentation losses: hand-computed values, ignored pixels without effect, class weights,
zero at student == teacher, gradients into the student only."""
import math

import pytest
import torch

import densekd.losses as losses
from densekd.losses import channel_wise_kd, pairwise_affinity_kd, pixel_class_weights, pixel_kl_kd


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _kl(p_logits, q_logits, t):
    """KL(softmax(p / t) || softmax(q / t)) of two plain lists."""
    ep, eq = [math.exp(v / t) for v in p_logits], [math.exp(v / t) for v in q_logits]
    p, q = [v / sum(ep) for v in ep], [v / sum(eq) for v in eq]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# Two classes, three pixels in a row: (N, K, H, W) = (1, 2, 1, 3); pixel i has student logits
# S[i] and teacher logits T[i].
S = [[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]]
T = [[0.0, 1.0], [1.0, 1.0], [-2.0, 2.0]]
STUDENT = torch.tensor(S).t().reshape(1, 2, 1, 3)
TEACHER = torch.tensor(T).t().reshape(1, 2, 1, 3)


# --------------------------------------------------------------------------- pixel-wise KL


def test_pixel_kl_hand_computed():
    t = 2.0
    expected = t**2 * sum(_kl(T[i], S[i], t) for i in range(3)) / 3
    assert pixel_kl_kd(STUDENT, TEACHER, temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_pixel_kl_ignore_and_weights_hand_computed():
    ignore = torch.tensor([[[False, True, False]]])
    expected = (_kl(T[0], S[0], 1.0) + _kl(T[2], S[2], 1.0)) / 2
    assert pixel_kl_kd(STUDENT, TEACHER, ignore=ignore).item() == pytest.approx(expected, rel=1e-5)
    weights = torch.tensor([[[3.0, 5.0, 1.0]]])
    expected = (3 * _kl(T[0], S[0], 1.0) + 1 * _kl(T[2], S[2], 1.0)) / 4  # the ignored pixel's 5 drops out
    assert pixel_kl_kd(STUDENT, TEACHER, ignore=ignore, weights=weights).item() == pytest.approx(expected, rel=1e-5)


def test_pixel_kl_per_pixel_temperature():
    temperature = torch.tensor([[[1.0, 2.0, 4.0]]])
    expected = sum(tt**2 * _kl(T[i], S[i], tt) for i, tt in enumerate([1.0, 2.0, 4.0])) / 3
    assert pixel_kl_kd(STUDENT, TEACHER, temperature=temperature).item() == pytest.approx(expected, rel=1e-5)


def test_pixel_kl_ignored_pixels_have_no_effect():
    s, t = _pair((2, 5, 4, 4))
    ignore = torch.zeros(2, 4, 4, dtype=torch.bool)
    ignore[0, :2] = True
    ignore[1, :, 3] = True
    # (N, H, W) -> (N, 1, H, W): new logits at the ignored pixels only
    changed_s, changed_t = s.masked_fill(ignore[:, None], 50.0), t.masked_fill(ignore[:, None], -30.0)
    base = pixel_kl_kd(s, t, 2.0, ignore=ignore)
    assert torch.equal(pixel_kl_kd(changed_s, changed_t, 2.0, ignore=ignore), base)
    student = s.clone().requires_grad_(True)
    pixel_kl_kd(student, t, 2.0, ignore=ignore).backward()
    assert (student.grad.abs().sum(dim=1)[ignore] == 0).all() and student.grad.abs().sum() > 0


def test_pixel_kl_zero_when_equal_and_gradient_only_into_student():
    s, t = _pair((2, 4, 3, 3))
    assert pixel_kl_kd(t, t.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True), t.requires_grad_(True)
    pixel_kl_kd(s, t, 2.0).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_pixel_kl_all_ignored_is_zero_and_keeps_the_graph():
    s = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = pixel_kl_kd(s, torch.randn(1, 3, 2, 2), ignore=torch.ones(1, 2, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()


def test_pixel_kl_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(1, 2, 1, 3\).*\(1, 3, 1, 3\)"):
        pixel_kl_kd(STUDENT, torch.zeros(1, 3, 1, 3))
    with pytest.raises(ValueError, match=r"ignore must have shape \(1, 1, 3\)"):
        pixel_kl_kd(STUDENT, TEACHER, ignore=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expects \(N, K, H, W\)"):
        pixel_kl_kd(torch.zeros(3, 2), torch.zeros(3, 2))


def test_pixel_class_weights_follow_the_ground_truth_and_skip_ignored_pixels():
    target = torch.tensor([[[0, 2, 255], [1, 1, 0]]])
    weights = pixel_class_weights(target, torch.tensor([0.5, 1.0, 4.0]))
    assert torch.equal(weights, torch.tensor([[[0.5, 4.0, 0.0], [1.0, 1.0, 0.5]]]))
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        pixel_class_weights(torch.tensor([[[3]]]), torch.ones(3))


# --------------------------------------------------------------------------- CWD with ignored pixels


def test_cwd_ignore_removes_positions_from_every_channel_distribution():
    # With the middle position ignored, CWD equals CWD on the maps without that position.
    kept = [0, 2]
    expected = channel_wise_kd(STUDENT[..., kept], TEACHER[..., kept], temperature=2.0)
    ignore = torch.tensor([[[False, True, False]]])
    assert channel_wise_kd(STUDENT, TEACHER, 2.0, ignore=ignore).item() == pytest.approx(expected.item(), rel=1e-6)
    # hand: channel c's distribution over the two kept positions
    hand = 4.0 * (_kl([T[0][0], T[2][0]], [S[0][0], S[2][0]], 2.0) + _kl([T[0][1], T[2][1]], [S[0][1], S[2][1]], 2.0)) / 2
    assert expected.item() == pytest.approx(hand, rel=1e-5)


def test_cwd_ignored_positions_have_no_effect_and_get_no_gradient():
    s, t = _pair((2, 3, 4, 4))
    ignore = torch.zeros(2, 4, 4, dtype=torch.bool)
    ignore[:, 0] = True
    ignore[1] = True  # a fully ignored image drops out
    base = channel_wise_kd(s, t, 4.0, ignore=ignore)
    assert base.item() == pytest.approx(channel_wise_kd(s[:1, :, 1:], t[:1, :, 1:], 4.0).item(), rel=1e-6)
    changed_s, changed_t = s.masked_fill(ignore[:, None], 100.0), t.masked_fill(ignore[:, None], -7.0)
    assert torch.allclose(channel_wise_kd(changed_s, changed_t, 4.0, ignore=ignore), base, atol=1e-7)
    student = s.clone().requires_grad_(True)
    channel_wise_kd(student, t, 4.0, ignore=ignore).backward()
    assert torch.isfinite(student.grad).all() and (student.grad[ignore[:, None].expand_as(s)] == 0).all()


def test_cwd_channel_weights_are_a_weighted_mean_over_channels():
    s, t = _pair((1, 2, 3, 3))
    per_channel = [channel_wise_kd(s[:, c : c + 1], t[:, c : c + 1], 2.0).item() for c in range(2)]
    weighted = channel_wise_kd(s, t, 2.0, weights=torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx((per_channel[0] + 3 * per_channel[1]) / 4, rel=1e-5)
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\) or \(1, 2\)"):
        channel_wise_kd(s, t, weights=torch.ones(3))


def test_cwd_without_ignore_or_weights_is_unchanged():
    s, t = _pair((2, 3, 4, 4))
    no_ignore = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert torch.allclose(channel_wise_kd(s, t, 3.0, ignore=no_ignore), channel_wise_kd(s, t, 3.0), atol=1e-6)


# --------------------------------------------------------------------------- pair-wise affinity


def test_pairwise_affinity_hand_computed_on_max_pooled_nodes():
    # (1, C, 1, 4) maps, scale 0.5 -> nodes of 1 x 2 positions, max-pooled.
    # student positions [1, 0], [0, 0] | [0, 1], [-1, -1] -> nodes [1, 0] and [0, 1]: cosine 0
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]).t().reshape(1, 2, 1, 4)
    # teacher nodes [1, 0, 0] and [1, 1, 0]: cosine 1 / sqrt(2)
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).t().reshape(1, 3, 1, 4)
    c = 1 / math.sqrt(2)
    expected = 2 * c**2 / 4  # two off-diagonal pairs differ by c, over 2 x 2 node pairs
    assert pairwise_affinity_kd(student, teacher, scale=0.5).item() == pytest.approx(expected, rel=1e-5)


def test_pairwise_affinity_zero_when_equal_one_node_and_gradient():
    s, t = _pair((2, 4, 6, 6))
    assert pairwise_affinity_kd(t, t.clone(), 0.25).item() == pytest.approx(0.0, abs=1e-6)
    assert pairwise_affinity_kd(s, t, scale=1.0).item() == 0.0  # a single node has no pairs
    s.requires_grad_(True), t.requires_grad_(True)
    pairwise_affinity_kd(s, t, 0.25).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="scale must lie in"):
        pairwise_affinity_kd(s, t, scale=0.0)
    with pytest.raises(ValueError, match="same N, H, W"):
        pairwise_affinity_kd(s, t[..., :3])


def test_segmentation_shells_equal_functional():
    s, t = _pair((2, 3, 4, 4))
    ignore = torch.rand(2, 4, 4) > 0.7
    assert torch.equal(losses.PixelKLKD(2.0)(s, t, ignore), pixel_kl_kd(s, t, 2.0, ignore))
    assert torch.equal(losses.PairwiseAffinityKD(0.5)(s, t), pairwise_affinity_kd(s, t, 0.5))
    assert torch.equal(losses.ChannelWiseKD(2.0)(s, t, ignore), channel_wise_kd(s, t, 2.0, ignore))
