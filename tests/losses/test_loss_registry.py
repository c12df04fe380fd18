import pytest
import torch

import densekd.losses as losses
from densekd.losses import LOSSES, get_loss, kl_div_kd

EXPECTED_NAMES = {
    "kl", "binary_kd", "focal_binary_kd", "focal_kl", "margin", "dkd", "delta_l1", "delta_l2",
    "delta_smooth_l1", "teacher_bounded", "giou", "hint", "masked_imitation", "cwd", "pkd",
    "attention", "channel_attention", "relation", "pixel_kl", "pairwise_affinity", "spatial_kl",
    "pseudo_targets", "matched_giou",
}


def test_registry_names():
    assert set(LOSSES) == EXPECTED_NAMES
    assert get_loss("kl") is kl_div_kd
    assert all(get_loss(name) is fn for name, fn in LOSSES.items())


def test_unknown_name_suggests_close_match_and_lists_valid():
    with pytest.raises(ValueError) as info:
        get_loss("kll")
    message = str(info.value)
    assert "'kl'" in message and "valid" in message and "masked_imitation" in message
    assert not isinstance(info.value, KeyError)


def test_unknown_name_without_close_match():
    with pytest.raises(ValueError, match="unknown loss 'zzz'; valid losses: attention"):
        get_loss("zzz")


def test_public_api_is_explicit():
    assert all(hasattr(losses, name) for name in losses.__all__)


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


LOGITS, LOGITS_T = _pair((4, 3))
MAPS, MAPS_T = _pair((2, 3, 4, 4))
DELTAS, DELTAS_T = _pair((3, 4))
BOXES = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 4.0, 3.0]])
BOXES_T = BOXES + 0.5
TARGET = torch.tensor([0, 1, 2, 0])
FOREGROUND = (MAPS[:, :1] > 0).float()

# (module, functional call with the same hyperparameters, module inputs)
SHELLS = [
    (losses.KLDivKD(2.0), lambda *a: losses.kl_div_kd(*a, temperature=2.0), (LOGITS, LOGITS_T)),
    (losses.BinaryKD(2.0), lambda *a: losses.binary_kd(*a, temperature=2.0), (LOGITS, LOGITS_T)),
    (losses.FocalBinaryKD(2.0, 1.0), lambda *a: losses.focal_binary_kd(*a, 2.0, 1.0), (LOGITS, LOGITS_T)),
    (losses.FocalKLKD(2.0, 1.0), lambda *a: losses.focal_kl_kd(*a, 2.0, 1.0), (LOGITS, LOGITS_T)),
    (losses.MarginKD(), losses.margin_kd, (LOGITS, LOGITS_T)),
    (losses.DecoupledKD(2.0, 1.0, 4.0), lambda *a: losses.decoupled_kd(*a, 2.0, 1.0, 4.0),
     (LOGITS, LOGITS_T, TARGET)),
    (losses.DeltaRegressionKD("l2"), losses.delta_l2_kd, (DELTAS, DELTAS_T)),
    (losses.TeacherBoundedRegression(0.5), lambda s, t, y: losses.teacher_bounded_regression(s, t, y, 0.5),
     (BOXES, BOXES_T, BOXES * 0)),
    (losses.GIoUKD(), losses.giou_kd, (BOXES, BOXES_T)),
    (losses.HintLoss("cosine"), lambda *a: losses.hint_loss(*a, kind="cosine"), (MAPS, MAPS_T)),
    (losses.MaskedImitationLoss(2.0, 0.1), lambda *a: losses.masked_imitation_loss(*a, 2.0, 0.1),
     (MAPS, MAPS_T, FOREGROUND)),
    (losses.ChannelWiseKD(3.0), lambda *a: losses.channel_wise_kd(*a, 3.0), (MAPS, MAPS_T)),
    (losses.PearsonKD(), losses.pearson_kd, (MAPS, MAPS_T)),
    (losses.SpatialAttentionLoss(), losses.spatial_attention_loss, (MAPS, MAPS_T)),
    (losses.ChannelAttentionLoss(), losses.channel_attention_loss, (MAPS, MAPS_T)),
    (losses.RelationLoss(), losses.relation_loss, (MAPS, MAPS_T)),
    (losses.SpatialSoftmaxKD(2.0), lambda *a: losses.spatial_softmax_kd(*a, temperature=2.0), (MAPS, MAPS_T)),
]


@pytest.mark.parametrize("module, functional, inputs", SHELLS, ids=[type(m).__name__ for m, _, _ in SHELLS])
def test_module_shell_equals_functional(module, functional, inputs):
    assert torch.equal(module(*inputs), functional(*inputs))


def test_shell_constructors_validate_kind():
    with pytest.raises(ValueError, match="valid kinds"):
        losses.DeltaRegressionKD("huber")
    with pytest.raises(ValueError, match="valid kinds"):
        losses.HintLoss("l1")
