"""Connectors map a student feature map onto its teacher's shape.

A 1x1 convolution bridges a channel mismatch (FitNets' regressor, Romero et al. 2015)
and bilinear interpolation bridges a stride mismatch. Connectors train with the student
but are not part of it: the distilled student stays a plain torchvision model.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FeatureConnector(nn.Module):
    """(N, C_s, H_s, W_s) student map -> (N, C_t, H_t, W_t), the teacher's shape.

    Args:
        student_channels: C_s.
        teacher_channels: C_t, or None to keep the student's channels (for losses that
            compare maps without a channel dimension, such as spatial attention).
    """

    def __init__(self, student_channels: int, teacher_channels: int | None):
        super().__init__()
        if teacher_channels is None or teacher_channels == student_channels:
            self.project = nn.Identity()
        else:
            self.project = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student: Tensor, teacher_size: tuple[int, int]) -> Tensor:
        projected = self.project(student)
        if tuple(projected.shape[-2:]) != tuple(teacher_size):
            projected = F.interpolate(projected, size=teacher_size, mode="bilinear", align_corners=False)
        return projected
