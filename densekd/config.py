"""YAML -> distillation settings. The only module that knows config keys.

A distillation config is a flat mapping::

    teacher_weights: [0.7, 0.3]          # optional, one per teacher
    teacher_geometry: student            # or "own"
    warmup_iters: 0
    self_distillation: {mode: ema, ema_decay: 0.999}   # optional
    terms:
      - {loss: binary_kd, on: cls_logits, temperature: 2.0, confidence_weighting: true}
      - {loss: cwd, on: features, weight: 0.5, levels: ["0", "1", "2"]}
      - {loss: kl, on: roi_class_logits, class_weights: {method: sqrt_inverse}}

Unknown keys and wrong types are errors that name the key and the valid ones. Files are
read with a ``yaml.SafeLoader``: no code in YAML.
"""
from __future__ import annotations

from dataclasses import dataclass
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from ._names import did_you_mean
from .terms import Term
from .weighting import class_weights as compute_class_weights

_TERM_KEYS = {
    "loss": str,
    "on": str,
    "weight": (int, float, dict),
    "temperature": (int, float, dict),
    "params": dict,
    "levels": list,
    "class_weights": dict,
    "class_temperature_spread": (int, float),
    "confidence_weighting": bool,
    "name": str,
}
_CLASS_WEIGHT_KEYS = {"method": str, "beta": float, "group_multipliers": dict, "power": (int, float)}
_SELF_DISTILLATION_KEYS = {"mode": str, "ema_decay": (int, float)}


class _SafeLoaderYaml12Booleans(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that only true/false are booleans (as in YAML 1.2):
    under YAML 1.1 the key ``on:`` of every term would silently become ``True``."""


_SafeLoaderYaml12Booleans.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SafeLoaderYaml12Booleans.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file safely (no tags that construct objects, YAML 1.2 booleans)."""
    with path.open() as handle:
        return yaml.load(handle, Loader=_SafeLoaderYaml12Booleans)


class ConfigError(ValueError):
    """A config value or key that densekd cannot use; the message says where and what to do."""


@dataclass
class DistillationConfig:
    terms: list[dict[str, Any]]
    teacher_weights: Optional[list[float]] = None
    teacher_geometry: str = "student"
    warmup_iters: int = 0
    self_distillation: Optional[dict[str, Any]] = None


_TOP_KEYS = {
    "terms": list,
    "teacher_weights": list,
    "teacher_geometry": str,
    "warmup_iters": int,
    "self_distillation": dict,
}


def _check_keys(where: str, values: Mapping[str, Any], schema: Mapping[str, Any], required: Sequence[str] = ()) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}.")
    for key, value in values.items():
        if key not in schema:
            raise ConfigError(
                f"{where}: unknown key {key!r}.{did_you_mean(str(key), list(schema))} Valid keys: {', '.join(schema)}."
            )
        expected = schema[key]
        # bool is an int in Python; a number field must not silently accept true/false
        wrong_bool = isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple) else (expected,))
        if wrong_bool or not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise ConfigError(f"{where}: {key!r} must be {names}, got {value!r}.")
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}.")


def parse_distillation_config(values: Mapping[str, Any]) -> DistillationConfig:
    """Validate a mapping (e.g. a YAML document) into a :class:`DistillationConfig`."""
    _check_keys("distillation config", values, _TOP_KEYS, required=["terms"])
    for index, term in enumerate(values["terms"]):
        where = f"terms[{index}]"
        _check_keys(where, term, _TERM_KEYS, required=["loss", "on"])
        if "class_weights" in term:
            _check_keys(f"{where}.class_weights", term["class_weights"], _CLASS_WEIGHT_KEYS, required=["method"])
    if "self_distillation" in values:
        _check_keys("self_distillation", values["self_distillation"], _SELF_DISTILLATION_KEYS, required=["mode"])
    return DistillationConfig(**values)


def load_distillation_config(path: Union[str, Path]) -> DistillationConfig:
    """Read a YAML file (``safe_load``) into a :class:`DistillationConfig`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    values = read_yaml(path)
    try:
        return parse_distillation_config(values or {})
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def build_terms(
    config: DistillationConfig,
    image_counts: Optional[Sequence[int]] = None,
    annotation_counts: Optional[Sequence[int]] = None,
) -> list[Term]:
    """The config's terms; per-class weights are computed from the dataset's class counts."""
    terms = []
    for index, spec in enumerate(config.terms):
        spec = dict(spec)
        weight_spec = spec.pop("class_weights", None)
        if weight_spec is not None:
            if image_counts is None:
                raise ConfigError(
                    f"terms[{index}] asks for class_weights; pass the training set's per-class image counts."
                )
            spec["class_weights"] = compute_class_weights(image_counts, annotation_counts, **weight_spec)
        try:
            terms.append(Term(**spec))
        except ValueError as error:
            raise ConfigError(f"terms[{index}]: {error}") from None
    return terms


def distiller_kwargs(config: DistillationConfig) -> dict[str, Any]:
    """Keyword arguments for ``Distiller`` (or ``Distiller.self_distillation``) besides the models and terms."""
    kwargs = {"teacher_geometry": config.teacher_geometry, "warmup_iters": config.warmup_iters}
    if config.teacher_weights is not None:
        kwargs["teacher_weights"] = config.teacher_weights
    if config.self_distillation is not None:
        kwargs.update(config.self_distillation)
    return kwargs

