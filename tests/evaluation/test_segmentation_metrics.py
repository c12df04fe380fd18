"""mIoU, pixel accuracy and friends against hand-computed values; accumulation; the
cross-process reduction; the model loop; table and plot."""
import math
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from densekd.evaluation import (
    ConfusionMatrix,
    evaluate_segmentation,
    format_per_class_iou,
    group_mean_iou,
    plot_per_class_iou,
    segmentation_metrics,
)

# 2 x 5 ground truth with two ignored pixels; 4 classes, class 3 in neither map, class 2
# predicted once but never in the ground truth.
TARGET = torch.tensor([[0, 0, 1, 1, 255], [0, 1, 1, 255, 0]])
PREDICTION = torch.tensor([[0, 1, 1, 1, 2], [0, 0, 1, 2, 2]])
# valid pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) | (0,0) (1,0) (1,1) (0,2)
#   class 0: TP 2, FN 2 (predicted 1, 2), FP 1 (gt 1)      -> IoU 2/5, accuracy 2/4
#   class 1: TP 3, FN 1, FP 1                               -> IoU 3/5, accuracy 3/4
#   class 2: TP 0, FP 1, no ground truth                    -> IoU 0, accuracy nan
#   class 3: nowhere                                        -> IoU nan, accuracy nan


def test_hand_computed_example():
    confusion = ConfusionMatrix(4, ignore_index=255)
    confusion.update(PREDICTION[None], TARGET[None])  # (1, 2, 5)
    assert confusion.matrix.tolist() == [[2, 1, 1, 0], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = confusion.metrics()
    assert m["per_class_iou"][:3] == pytest.approx([2 / 5, 3 / 5, 0.0]) and math.isnan(m["per_class_iou"][3])
    assert m["mIoU"] == pytest.approx((2 / 5 + 3 / 5 + 0.0) / 3)  # nan class left out, the 0 counts
    assert m["pixel_accuracy"] == pytest.approx(5 / 8)  # the two ignored pixels are not counted
    assert m["per_class_accuracy"][:2] == pytest.approx([2 / 4, 3 / 4])
    assert all(math.isnan(v) for v in m["per_class_accuracy"][2:])
    assert m["mean_class_accuracy"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert m["pixels"] == 8


def test_accumulating_batches_equals_one_shot():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (6, 7, 9), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.1] = 255
    prediction = torch.randint(0, 5, (6, 7, 9), generator=generator)
    whole, parts = ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(prediction, target)
    for start in (0, 1, 4):
        end = {0: 1, 1: 4, 4: 6}[start]
        parts.update(prediction[start:end], target[start:end])
    assert torch.equal(whole.matrix, parts.matrix)
    assert whole.matrix.sum() == (target != 255).sum()


def test_no_valid_pixel_gives_nan_and_bad_input_is_refused():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    assert all(math.isnan(confusion.metrics()[key]) for key in ("mIoU", "pixel_accuracy", "mean_class_accuracy"))
    with pytest.raises(ValueError, match=r"class values \[3\] outside 0\.\.2"):
        confusion.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[3, 1]]))
    with pytest.raises(ValueError, match="pass class maps"):
        confusion.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(C, C\)"):
        segmentation_metrics(torch.zeros(3, 2))


def test_group_means_and_table():
    iou = [0.9, 0.5, math.nan, 0.1, 0.3]
    groups = {1: "f", 2: "r", 3: "r", 4: "c"}  # background (0) in no group
    means = group_mean_iou(iou, groups)
    assert means == {"mIoU_r": pytest.approx(0.1), "mIoU_c": pytest.approx(0.3), "mIoU_f": pytest.approx(0.5)}
    assert math.isnan(group_mean_iou(iou, {2: "r"})["mIoU_f"])
    table = format_per_class_iou({"teacher": [0.9, math.nan]}, ["background", "cat"], {"train images": [10, 2]})
    assert table.split("\n") == ["class       train images  teacher", "background            10     90.0", "cat                    2        -"]


class _Fixed(nn.Module):
    """Returns one-hot logits of a fixed prediction per batch, as torchvision's models do."""

    def __init__(self, predictions, num_classes):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.predictions, self.num_classes, self.calls = predictions, num_classes, 0

    def forward(self, images):
        prediction = self.predictions[self.calls]
        self.calls += 1
        logits = nn.functional.one_hot(prediction, self.num_classes).permute(0, 3, 1, 2).float()  # (N, H, W, C) -> (N, C, H, W)
        return {"out": logits, "aux": logits}


def test_evaluate_segmentation_scores_every_batch_and_restores_train_mode():
    model = _Fixed([PREDICTION[None], PREDICTION[None]], 4)
    model.train()
    loader = [(torch.zeros(1, 3, 2, 5), TARGET[None]), (torch.zeros(1, 3, 2, 5), TARGET[None])]
    metrics, images_per_second = evaluate_segmentation(model, loader, num_classes=4)
    assert metrics["pixels"] == 16 and metrics["mIoU"] == pytest.approx(1 / 3)
    assert images_per_second > 0 and model.training
    with pytest.raises(ValueError, match="outputs 4 channels, expected num_classes=5"):
        evaluate_segmentation(_Fixed([PREDICTION[None]], 4), loader[:1], num_classes=5)


def _reduce_worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        confusion = ConfusionMatrix(4)
        half = slice(0, 1) if rank == 0 else slice(1, 2)  # each rank scores one row of the example
        confusion.update(PREDICTION[half][None], TARGET[half][None])
        confusion.reduce()
        results.put((rank, confusion.matrix.tolist()))
    finally:
        dist.destroy_process_group()


def test_reduce_sums_the_counts_of_every_process(tmp_path):
    context = mp.get_context("fork")  # no re-import of torch in the children: fast
    results = context.Queue()
    workers = [context.Process(target=_reduce_worker, args=(rank, 2, str(tmp_path / "init"), results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    gathered = dict(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    whole = ConfusionMatrix(4)
    whole.update(PREDICTION[None], TARGET[None])
    assert gathered[0] == gathered[1] == whole.matrix.tolist()
    assert gathered[0] != ConfusionMatrix(4).matrix.tolist()


def test_per_class_iou_plot_writes_a_png(tmp_path):
    path = plot_per_class_iou(
        {"teacher": {0: 0.9, 1: 0.5, 2: math.nan}, "student": {0: 0.8, 1: 0.2, 2: 0.0}},
        {0: "background", 1: "cat", 2: "yak"},
        {0: 10, 1: 7, 2: 2},
        tmp_path / "iou.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
