"""Tiny torchvision detectors for the core tests: 64 px images, narrow FPNs, one-block ResNets."""
import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

NUM_CLASSES = 4
IMAGE_SIZE = 64
SIZE_ARGS = dict(min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)


def tiny_backbone(fpn_width: int, one_stage: bool, norm_layer=FrozenBatchNorm2d) -> BackboneWithFPN:
    # ResNet-10: the ResNet-FPN layout at a fraction of the cost. Frozen BatchNorm (as torchvision
    # uses with loaded weights) makes a train-mode student and an eval-mode teacher copy agree.
    resnet = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)
    extra = LastLevelP6P7(fpn_width, fpn_width) if one_stage else LastLevelMaxPool()
    return BackboneWithFPN(
        resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], fpn_width, extra_blocks=extra
    )


def build_rcnn(fpn_width=32, mask=False, num_classes=NUM_CLASSES, anchor_sizes=(16, 32, 64, 128), norm_layer=FrozenBatchNorm2d):
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    model_type = MaskRCNN if mask else FasterRCNN
    return model_type(
        tiny_backbone(fpn_width, one_stage=False, norm_layer=norm_layer),
        num_classes=num_classes + 1,
        rpn_anchor_generator=anchors,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=32,
        **SIZE_ARGS,
    )


def build_retinanet(fpn_width=32, num_classes=NUM_CLASSES, anchor_sizes=(16, 32, 64, 128, 256)):
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    return RetinaNet(tiny_backbone(fpn_width, one_stage=True), num_classes=num_classes, anchor_generator=anchors, **SIZE_ARGS)


def build_fcos(fpn_width=32, num_classes=NUM_CLASSES):
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    return FCOS(tiny_backbone(fpn_width, one_stage=True), num_classes=num_classes, anchor_generator=anchors, **SIZE_ARGS)


BUILDERS = {
    "faster_rcnn": build_rcnn,
    "mask_rcnn": lambda **kw: build_rcnn(mask=True, **kw),
    "retinanet": build_retinanet,
    "fcos": build_fcos,
}


def make_batch(seed: int = 0, num_images: int = 2):
    """Images with two boxes each (one image without boxes when num_images > 2)."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) for _ in range(num_images)]
    targets = []
    for index in range(num_images):
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [24.0, 12.0, 60.0, 58.0]])
        labels = torch.tensor([1, 1 + index % NUM_CLASSES])
        if index == 2:
            boxes, labels = boxes[:0], labels[:0]
        masks = torch.zeros(len(boxes), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        for m, box in zip(masks, boxes.long()):
            m[box[1] : box[3], box[0] : box[2]] = 1
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


NUM_KEYPOINTS = 3
# Per GT box of make_batch, (K_kp, 3) keypoints x, y, visibility (0: not labelled), inside the box.
KEYPOINTS = torch.tensor(
    [
        [[10.0, 12.0, 2.0], [20.0, 30.0, 1.0], [26.0, 36.0, 0.0]],  # in [4, 6, 30, 40]
        [[30.0, 20.0, 2.0], [50.0, 50.0, 0.0], [40.0, 30.0, 2.0]],  # in [24, 12, 60, 58]
    ]
)


def build_keypoint_rcnn(fpn_width=32, head_width=32, num_keypoints=NUM_KEYPOINTS, num_classes=NUM_CLASSES):
    """build_rcnn's model with a keypoint branch: a two-conv head (torchvision's default stacks
    eight 512-wide convs) and torchvision's predictor, so heatmaps stay 56 x 56."""
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
    return KeypointRCNN(
        tiny_backbone(fpn_width, one_stage=False),
        num_classes=num_classes + 1,
        rpn_anchor_generator=anchors,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=32,
        keypoint_head=KeypointRCNNHeads(fpn_width, (head_width, head_width)),
        keypoint_predictor=KeypointRCNNPredictor(head_width, num_keypoints),
        **SIZE_ARGS,
    )


def make_keypoint_batch(seed: int = 0, num_images: int = 2):
    """make_batch's images and boxes with KEYPOINTS instead of masks (a third image has none)."""
    images, targets = make_batch(seed, num_images)
    for target in targets:
        del target["masks"]
        target["keypoints"] = KEYPOINTS[: len(target["boxes"])].clone()  # (G, K_kp, 3)
    return images, targets


def parameters_snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
