import math

import pytest
import torch

from densekd.losses import channel_attention_loss, relation_loss, spatial_attention_loss


def _pair(shape_s, shape_t=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape_s, generator=g), torch.randn(shape_t or shape_s, generator=g)


# (student shape, teacher shape): channel / embedding sizes differ on purpose
CASES = {
    "spatial": (spatial_attention_loss, (2, 3, 4, 4), (2, 5, 4, 4)),
    "channel": (channel_attention_loss, (2, 3, 4, 4), (2, 3, 2, 2)),
    "relation_maps": (relation_loss, (2, 3, 2, 3), (2, 5, 2, 3)),
    "relation_embeddings": (relation_loss, (6, 4), (6, 8)),
}


# --------------------------------------------------------------------------- hand-computed values


def test_spatial_attention_hand_computed():
    # squared activations [1, 4] and [4, 1], each / sqrt(17); differences -3/sqrt(17), 3/sqrt(17)
    s = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2)
    t = torch.tensor([2.0, 1.0]).reshape(1, 1, 1, 2)
    assert spatial_attention_loss(s, t).item() == pytest.approx(9 / 17, rel=1e-5)


def test_spatial_attention_averages_channels():
    # student position 0 holds channel values 1 and 3 (mean square 5), position 1 is all zero,
    # so its attention is [1, 0] after normalization; the teacher's is [0, 1] -> mean of 1, 1
    s = torch.tensor([[1.0, 0.0], [3.0, 0.0]]).reshape(1, 2, 1, 2)  # (N, C, H, W)
    t = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)
    assert spatial_attention_loss(s, t).item() == pytest.approx(1.0)


def test_channel_attention_hand_computed():
    # spatial means of squares: [1, 4] and [4, 1] -> same numbers as the spatial test
    s = torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1)
    t = torch.tensor([[2.0, 2.0], [1.0, -1.0]]).reshape(1, 2, 1, 2)  # means of squares 4, 1
    assert channel_attention_loss(s, t).item() == pytest.approx(9 / 17, rel=1e-5)


def test_relation_embeddings_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cosine affinity [[1, 0], [0, 1]]
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # [[1, c], [c, 1]], c = 1/sqrt(2)
    c = 1 / math.sqrt(2)
    assert relation_loss(s, t).item() == pytest.approx(2 * c**2 / 4, rel=1e-5)


def test_relation_feature_maps_use_positions_as_items():
    # (1, C, 1, 2): two positions with the channel vectors of the embedding test
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t().reshape(1, 2, 1, 2)
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]).t().reshape(1, 3, 1, 2)
    assert relation_loss(s, t).item() == pytest.approx(0.25, rel=1e-5)


# --------------------------------------------------------------------------- generic properties


@pytest.mark.parametrize("name", CASES)
def test_zero_when_equal_positive_otherwise(name):
    loss_fn, shape_s, shape_t = CASES[name]
    s, t = _pair(shape_s, shape_t)
    assert loss_fn(s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert loss_fn(s, t).item() > 1e-4


@pytest.mark.parametrize("name", CASES)
def test_gradient_reaches_student_not_teacher(name):
    loss_fn, shape_s, shape_t = CASES[name]
    s, t = _pair(shape_s, shape_t)
    s.requires_grad_(True), t.requires_grad_(True)
    loss_fn(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("name", CASES)
def test_empty_is_zero(name):
    loss_fn, shape_s, shape_t = CASES[name]
    s = torch.zeros((0,) + shape_s[1:], requires_grad=True)
    loss = loss_fn(s, torch.zeros((0,) + shape_t[1:]))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize("shape_s, shape_t", [((1, 4), (1, 7)), ((2, 3, 1, 1), (2, 5, 1, 1))])
def test_relation_single_item_is_zero(shape_s, shape_t):
    s, t = _pair(shape_s, shape_t)
    s.requires_grad_(True)
    loss = relation_loss(s, t)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- shape errors


def test_spatial_attention_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 8, 8\)"):
        spatial_attention_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        spatial_attention_loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_channel_attention_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"same N and C.*\(2, 3, 4, 4\).*\(2, 5, 4, 4\)"):
        channel_attention_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))


def test_relation_shape_errors():
    with pytest.raises(ValueError, match=r"same items.*\(5, 4\).*\(6, 4\)"):
        relation_loss(torch.zeros(5, 4), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="same rank"):
        relation_loss(torch.zeros(2, 3, 4, 4), torch.zeros(32, 3))
