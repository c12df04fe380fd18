"""Distillation losses on classification logits: softmax heads (RoI box predictor, segmentation)
and sigmoid heads (RetinaNet/FCOS class logits, RPN objectness, FCOS centerness).

Every function returns an unweighted scalar; teacher logits are detached inside.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._reduce import _check_same_shape, _weighted_mean

Temperature = Union[float, torch.Tensor]


# --------------------------------------------------------------------------- helpers


def _is_one(temperature: Temperature) -> bool:
    """A temperature given as the number 1: no scaling to do (checked without a device sync)."""
    return isinstance(temperature, (int, float)) and temperature == 1


def _temperature_tensor(temperature: Temperature, logits: torch.Tensor) -> torch.Tensor:
    """The temperature in the logits' dtype. A number becomes a 0-d CPU tensor, which any
    device's kernels take as a scalar operand: no host-to-device copy on every call."""
    if isinstance(temperature, (int, float)):
        return torch.tensor(float(temperature), dtype=logits.dtype)
    return torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)


def _row_temperature(temperature: Temperature, logits: torch.Tensor) -> torch.Tensor:
    """float, () or (R,) or (R, 1) -> tensor broadcastable to logits (R, C)."""
    t = _temperature_tensor(temperature, logits)
    if t.dim() == 1:
        t = t.unsqueeze(-1)  # (R,) -> (R, 1): one temperature per sample
    if t.dim() > 0 and (t.dim() != 2 or t.shape[1] != 1 or t.shape[0] not in (1, logits.shape[0])):
        raise ValueError(
            f"temperature must be a number or have shape (R,) or (R, 1) for logits {tuple(logits.shape)}, "
            f"got {tuple(torch.as_tensor(temperature).shape)}; for a per-class temperature pass "
            f"temperature[labels], one entry per sample"
        )
    return t


def _tempered_log_probs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: Temperature
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked, teacher-detached log-softmax at temperature T: (log_p_s (R, C), log_p_t (R, C), T)."""
    _check_same_shape(student_logits, teacher_logits, "logits")
    t = _row_temperature(temperature, student_logits)
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return log_p_s, log_p_t, t


def _kl_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) summed over the last dim: (R, C) log-probs -> (R,); ``t`` is ()
    or (R, 1).

    ``F.kl_div(log_p_s, log_p_t, log_target=True)`` term by term, with ``p_t = exp(log_p_t)``
    taken once as a constant (kl_div's backward would exponentiate again) and T^2 applied to
    the row sums rather than to every element.
    """
    p_t = log_p_t.exp()
    kl = p_t * (log_p_t - log_p_s)  # (R, C)
    return kl.sum(dim=-1) * (t**2).squeeze(-1)  # (R,) * () or (R,)


