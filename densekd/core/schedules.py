"""Scalar schedules over training iterations, for T, alpha and any term weight.

Every schedule is a small frozen, picklable object that maps an iteration to a
value: ``schedule(iteration) -> float``.  Values are flat outside the ramp, so a
schedule can be queried at any iteration (including past the end of training).

    >>> t = Linear(start_value=5.0, end_value=2.0, start_iter=0, end_iter=1000)
    >>> t(0), t(500), t(5000)
    (5.0, 3.5, 2.0)

:func:`build_schedule` turns a plain number or a ``{"kind": ..., **kwargs}`` dict
into a schedule; :data:`SCHEDULES` maps the kind names to the classes.
"""

from __future__ import annotations

import bisect
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple, Union

from .._names import unknown_name_message

__all__ = [
    "Schedule",
    "Constant",
    "Linear",
    "Cosine",
    "Step",
    "SCHEDULES",
    "build_schedule",
]

Schedule = Callable[[int], float]


def _as_float(schedule: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{schedule}: {name} must be a finite number, got {value!r}")
    return float(value)


def _as_iter(schedule: str, name: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value != int(value)
        or value < 0
    ):
        raise ValueError(f"{schedule}: {name} must be a non-negative whole number of iterations, got {value!r}")
    return int(value)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalize fields of a frozen dataclass


@dataclass(frozen=True)
class Constant:
    """The same value at every iteration."""

    value: float

    def __post_init__(self) -> None:
        _set(self, "value", _as_float("Constant", "value", self.value))

    def __call__(self, iteration: int) -> float:
        return self.value


def _ramp_fields(obj: Any, kind: str) -> None:
    _set(obj, "start_value", _as_float(kind, "start_value", obj.start_value))
    _set(obj, "end_value", _as_float(kind, "end_value", obj.end_value))
    _set(obj, "start_iter", _as_iter(kind, "start_iter", obj.start_iter))
    _set(obj, "end_iter", _as_iter(kind, "end_iter", obj.end_iter))
    if obj.end_iter <= obj.start_iter:
        raise ValueError(
            f"{kind}: end_iter ({obj.end_iter}) must be greater than start_iter ({obj.start_iter}); "
            "for a value that never changes use Constant, for an instant switch use Step"
        )


def _progress(obj: Any, iteration: int) -> float:
    """Fraction of the ramp done at ``iteration``, clamped to [0, 1]."""
    p = (iteration - obj.start_iter) / (obj.end_iter - obj.start_iter)
    return min(max(p, 0.0), 1.0)


@dataclass(frozen=True)
class Linear:
    """Linear ramp from ``start_value`` to ``end_value``.

    ``start_value`` at ``iteration <= start_iter``, ``end_value`` at
    ``iteration >= end_iter``, linear in between.
    """

    start_value: float
    end_value: float
    start_iter: int
    end_iter: int

    def __post_init__(self) -> None:
        _ramp_fields(self, "Linear")

    def __call__(self, iteration: int) -> float:
        if iteration >= self.end_iter:
            return self.end_value
        p = _progress(self, iteration)
        return self.start_value + (self.end_value - self.start_value) * p


@dataclass(frozen=True)
class Cosine:
    """Half-cosine ramp from ``start_value`` to ``end_value``.

    ``v = end + (start - end) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of
    ``[start_iter, end_iter]`` done; flat outside, like :class:`Linear`.
    """

    start_value: float
    end_value: float
    start_iter: int
    end_iter: int

    def __post_init__(self) -> None:
        _ramp_fields(self, "Cosine")

    def __call__(self, iteration: int) -> float:
        if iteration >= self.end_iter:
            return self.end_value
        p = _progress(self, iteration)
        return self.end_value + (self.start_value - self.end_value) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class Step:
    """Piecewise-constant: ``values[i]`` for iteration in ``[milestones[i-1], milestones[i])``.

    ``values[0]`` before ``milestones[0]`` and ``values[-1]`` from ``milestones[-1]`` on.
    Needs ``len(values) == len(milestones) + 1`` and strictly increasing milestones.
    Example: ``Step(values=[0.0, 1.0], milestones=[500])`` switches a term on at 500.
    """

    values: Tuple[float, ...]
    milestones: Tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("values", "milestones"):
            if isinstance(getattr(self, name), (str, bytes)) or not isinstance(getattr(self, name), Sequence):
                raise ValueError(f"Step: {name} must be a list, got {getattr(self, name)!r}")
        values = tuple(_as_float("Step", f"values[{i}]", v) for i, v in enumerate(self.values))
        milestones = tuple(_as_iter("Step", f"milestones[{i}]", m) for i, m in enumerate(self.milestones))
        if len(values) != len(milestones) + 1:
            raise ValueError(
                f"Step: needs exactly one more value than milestones (one value before the first "
                f"milestone and one after each), got {len(values)} values and {len(milestones)} milestones"
            )
        for a, b in zip(milestones, milestones[1:]):
            if b <= a:
                raise ValueError(f"Step: milestones must be strictly increasing, got {list(milestones)}")
        _set(self, "values", values)
        _set(self, "milestones", milestones)

    def __call__(self, iteration: int) -> float:
        return self.values[bisect.bisect_right(self.milestones, iteration)]


SCHEDULES: Dict[str, type] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "step": Step,
}


def build_schedule(spec: Union[float, int, Mapping[str, Any], Schedule]) -> Schedule:
    """Build a schedule from a number, a ``{"kind": ..., **kwargs}`` dict, or a schedule.

    * a number ``x`` -> ``Constant(x)``
    * ``{"kind": "linear", "start_value": 5, "end_value": 2, "start_iter": 0, "end_iter": 1000}``
      -> ``Linear(...)``; kinds are the keys of :data:`SCHEDULES`.
    * an instance of one of the schedule classes is returned unchanged.

    Raises:
        ValueError: missing or unknown kind (with a close-match suggestion), or
            arguments the schedule does not accept / is missing (naming the
            accepted ones), or invalid values.
        TypeError: ``spec`` is none of the above.
    """
    if isinstance(spec, tuple(SCHEDULES.values())):
        return spec
    if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        return Constant(spec)
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"schedule spec must be a number or a dict with a 'kind' key, got {type(spec).__name__}: {spec!r}"
        )
    kwargs = dict(spec)
    if "kind" not in kwargs:
        raise ValueError(
            f"schedule spec {dict(spec)!r} has no 'kind' key; add one of: {', '.join(sorted(SCHEDULES))}"
        )
    kind = kwargs.pop("kind")
    if kind not in SCHEDULES:
        raise ValueError(unknown_name_message("schedule kind", kind, SCHEDULES))
    cls = SCHEDULES[kind]
    params = list(inspect.signature(cls).parameters)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        unknown = sorted(set(kwargs) - set(params))
        missing = [p for p in params if p not in kwargs]
        detail = []
        if unknown:
            detail.append(f"unexpected argument(s) {', '.join(map(repr, unknown))}")
        if missing:
            detail.append(f"missing argument(s) {', '.join(map(repr, missing))}")
        raise ValueError(
            f"{kind!r} schedule: {'; '.join(detail) or err}; accepted arguments: {', '.join(params)}"
        ) from None
    return cls(**kwargs)
