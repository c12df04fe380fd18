"""raise_only_classes: on the flagged classes' channels a cls_logits term may raise the student's
score towards the teacher's but never lower it; every other channel is distilled as before."""
import pytest
import torch
from tiny_detectors import build_fcos, make_batch

from densekd import Distiller, Term
from densekd.experiment.config import ConfigError, DistillationConfig, build_terms

torch.manual_seed(0)


def _one_step_weights(raise_only):
    """(student logits, teacher logits, weights) that binary_kd received in one real FCOS step."""
    term = Term("binary_kd", "cls_logits", temperature=2.0, raise_only_classes=raise_only)
    torch.manual_seed(0)
    distiller = Distiller(build_fcos(), build_fcos(fpn_width=64), [term])
    seen = {}

    def recording(student, teacher, **kwargs):
        seen.update(student=student.detach(), teacher=teacher.detach(), weights=kwargs["weights"])
        return Term("binary_kd", "cls_logits").loss_fn(student, teacher, **kwargs)

    distiller.terms[0].loss_fn = recording
    images, targets = make_batch(seed=0)
    distiller.train()(images, targets)
    return seen["student"], seen["teacher"], torch.broadcast_to(seen["weights"], seen["student"].shape)


def test_flagged_channels_keep_only_the_elements_that_raise_the_student():
    # labels 1..3 on a 4-channel head (channel 0 unused): flag label 2 -> channel 2
    student, teacher, weights = _one_step_weights([False, True, False])
    lowers = teacher[..., 2] < student[..., 2]
    assert lowers.any() and (~lowers).any()  # both kinds of element occur, so the test can fail
    assert torch.all(weights[..., 2][lowers] == 0)
    assert torch.all(weights[..., 2][~lowers] == 1)
    assert torch.all(weights[..., [0, 1, 3]] == 1)  # other channels: distilled as before, both ways


def test_without_flags_every_element_counts():
    _, _, weights = _one_step_weights(None)
    assert torch.all(weights == 1)


def test_raise_only_classes_apply_to_cls_logits_only():
    with pytest.raises(ValueError, match="raise_only_classes applies to the per-class sigmoids of 'cls_logits'"):
        Term("kl", "roi_class_logits", raise_only_classes=[True, False])


def test_a_flag_count_that_fits_no_layout_is_refused_at_construction():
    with pytest.raises(ValueError, match="raise_only_classes has 2 entries"):
        Distiller(build_fcos(), build_fcos(), [Term("binary_kd", "cls_logits", raise_only_classes=[True, False])])


def test_yaml_groups_become_flags_from_the_training_image_counts():
    config = DistillationConfig(terms=[{"loss": "binary_kd", "on": "cls_logits", "raise_only_groups": ["r"]}])
    (term,) = build_terms(config, image_counts=[1500, 8, 40, 5])  # f, r, c, r
    assert term.raise_only_classes.tolist() == [False, True, False, True]
    (term,) = build_terms(
        DistillationConfig(terms=[{"loss": "binary_kd", "on": "cls_logits", "raise_only_groups": ["r", "c"]}]),
        image_counts=[1500, 8, 40, 5],
    )
    assert term.raise_only_classes.tolist() == [False, True, True, True]


def test_an_unknown_group_is_named():
    config = DistillationConfig(terms=[{"loss": "binary_kd", "on": "cls_logits", "raise_only_groups": ["rare"]}])
    with pytest.raises(ConfigError, match=r"unknown group\(s\) \['rare'\]; groups are 'r' \(rare\)"):
        build_terms(config, image_counts=[10, 200])
