"""matched_giou_kd: hand-computed matches and values, zero for the teacher's own boxes, no
gradient into the teacher, zero when nothing matches, and torchvision's GIoU on the matched pairs."""
import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou_loss

from densekd.losses import MatchedGIoUKD, matched_giou_kd

# Image 0: a confident teacher box and one below the score threshold; image 1: one teacher box.
TEACHER = [torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 14.0, 14.0]]), torch.tensor([[0.0, 0.0, 2.0, 2.0]])]
SCORES = [torch.tensor([0.8, 0.4]), torch.tensor([0.6])]
STUDENT = [
    torch.tensor(
        [
            [0.0, 0.0, 4.0, 2.0],  # IoU 8 / 16 = 0.5 with box 0: matched
            [0.0, 0.0, 2.0, 2.0],  # IoU 4 / 16 = 0.25: unmatched
            [10.0, 10.0, 14.0, 14.0],  # the score-0.4 box exactly: that box is left out, so unmatched
        ]
    ),
    torch.tensor([[0.0, 0.0, 2.0, 2.0], [10.0, 10.0, 14.0, 14.0]]),  # image 1's box exactly; far off: unmatched
]


def test_hand_computed_matches_weights_and_value():
    # Image 0: GIoU(S, T) = IoU - (C - U) / C = 8/16 - (16 - 16)/16 = 0.5 -> loss 0.5, weight 0.8.
    # Image 1: identical boxes -> loss 0, weight 0.6. Weighted mean: (0.8 * 0.5 + 0.6 * 0) / 1.4.
    loss = matched_giou_kd(STUDENT, TEACHER, SCORES, iou_threshold=0.5, score_threshold=0.5)
    assert loss.item() == pytest.approx(0.8 * 0.5 / 1.4, abs=1e-6)
    # Lower the score threshold: the 0.4 box now matches student box 2 exactly (loss 0, weight 0.4).
    loss = matched_giou_kd(STUDENT, TEACHER, SCORES, iou_threshold=0.5, score_threshold=0.3)
    assert loss.item() == pytest.approx(0.8 * 0.5 / 1.8, abs=1e-6)
    # Raise the IoU threshold past 0.5: only image 1's exact match is left, so the loss is ~0.
    assert matched_giou_kd(STUDENT, TEACHER, SCORES, iou_threshold=0.6).item() == pytest.approx(0.0, abs=1e-6)
    # Extra per-detection weights multiply the scores: image 1's zero loss now weighs 0.6 * 3.
    weights = [torch.tensor([1.0, 1.0]), torch.tensor([3.0])]
    loss = matched_giou_kd(STUDENT, TEACHER, SCORES, weights=weights)
    assert loss.item() == pytest.approx(0.8 * 0.5 / (0.8 + 1.8), abs=1e-6)


def test_boxes_match_only_within_their_image():
    # Image 1's student box equals image 0's teacher box, but image 1 has no teacher box there.
    student = [torch.tensor([[5.0, 5.0, 6.0, 6.0]]), torch.tensor([[0.0, 0.0, 4.0, 4.0]])]
    teacher = [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[20.0, 20.0, 24.0, 24.0]])]
    scores = [torch.tensor([0.9]), torch.tensor([0.9])]
    assert matched_giou_kd(student, teacher, scores).item() == 0.0


def test_zero_when_the_student_predicts_the_teachers_boxes():
    torch.manual_seed(0)
    corners = torch.rand(6, 2) * 50
    teacher = torch.cat([corners, corners + 5 + torch.rand(6, 2) * 30], dim=1)  # (6, 4)
    scores = torch.rand(6) * 0.5 + 0.5
    student = teacher.clone().requires_grad_()
    loss = matched_giou_kd(student, teacher, scores)  # one image as plain tensors
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # torchvision's eps: about 1e-7 / area


def test_no_gradient_reaches_the_teacher_and_matching_is_constant():
    teacher = [t.clone().requires_grad_() for t in TEACHER]
    scores = [s.clone().requires_grad_() for s in SCORES]
    student = [s.clone().requires_grad_() for s in STUDENT]
    matched_giou_kd(student, teacher, scores).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is None for s in scores)
    assert student[0].grad[0].abs().sum() > 0  # the matched box moves
    assert student[0].grad[1:].abs().sum() == 0  # unmatched boxes get no gradient


def test_nothing_to_match_gives_a_zero_that_keeps_the_graph():
    student = [STUDENT[0].clone().requires_grad_()]
    for teacher, scores in [(torch.zeros(0, 4), torch.zeros(0)), (TEACHER[0], torch.tensor([0.1, 0.1]))]:
        loss = matched_giou_kd(student, [teacher], [scores])
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()


def test_equals_torchvision_giou_on_the_matched_pairs():
    torch.manual_seed(1)
    corners = torch.rand(40, 2) * 60
    student = torch.cat([corners, corners + 4 + torch.rand(40, 2) * 20], dim=1)
    teacher = student[::4] + torch.randn(10, 4)  # near every fourth prediction
    scores = torch.rand(10)
    best_iou, best = box_iou(student, teacher).max(dim=1)
    rows = best_iou >= 0.5
    per_pair = generalized_box_iou_loss(student[rows], teacher[best[rows]], reduction="none")
    expected = (scores[best[rows]] * per_pair).sum() / scores[best[rows]].sum()
    assert rows.sum() > 5
    assert torch.allclose(matched_giou_kd(student, teacher, scores, score_threshold=0.0), expected, atol=1e-6)


def test_class_specific_boxes_are_read_at_the_matched_detection():
    # Two detections; RoI 0's proposal overlaps detection 1. Its class-specific boxes: [:, 0] far off,
    # [:, 1] exactly detection 1, so the loss is 0 only if the matched column is used.
    teacher = torch.tensor([[30.0, 30.0, 40.0, 40.0], [0.0, 0.0, 10.0, 10.0]])
    proposals = torch.tensor([[0.0, 0.0, 9.0, 10.0]])  # IoU 0.9 with detection 1
    student = torch.stack([torch.tensor([[50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]])])  # (1, 2, 4)
    scores = torch.tensor([0.9, 0.9])
    assert matched_giou_kd(student, teacher, scores, match_boxes=proposals).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="give match_boxes="):
        matched_giou_kd(student, teacher, scores)


def test_module_shell_equals_functional():
    module = MatchedGIoUKD(iou_threshold=0.4, score_threshold=0.3)
    assert torch.equal(module(STUDENT, TEACHER, SCORES), matched_giou_kd(STUDENT, TEACHER, SCORES, 0.4, 0.3))
