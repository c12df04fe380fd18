"""Scoped forward hooks on named submodules.

A :class:`Tap` records what chosen submodules of a model return (or receive) during a
forward pass without changing anything the model computes::

    with Tap(model, outputs=["backbone", "head"]) as tap:
        losses = model(images, targets)
        records = tap.read()        # {"backbone": OrderedDict(...), "head": {...}}

Hooks are registered on ``__enter__`` and removed on ``__exit__``; ``read`` hands the
records over and clears them, so nothing from one step leaks into the next.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def find_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists close matches."""
    model = unwrap_model(model)
    try:
        return model.get_submodule(name)  # a walk down the dotted path, cheap enough for every step
    except AttributeError:
        pass
    modules = dict(model.named_modules())
    suggestions = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise ValueError(
        f"{type(model).__name__} has no submodule named {name!r}.{hint} "
        "Tap names are dotted submodule paths as listed by model.named_modules()."
    )


class Tap:
    """Record outputs (forward hooks) and inputs (forward pre-hooks) of named submodules.

    Args:
        model: the model to observe; DDP/DataParallel wrappers are unwrapped.
        outputs: submodule names whose return value is recorded.
        inputs: submodule names whose positional arguments (a tuple) are recorded.

    A submodule called several times in one forward keeps the last call's record.
    """

    def __init__(self, model: nn.Module, outputs: Iterable[str] = (), inputs: Iterable[str] = ()):
        self.model = unwrap_model(model)
        self._outputs = {name: find_submodule(self.model, name) for name in outputs}
        self._inputs = {name: find_submodule(self.model, name) for name in inputs}
        self._records: dict[str, Any] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "Tap":
        for name, module in self._outputs.items():
            self._handles.append(module.register_forward_hook(self._output_recorder(name)))
        for name, module in self._inputs.items():
            self._handles.append(module.register_forward_pre_hook(self._input_recorder(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()

    def read(self) -> dict[str, Any]:
        """The records of the last forward (keys as given), emptied for the next one."""
        records, self._records = self._records, {}
        return records

    def _output_recorder(self, name: str):
        def hook(module, args, output):
            self._records[name] = output

        return hook

    def _input_recorder(self, name: str):
        def hook(module, args):
            self._records[f"{name}:inputs"] = args

        return hook
