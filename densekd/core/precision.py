"""Teachers stored in half precision (``teacher.to(torch.bfloat16)``): run them under autocast
and hand their outputs to the losses in the student's precision.

A bfloat16 teacher halves its memory and, on GPUs with bfloat16 tensor cores, its time.
Its weights alone in bfloat16 would not do: the batch arrives in float32, and some torchvision
ops (``roi_align`` on the CPU) have no bfloat16 kernel. Autocast casts what each op needs
(torchvision's RoI pooling runs in float32 under it) and leaves the weights as they are.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from .outputs import DenseOutputs

LOW_PRECISION = (torch.bfloat16, torch.float16)


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def is_low_precision(model: nn.Module) -> bool:
    return parameter_dtype(model) in LOW_PRECISION


def teacher_autocast(model: nn.Module, device: torch.device) -> ContextManager:
    """Autocast to the teacher's dtype when its weights are in half precision, else nothing."""
    if not is_low_precision(model):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=parameter_dtype(model))


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((key, _cast(item, dtype)) for key, item in value.items())
    if isinstance(value, list):
        return [_cast(item, dtype) for item in value]
    return value


def outputs_in(outputs: DenseOutputs, dtype: torch.dtype) -> DenseOutputs:
    """A copy of ``outputs`` with every floating-point tensor in ``dtype``."""
    return dataclasses.replace(outputs, **{f.name: _cast(getattr(outputs, f.name), dtype) for f in dataclasses.fields(outputs)})