def _bernoulli_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: Optional[torch.Tensor]
) -> torch.Tensor:
    """Elementwise T^2 * KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T))), same shape as the logits.

    ``teacher_logits`` must already be detached. ``t`` None means T = 1: the divisions and the
    T^2 product, which would not change a value, are skipped.
    """
    z_s, z_t = (student_logits, teacher_logits) if t is None else (student_logits / t, teacher_logits / t)
    p_t = torch.sigmoid(z_t)
    # Cross-entropy minus the target's own entropy: exactly zero when student == teacher.
    cross = F.binary_cross_entropy_with_logits(z_s, p_t, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(z_t, p_t, reduction="none")
    return cross - entropy if t is None else (cross - entropy) * t**2


def _sigmoid_temperature(temperature: Temperature, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """None for T = 1 (see ``_bernoulli_kl``), else the temperature as a tensor."""
    return None if _is_one(temperature) else _temperature_tensor(temperature, logits)


def _require_two_classes(logits: torch.Tensor, loss_name: str) -> None:
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(
            f"{loss_name} needs at least 2 classes in the last dim, got logits of shape {tuple(logits.shape)}"
        )


# --------------------------------------------------------------------------- softmax heads


def kl_div_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: Temperature = 1.0,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Temperature-scaled KL distillation for softmax heads.

    Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network".
    Per sample: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, summed over classes; then the
    (weighted) mean over samples.

    Args:
        student_logits: (R, C), e.g. RoI class logits with background at index 0.
        teacher_logits: (R, C).
        temperature: float, or tensor of shape (), (R,) or (R, 1): a per-sample temperature,
            e.g. a per-class temperature looked up by each RoI's class.
        weights: (R,) non-negative per-sample weights, or None.

    Returns:
        scalar tensor.
    """
    log_p_s, log_p_t, t = _tempered_log_probs(student_logits, teacher_logits, temperature)
    return _weighted_mean(_kl_rows(log_p_s, log_p_t, t), weights)


def focal_kl_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: Temperature = 1.0,
    gamma: float = 2.0,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Focal KL distillation: per-sample KL modulated by ``(1 - p_s[y_t])^gamma``.

    Modulation from the focal loss: Lin, Goyal, Girshick, He & Dollar, 2017, "Focal Loss for Dense
    Object Detection"; applied here to the KD term of Hinton et al. 2015. ``y_t`` is the teacher's
    argmax and ``p_s`` the student's softmax at temperature T. Samples the student already gets
    confidently right are down-weighted.

    Note: the focal factor is detached (a weight, not a loss term), unlike the original focal loss
    whose factor is differentiated.

    Args:
        student_logits: (R, C).
        teacher_logits: (R, C).
        temperature: float or tensor (), (R,) or (R, 1), as in ``kl_div_kd``.
        gamma: focusing exponent; 0 recovers ``kl_div_kd``.
        weights: (R,) or None.
    """
    log_p_s, log_p_t, t = _tempered_log_probs(student_logits, teacher_logits, temperature)
    y_t = log_p_t.argmax(dim=-1, keepdim=True)  # (R, 1)
    p_s_on_teacher_class = log_p_s.detach().gather(-1, y_t).squeeze(-1).exp()  # (R,)
    focal = (1.0 - p_s_on_teacher_class).pow(gamma)
    return _weighted_mean(focal * _kl_rows(log_p_s, log_p_t, t), weights)


def margin_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Margin-aware distillation: the student's top-1 margin must reach the teacher's.

    With ``y`` the teacher's argmax and margin ``m(z) = z[y] - max_{c != y} z[c]``, the per-sample
    loss is ``relu(m(t) - m(s))``: the student is penalized when its gap between the teacher's
    class and the runner-up is smaller than the teacher's. Zero when student == teacher.
    The margin is the multi-class margin of Crammer & Singer, 2001, "On the Algorithmic
    Implementation of Multiclass Kernel-based Vector Machines" (JMLR).

    Note: no single KD paper defines this loss; hinging on the teacher's margin instead of a fixed
    margin of 1 is densekd's own formulation of "emphasize the top-1 vs competitor gap". There is
    no temperature: margins of raw logits are compared.

    Args:
        student_logits: (R, C), C >= 2.
        teacher_logits: (R, C).
        weights: (R,) or None.
    """
    _check_same_shape(student_logits, teacher_logits, "logits")
    _require_two_classes(student_logits, "margin_kd")
    teacher_logits = teacher_logits.detach()
    y = teacher_logits.argmax(dim=-1, keepdim=True)  # (R, 1)

    def margin(z: torch.Tensor) -> torch.Tensor:  # (R, C) -> (R,)
        runner_up = z.scatter(-1, y, float("-inf")).amax(dim=-1)
        return z.gather(-1, y).squeeze(-1) - runner_up

    return _weighted_mean(F.relu(margin(teacher_logits) - margin(student_logits)), weights)


def decoupled_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: Temperature = 1.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decoupled Knowledge Distillation (DKD).

    Zhao, Cui, Song, Qiu & Liang, 2022, "Decoupled Knowledge Distillation" (CVPR).
    Per sample: ``alpha * TCKD + beta * NCKD``, each times T^2, where
    TCKD = KL between the binary distributions [p_target, 1 - p_target] of teacher and student and
    NCKD = KL between the softmax over the non-target classes only.

    Notes (departures from the official mdistiller code, same values):
        - NCKD drops the target column instead of subtracting 1000 from it before the softmax.
        - TCKD uses log-sum-exp log-probabilities instead of ``log`` of summed probabilities, so it
          stays finite for confident logits.

    Args:
        student_logits: (R, C), C >= 2.
        teacher_logits: (R, C).
        target: (R,) long ground-truth class per sample (for RoIs: the matched label, 0 = background).
        temperature: float or tensor (), (R,) or (R, 1), as in ``kl_div_kd``.
        alpha: TCKD weight.
        beta: NCKD weight.
        weights: (R,) or None.
    """
    _check_same_shape(student_logits, teacher_logits, "logits")
    if student_logits.dim() != 2:
        raise ValueError(f"decoupled_kd expects logits of shape (R, C), got {tuple(student_logits.shape)}")
    _require_two_classes(student_logits, "decoupled_kd")
    num_samples, num_classes = student_logits.shape
    if target.shape != (num_samples,):
        raise ValueError(f"target must have shape ({num_samples},), got {tuple(target.shape)}")
    t = _row_temperature(temperature, student_logits)
    z_s, z_t = student_logits / t, teacher_logits.detach() / t  # (R, C)
    is_target = F.one_hot(target, num_classes).bool()  # (R, C)

    def target_vs_rest(z: torch.Tensor) -> torch.Tensor:  # (R, C) -> (R, 2) log [p_y, 1 - p_y]
        log_norm = z.logsumexp(dim=-1)
        log_p_y = z[is_target] - log_norm  # exactly one True per row -> (R,)
        log_p_rest = z.masked_fill(is_target, float("-inf")).logsumexp(dim=-1) - log_norm
        return torch.stack([log_p_y, log_p_rest], dim=-1)

    def non_target(z: torch.Tensor) -> torch.Tensor:  # (R, C) -> (R, C - 1) log-softmax
        return F.log_softmax(z[~is_target].reshape(num_samples, num_classes - 1), dim=-1)

    tckd = _kl_rows(target_vs_rest(z_s), target_vs_rest(z_t), t)
    nckd = _kl_rows(non_target(z_s), non_target(z_t), t)
    return _weighted_mean(alpha * tckd + beta * nckd, weights)


# --------------------------------------------------------------------------- sigmoid heads


def binary_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: Temperature = 1.0,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-element binary (sigmoid) distillation for heads without a softmax.

    Hinton et al. 2015 KD applied independently to each sigmoid output:
    ``T^2 * KL(Bern(sigmoid(t / T)) || Bern(sigmoid(s / T)))`` per element, i.e. BCE with the
    teacher's soft target minus that target's entropy, so it is exactly zero when student ==
    teacher (plain soft-target BCE is not).

    Args:
        student_logits: any shape, e.g. RetinaNet/FCOS class logits (N, HWA, K), RPN objectness
            (N, HWA), FCOS centerness (N, HW).
        teacher_logits: same shape.
        temperature: float or tensor broadcastable to the logits, e.g. per-class (K,).
        weights: broadcastable to the logits, e.g. (N, HWA, 1) position weights * (K,) class weights.
    """
    _check_same_shape(student_logits, teacher_logits, "logits")
    t = _sigmoid_temperature(temperature, student_logits)
    return _weighted_mean(_bernoulli_kl(student_logits, teacher_logits.detach(), t), weights)


def focal_binary_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: Temperature = 1.0,
    gamma: float = 2.0,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Binary distillation modulated by ``|p_t - p_s|^gamma``.

    The modulation is Quality Focal Loss's (Li, Wang, Wu, Chen, Hu, Li, Tang & Yang, 2020,
    "Generalized Focal Loss", NeurIPS) with the teacher's probability as the soft target: elements
    where the student already matches the teacher are down-weighted. ``p`` are sigmoids at T.

    Notes: QFL multiplies soft-target BCE; here it multiplies the Bernoulli KL of ``binary_kd``
    (BCE minus the target entropy), so the loss is zero at student == teacher. The factor is
    detached (a weight), whereas QFL differentiates it.

    Args:
        student_logits: any shape, e.g. (N, HWA, K).
        teacher_logits: same shape.
        temperature: float or tensor broadcastable to the logits, e.g. per-class (K,).
        gamma: focusing exponent (QFL's beta, 2 in the paper); 0 recovers ``binary_kd``.
        weights: broadcastable to the logits, or None.
    """
    _check_same_shape(student_logits, teacher_logits, "logits")
    t = _sigmoid_temperature(temperature, student_logits)
    teacher_logits = teacher_logits.detach()
    scaled = (lambda z: z) if t is None else (lambda z: z / t)
    gap = torch.sigmoid(scaled(teacher_logits)) - torch.sigmoid(scaled(student_logits.detach()))
    focal = gap.abs().pow(gamma)
    return _weighted_mean(focal * _bernoulli_kl(student_logits, teacher_logits, t), weights)


# --------------------------------------------------------------------------- module shells


class KLDivKD(nn.Module):
    """``kl_div_kd`` with a stored temperature."""

    def __init__(self, temperature: Temperature = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits, weights=None):
        return kl_div_kd(student_logits, teacher_logits, self.temperature, weights)


class FocalKLKD(nn.Module):
    """``focal_kl_kd`` with stored temperature and gamma."""

    def __init__(self, temperature: Temperature = 1.0, gamma: float = 2.0):
        super().__init__()
        self.temperature, self.gamma = temperature, gamma

    def forward(self, student_logits, teacher_logits, weights=None):
        return focal_kl_kd(student_logits, teacher_logits, self.temperature, self.gamma, weights)


class MarginKD(nn.Module):
    """``margin_kd`` as a module."""

    def forward(self, student_logits, teacher_logits, weights=None):
        return margin_kd(student_logits, teacher_logits, weights)


class DecoupledKD(nn.Module):
    """``decoupled_kd`` with stored temperature, alpha and beta."""

    def __init__(self, temperature: Temperature = 1.0, alpha: float = 1.0, beta: float = 8.0):
        super().__init__()
        self.temperature, self.alpha, self.beta = temperature, alpha, beta

    def forward(self, student_logits, teacher_logits, target, weights=None):
        return decoupled_kd(
            student_logits, teacher_logits, target, self.temperature, self.alpha, self.beta, weights
        )


class BinaryKD(nn.Module):
    """``binary_kd`` with a stored temperature."""

    def __init__(self, temperature: Temperature = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits, weights=None):
        return binary_kd(student_logits, teacher_logits, self.temperature, weights)


class FocalBinaryKD(nn.Module):
    """``focal_binary_kd`` with stored temperature and gamma."""

    def __init__(self, temperature: Temperature = 1.0, gamma: float = 2.0):
        super().__init__()
        self.temperature, self.gamma = temperature, gamma

    def forward(self, student_logits, teacher_logits, weights=None):
        return focal_binary_kd(student_logits, teacher_logits, self.temperature, self.gamma, weights)
