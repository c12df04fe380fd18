"""Term.balance: a term scaled to a multiple of the student's own loss, measured over its first
balance_iters steps, frozen after them, and resumed with the distiller's state."""
import pytest
import torch
from tiny_detectors import build_fcos, make_batch

from densekd import Distiller, Term
from densekd.experiment.config import build_terms, parse_distillation_config


def _step(distiller, optimizer, seed):
    losses = distiller(*make_batch(seed=seed))
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return losses


def _distiller(balance_iters=3):
    torch.manual_seed(0)
    terms = [
        Term("hint", "features", weight=2.0, balance=0.5, balance_iters=balance_iters, name="balanced"),
        Term("hint", "features", name="raw"),
    ]
    return Distiller(build_fcos(fpn_width=32), build_fcos(fpn_width=64), terms).train()


def test_balanced_term_is_its_multiple_of_the_students_loss_then_frozen():
    distiller = _distiller(balance_iters=3)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-3)
    student_sums, raw_values, weights = [], [], []
    for seed in range(5):
        losses = _step(distiller, optimizer, seed)
        student_sums.append(sum(v.item() for k, v in losses.items() if not k.startswith("kd_")))
        raw_values.append(distiller.last_terms["kd_balanced"]["unscaled"].item())
        weights.append(distiller.last_terms["kd_balanced"]["weight"].item())
        scaled = losses["kd_balanced"].item()
        # scaled = weight * unscaled, with weight = 2.0 * 0.5 * mean(student loss) / mean(raw term)
        assert scaled == pytest.approx(weights[-1] * raw_values[-1], rel=1e-5)
    # Step 1: one step measured, so the scaled term equals 2.0 * 0.5 * this step's student loss.
    assert weights[0] * raw_values[0] == pytest.approx(2.0 * 0.5 * student_sums[0], rel=1e-5)
    expected = 2.0 * 0.5 * sum(student_sums[:3]) / sum(raw_values[:3])
    assert weights[2] == pytest.approx(expected, rel=1e-5)
    assert weights[3] == weights[4] == weights[2]  # frozen after balance_iters steps
    assert weights[0] != weights[1]
    assert distiller.last_terms["kd_raw"]["weight"].item() == 1.0  # an unbalanced term keeps its weight
    assert distiller.term_balance[0, 2].item() == 3 and distiller.term_balance[1].abs().sum() == 0


def test_balance_scale_resumes_with_the_distiller_state():
    distiller = _distiller(balance_iters=2)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=1e-3)
    for seed in range(3):
        _step(distiller, optimizer, seed)
    resumed = _distiller(balance_iters=2)
    resumed.load_state_dict(distiller.state_dict())
    assert torch.equal(resumed.term_balance, distiller.term_balance)
    resumed(*make_batch(seed=7))
    distiller(*make_batch(seed=7))
    assert resumed.last_terms["kd_balanced"]["weight"] == distiller.last_terms["kd_balanced"]["weight"]


def test_balance_settings_are_checked_and_read_from_yaml():
    with pytest.raises(ValueError, match="balance must be a positive number"):
        Term("hint", "features", balance=0.0)
    with pytest.raises(ValueError, match="balance_iters must be a whole number >= 1"):
        Term("hint", "features", balance=1.0, balance_iters=0)
    config = parse_distillation_config({"terms": [{"loss": "cwd", "on": "features", "balance": 1, "balance_iters": 20}]})
    (term,) = build_terms(config)
    assert term.balance == 1 and term.balance_iters == 20
