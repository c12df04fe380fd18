"""The losses' cheaper forms give exactly what their reference formulas give: GIoU as
torchvision computes it, KL as ``F.kl_div`` computes it, Bernoulli KD at T = 1 as at any
tensor temperature of 1. Values and gradients are compared bit for bit, not approximately."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from densekd.losses import binary_kd, decoupled_kd, focal_binary_kd, focal_kl_kd, giou_kd, kl_div_kd


def _box_pairs(n=600, seed=0):
    """Overlapping, disjoint, identical and edge-touching (x1, y1, x2, y2) box pairs."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    a = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 1], dim=1)
    shifted = xy + torch.randn(n, 2, generator=g) * 15
    b = torch.cat([shifted, shifted + torch.rand(n, 2, generator=g) * 30 + 1], dim=1)
    b[:50] = a[:50]  # identical
    b[50:100, 0] = a[50:100, 2]  # b starts where a ends: zero-width overlap
    b[50:100, 2] = b[50:100, 0] + 5
    return a, b


def _value_and_grad(fn, student, *args, **kwargs):
    student = student.clone().requires_grad_(True)
    value = fn(student, *args, **kwargs)
    value.backward(torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape))
    return value.detach(), student.grad


def test_giou_kd_equals_torchvision_generalized_box_iou_loss_bit_for_bit():
    student, teacher = _box_pairs()
    weights = torch.rand(len(student), generator=torch.Generator().manual_seed(1))
    ours = _value_and_grad(giou_kd, student, teacher, weights=weights)
    reference = _value_and_grad(
        lambda s, t: (weights * generalized_box_iou_loss(s, t, reduction="none")).sum() / weights.sum(), student, teacher
    )
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    leading = _value_and_grad(giou_kd, student.reshape(3, -1, 4), teacher.reshape(3, -1, 4))
    assert torch.equal(leading[1].reshape(-1, 4), _value_and_grad(giou_kd, student, teacher)[1])


def _kl_div_reference(student, teacher, temperature, weights=None):
    """Hinton KD written with F.kl_div, as densekd computed it before."""
    t = torch.as_tensor(temperature, dtype=student.dtype)
    t = t.unsqueeze(-1) if t.dim() == 1 else t
    log_p_s, log_p_t = F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1)
    rows = (F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True) * t**2).sum(dim=-1)
    return rows.mean() if weights is None else (weights * rows).sum() / weights.sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, torch.tensor([0.5, 1.0, 3.0, 2.0, 1.5, 4.0])])
def test_kl_div_kd_matches_the_kl_div_formula(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    weights = torch.rand(6, generator=g)
    ours = _value_and_grad(kl_div_kd, student, teacher, temperature, weights)
    reference = _value_and_grad(_kl_div_reference, student, teacher, temperature, weights)
    # T^2 now multiplies row sums instead of every element: equal up to rounding.
    assert torch.allclose(ours[0], reference[0], rtol=1e-6, atol=0)
    assert torch.allclose(ours[1], reference[1], rtol=1e-5, atol=1e-8)


def test_other_kl_losses_still_zero_when_equal_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    target = torch.tensor([0, 3, 6, 1, 2])
    for loss in (lambda s, t: focal_kl_kd(s, t, 2.0), lambda s, t: decoupled_kd(s, t, target, 2.0)):
        assert loss(student, student.clone()).abs().item() < 1e-6
        assert loss(student, teacher).item() > 0


@pytest.mark.parametrize("loss_fn", [binary_kd, focal_binary_kd])
def test_sigmoid_losses_at_number_one_equal_tensor_one_bit_for_bit(loss_fn):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 30, 5, generator=g), torch.randn(2, 30, 5, generator=g)
    weights = torch.rand(2, 30, 1, generator=g)
    number = _value_and_grad(loss_fn, student, teacher, 1.0, weights=weights)
    tensor = _value_and_grad(loss_fn, student, teacher, torch.tensor(1.0), weights=weights)
    assert torch.equal(number[0], tensor[0]) and torch.equal(number[1], tensor[1])
    at_two = _value_and_grad(loss_fn, student, teacher, 2.0, weights=weights)
    assert torch.equal(at_two[0], _value_and_grad(loss_fn, student, teacher, torch.tensor(2.0), weights=weights)[0])
