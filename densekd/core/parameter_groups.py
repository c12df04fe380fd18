"""Optimizer parameter groups with their own weight decay, the way torchvision's reference
scripts build them (``references/classification/utils.py``, ``set_weight_decay``): parameters of
normalization layers and, optionally, biases get a weight decay of their own (often 0).

    groups = weight_decay_groups([student], weight_decay=1e-4, norm_weight_decay=0.0)
    optimizer = torch.optim.SGD(groups, lr=0.02, momentum=0.9)

A :class:`~densekd.detection.distiller.Distiller` applies it to what it trains (student and connectors):
``distiller.parameter_groups(...)``.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import nn

__all__ = ["NORM_CLASSES", "weight_decay_groups"]

#: layers whose parameters (scale and shift) count as normalization parameters, as in torchvision
NORM_CLASSES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def weight_decay_groups(
    modules: Iterable[nn.Module],
    weight_decay: float,
    norm_weight_decay: Optional[float] = None,
    bias_weight_decay: Optional[float] = None,
    norm_classes: tuple[type, ...] = NORM_CLASSES,
) -> list[dict[str, Any]]:
    """Every parameter with ``requires_grad`` of ``modules``, each in exactly one group.

    Args:
        modules: the modules whose parameters train (a parameter shared by two is taken once).
        weight_decay: decay of every parameter no other group takes.
        norm_weight_decay: decay of the parameters of ``norm_classes`` layers; None keeps them
            with the rest.
        bias_weight_decay: decay of parameters named ``bias`` (norm layers' included: this group
            is chosen first, as torchvision's ``custom_keys_weight_decay=[("bias", ...)]``);
            None keeps them where they would be otherwise.
        norm_classes: the layer types that count as normalization.

    Returns:
        ``[{"params": [...], "weight_decay": float}, ...]`` for the non-empty groups, in the
        order other, norm, bias: what ``torch.optim`` optimizers take as their first argument.
    """
    groups: dict[str, list[nn.Parameter]] = {"other": [], "norm": [], "bias": []}
    decays = {"other": weight_decay, "norm": norm_weight_decay, "bias": bias_weight_decay}
    seen: set[int] = set()
    for module in modules:
        for layer in module.modules():
            for name, parameter in layer.named_parameters(recurse=False):
                if not parameter.requires_grad or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                groups[_group_of(name, layer, norm_weight_decay, bias_weight_decay, norm_classes)].append(parameter)
    return [{"params": params, "weight_decay": float(decays[key])} for key, params in groups.items() if params]


def _group_of(
    name: str, layer: nn.Module, norm_weight_decay: Optional[float], bias_weight_decay: Optional[float], norm_classes
) -> str:
    """"bias", "norm" or "other": the group of the parameter ``name`` that ``layer`` holds itself."""
    if bias_weight_decay is not None and name == "bias":
        return "bias"
    if norm_weight_decay is not None and isinstance(layer, norm_classes):
        return "norm"
    return "other"
