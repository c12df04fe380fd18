"""pseudo_target_kd: the student's loss sees exactly the detections above the threshold, the value
is their mean score times the loss, nothing kept gives zero, and no gradient reaches the teacher."""
import pytest
import torch

from densekd.losses import PseudoTargetKD, pseudo_target_kd

DETECTIONS = [
    {
        "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 8.0, 8.0], [1.0, 1.0, 3.0, 5.0]]),
        "labels": torch.tensor([1, 2, 3]),
        "scores": torch.tensor([0.9, 0.3, 0.6]),
    },
    {"boxes": torch.tensor([[5.0, 5.0, 9.0, 9.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.2])},
]


class RecordingLoss:
    """A stand-in for a detector's loss: records its targets, returns a loss dict that depends on
    the predictions ``x`` and on the number of targets."""

    def __init__(self, x):
        self.x, self.seen = x, None

    def __call__(self, targets):
        self.seen = targets
        count = sum(len(t["boxes"]) for t in targets)
        return {"classification": self.x.sum() * (1 + count), "bbox_regression": self.x.pow(2).sum()}


def test_only_detections_above_the_threshold_are_targets_and_the_mean_score_scales():
    x = torch.tensor([0.5, 1.0], requires_grad=True)
    student_loss = RecordingLoss(x)
    loss = pseudo_target_kd(student_loss, DETECTIONS, score_threshold=0.5)
    # Kept: image 0's boxes 0 and 2 (0.9, 0.6); image 1 keeps nothing (0.2). Loss dict: 1.5 * 3 + 1.25.
    assert torch.equal(student_loss.seen[0]["boxes"], DETECTIONS[0]["boxes"][[0, 2]])
    assert student_loss.seen[0]["labels"].tolist() == [1, 3]
    assert student_loss.seen[1]["boxes"].shape == (0, 4) and student_loss.seen[1]["labels"].numel() == 0
    assert loss.item() == pytest.approx((0.9 + 0.6) / 2 * (1.5 * 3 + 1.25))


def test_nothing_above_the_threshold_gives_a_zero_that_keeps_the_graph():
    x = torch.tensor([0.5, 1.0], requires_grad=True)
    loss = pseudo_target_kd(RecordingLoss(x), DETECTIONS, score_threshold=0.95)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_no_gradient_reaches_the_teacher():
    detections = [{k: (v.float().requires_grad_() if k != "labels" else v) for k, v in d.items()} for d in DETECTIONS]
    x = torch.tensor([0.5, 1.0], requires_grad=True)
    pseudo_target_kd(lambda targets: {"l": x.sum() + sum(t["boxes"].sum() for t in targets)}, detections).backward()
    assert x.grad is not None
    assert all(d["boxes"].grad is None and d["scores"].grad is None for d in detections)


def test_module_shell_equals_functional():
    x = torch.tensor([0.5, 1.0])
    expected = pseudo_target_kd(RecordingLoss(x), DETECTIONS, 0.25)
    assert torch.equal(PseudoTargetKD(0.25)(RecordingLoss(x), DETECTIONS), expected)
