"""Per-class weights on RetinaNet/FCOS heads: torchvision puts label k on channel k, so a head
with C channels takes C weights (labels 0..C-1) or C - 1 (labels 1..C-1, channel 0 unused), and
every term reads the same weight for the same label: per channel (cls_logits) and per GT box
(foreground masks of masked_imitation)."""
import pytest
import torch

from densekd import Distiller, Term
from tiny_detectors import IMAGE_SIZE, build_retinanet, build_rcnn

WEIGHTS = [10.0, 20.0, 30.0, 40.0]


def _recorded_weights(channels: int, labels: list[int]) -> tuple[set, torch.Tensor]:
    """(foreground values of masked_imitation, per-channel weights of binary_kd) in one real step
    of a ``channels``-channel RetinaNet on one image with a box of each label in ``labels``."""
    terms = [
        Term("masked_imitation", "features", class_weights=WEIGHTS),
        Term("binary_kd", "cls_logits", class_weights=WEIGHTS, confidence_weighting=False),
    ]
    distiller = Distiller(build_retinanet(num_classes=channels), build_retinanet(num_classes=channels, fpn_width=64), terms)
    seen = {}
    for term, record in zip(distiller.terms, ("foreground", "channels")):
        def recording(*args, _loss=term.loss_fn, _record=record, **kwargs):
            seen.setdefault(_record, args[2] if _record == "foreground" else kwargs["weights"])
            return _loss(*args, **kwargs)

        term.loss_fn = recording
    boxes = torch.tensor([[0.0, 0.0, 28.0, 28.0], [36.0, 36.0, 64.0, 64.0]])[: len(labels)]
    targets = [{"boxes": boxes, "labels": torch.tensor(labels)}]
    distiller.train()([torch.rand(3, IMAGE_SIZE, IMAGE_SIZE)], targets)
    return set(seen["foreground"].unique().tolist()), seen["channels"][0, 0]  # (N, HWA, C) -> (C,)


def test_labels_from_zero_on_a_k_channel_head_weigh_alike_in_every_term():
    foreground, channels = _recorded_weights(channels=4, labels=[0, 3])
    assert channels.tolist() == WEIGHTS  # label k on channel k
    assert foreground == {0.0, 10.0, 40.0}  # label 0 -> 10 (not wrapped round to 40), label 3 -> 40


def test_labels_from_one_on_a_k_plus_one_channel_head_weigh_alike_in_every_term():
    foreground, channels = _recorded_weights(channels=5, labels=[1, 4])
    assert channels.tolist() == [1.0] + WEIGHTS  # channel 0 unused
    assert foreground == {0.0, 10.0, 40.0}


def test_a_class_weight_count_that_fits_no_layout_names_the_conventions():
    with pytest.raises(ValueError, match=(
        r"class_weights has 2 entries; the student's RetinaNet head has 4 class channels with label k on "
        r"channel k: give 4 weights for labels 0\.\.3, or 3 for labels 1\.\.3 \(channel 0 unused"
    )):  # fmt: skip
        Distiller(build_retinanet(), build_retinanet(), [Term("binary_kd", "cls_logits", class_weights=torch.ones(2))])
    with pytest.raises(ValueError, match=(
        r"class_weights has 5 entries; the student's FasterRCNN RoI head has 5 class channels with background "
        r"on channel 0: give 4 weights, one per label 1\.\.4"
    )):  # fmt: skip
        Distiller(build_rcnn(), build_rcnn(), [Term("kl", "roi_class_logits", class_weights=torch.ones(5))])
