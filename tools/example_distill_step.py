"""The README's Python example: one distillation step inside a plain torchvision training loop."""
import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn

from densekd import Distiller, Term

torch.manual_seed(0)
size = dict(min_size=256, max_size=256)
teacher = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, **size)
student = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=5, **size)
# teacher.load_state_dict(torch.load("teacher.pth", weights_only=True))  # your trained teacher

distiller = Distiller(
    student,
    teacher,
    terms=[
        Term("kl", on="roi_class_logits", temperature=2.0),  # Hinton KD on RoI class logits
        Term("delta_l1", on="roi_box_regression"),  # box deltas of foreground RoIs
        Term("cwd", on="features", weight=0.5),  # channel-wise distillation on shared FPN levels
    ],
)
optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)

images = [torch.rand(3, 256, 256) for _ in range(2)]
targets = [{"boxes": torch.tensor([[30.0, 40.0, 150.0, 200.0]]), "labels": torch.tensor([3])} for _ in range(2)]

distiller.train()
loss_dict = distiller(images, targets)  # was: loss_dict = student(images, targets)
optimizer.zero_grad()
sum(loss_dict.values()).backward()
optimizer.step()
print({name: round(value.item(), 4) for name, value in loss_dict.items()})

torch.save(distiller.student.state_dict(), "student.pth")  # a plain torchvision FasterRCNN
