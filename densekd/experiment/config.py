"""YAML -> distillation settings. The only module that knows config keys.

A distillation config is a flat mapping::

    teacher_weights: [0.7, 0.3]          # optional, one per teacher
    teacher_geometry: student            # or "own"
    warmup_iters: 0
    self_distillation: {mode: ema, ema_decay: 0.999}   # optional
    teacher_cache: false                 # true: offline, teacher outputs cached (densekd.detection.teacher_cache)
    teacher_cache_dtype: float16         # or float32
    logit_resolution: head               # segmentation: logit terms at the heads' resolution, or "input"
    terms:
      - {loss: binary_kd, on: cls_logits, temperature: 2.0, confidence_weighting: true,
         raise_only_groups: [r, c]}   # rare/common classes: KD raises their scores, never lowers them
      - {loss: cwd, on: features, weight: 0.5, levels: ["0", "1", "2"]}
      - {loss: kl, on: roi_class_logits, class_weights: {method: sqrt_inverse}}
      - {loss: masked_imitation, on: features, balance: 0.5}   # scaled to 0.5 x the student's loss
      - {loss: pseudo_targets, on: detections, params: {score_threshold: 0.5}}   # any teacher family

Unknown keys and wrong types are errors that name the key and the valid ones. Files are
read with a ``yaml.SafeLoader``: no code in YAML.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from .._names import did_you_mean
from ..core.outputs import DETECTIONS, KEYPOINT_OUTPUTS, MASK_OUTPUTS, ROI_OUTPUTS
from ..core.terms import Term
from ..core.weighting import class_weights as compute_class_weights
from ..data.long_tail import LVIS_FREQUENCIES, lvis_frequency_of_counts
from ..training.optim import OptimSettings

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
    "raise_only_groups": list,
    "name": str,
    "balance": (int, float),
    "balance_iters": int,
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
    warmup_iters: Union[int, float] = 0
    self_distillation: Optional[dict[str, Any]] = None
    teacher_cache: bool = False
    teacher_cache_dtype: str = "float16"
    logit_resolution: Optional[str] = None  # segmentation only; None: the SegmentationDistiller's default


_TOP_KEYS = {
    "terms": list,
    "teacher_weights": list,
    "teacher_geometry": str,
    "warmup_iters": (int, float),
    "self_distillation": dict,
    "teacher_cache": bool,
    "teacher_cache_dtype": str,
    "logit_resolution": str,
}
_TEACHER_CACHE_DTYPES = ("float16", "float32")
_LOGIT_RESOLUTIONS = ("head", "input")  # densekd.segmentation.adapter.LOGIT_RESOLUTIONS


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
    if values.get("teacher_cache_dtype", "float16") not in _TEACHER_CACHE_DTYPES:
        raise ConfigError(
            f"teacher_cache_dtype must be one of {', '.join(_TEACHER_CACHE_DTYPES)}, got {values['teacher_cache_dtype']!r}."
        )
    if "logit_resolution" in values and values["logit_resolution"] not in _LOGIT_RESOLUTIONS:
        raise ConfigError(
            f"logit_resolution must be one of {', '.join(_LOGIT_RESOLUTIONS)}, got {values['logit_resolution']!r}."
        )
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


def resolve_iterations(value: Any, total_iters: Optional[int], where: str) -> Any:
    """An iteration count: an int as written, or a float in [0, 1] as a fraction of the run
    (so one recipe fits a 30- and a 3000-iteration schedule)."""
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: {value} is neither an iteration count (int) nor a fraction in [0, 1].")
        if total_iters is None:
            raise ConfigError(f"{where}: a fractional iteration count needs the run's total iterations.")
        return int(round(value * total_iters))
    return value


def resolve_schedule(spec: Any, total_iters: Optional[int], where: str) -> Any:
    """A schedule spec with fractional ``start_iter``/``end_iter``/``milestones`` made absolute."""
    if not isinstance(spec, Mapping):
        return spec
    resolved = dict(spec)
    for key in ("start_iter", "end_iter"):
        if key in resolved:
            resolved[key] = resolve_iterations(resolved[key], total_iters, f"{where}.{key}")
    fractional = any(isinstance(spec.get(key), float) for key in ("start_iter", "end_iter"))
    if fractional and {"start_iter", "end_iter"} <= resolved.keys() and resolved["end_iter"] <= resolved["start_iter"]:
        resolved["end_iter"] = resolved["start_iter"] + 1  # fractions of a very short run still give a valid ramp
    if "milestones" in resolved:
        resolved["milestones"] = [resolve_iterations(m, total_iters, f"{where}.milestones") for m in resolved["milestones"]]
    return resolved


def build_terms(
    config: DistillationConfig,
    image_counts: Optional[Sequence[int]] = None,
    annotation_counts: Optional[Sequence[int]] = None,
    total_iters: Optional[int] = None,
) -> list[Term]:
    """The config's terms; per-class weights are computed from the dataset's class counts and
    fractional iteration counts in schedules resolved against ``total_iters``."""
    terms = []
    for index, spec in enumerate(config.terms):
        spec = dict(spec)
        for key in ("weight", "temperature"):
            if key in spec:
                spec[key] = resolve_schedule(spec[key], total_iters, f"terms[{index}].{key}")
        weight_spec = spec.pop("class_weights", None)
        if weight_spec is not None:
            if image_counts is None:
                raise ConfigError(
                    f"terms[{index}] asks for class_weights; pass the training set's per-class image counts."
                )
            spec["class_weights"] = compute_class_weights(image_counts, annotation_counts, **weight_spec)
        groups = spec.pop("raise_only_groups", None)
        if groups is not None:
            spec["raise_only_classes"] = _classes_in_groups(groups, image_counts, f"terms[{index}].raise_only_groups")
        try:
            terms.append(Term(**spec))
        except ValueError as error:
            raise ConfigError(f"terms[{index}]: {error}") from None
    return terms


def _classes_in_groups(groups: Sequence[str], image_counts: Optional[Sequence[int]], where: str) -> list[bool]:
    """(K,) whether each class's LVIS frequency group (from its training-image count) is in ``groups``."""
    unknown = [g for g in groups if g not in LVIS_FREQUENCIES]
    if unknown:
        raise ConfigError(f"{where}: unknown group(s) {unknown}; groups are 'r' (rare), 'c' (common), 'f' (frequent).")
    if image_counts is None:
        raise ConfigError(f"{where} needs the training set's per-class image counts to find each class's group.")
    return [group in groups for group in lvis_frequency_of_counts(image_counts)]


def distiller_kwargs(config: DistillationConfig, total_iters: Optional[int] = None) -> dict[str, Any]:
    """Keyword arguments for ``Distiller`` (or ``Distiller.self_distillation``) besides the models and terms."""
    warmup = resolve_iterations(config.warmup_iters, total_iters, "warmup_iters")
    kwargs = {"teacher_geometry": config.teacher_geometry, "warmup_iters": warmup}
    if config.teacher_weights is not None:
        kwargs["teacher_weights"] = config.teacher_weights
    if config.logit_resolution is not None:
        kwargs["logit_resolution"] = config.logit_resolution
    if config.self_distillation is not None:
        kwargs.update(config.self_distillation)
    return kwargs



# --- experiments: data, models, optimisation and distillation in one file ----------------
@dataclass
class DataSection:
    dataset: str = "synthetic"  # "synthetic" (embedded), "coco" (COCO/LVIS-format files), "mask_folder" (segmentation)
    train_ann: Optional[str] = None
    train_images: Optional[str] = None
    val_ann: Optional[str] = None
    val_images: Optional[str] = None
    skip_bad: bool = False  # drop bad images/annotations (reported) instead of stopping with an error
    mask_root: Optional[str] = None  # mask_folder: <root>/classes.txt, <root>/{train,val}/{images,masks}/
    categories: Any = None  # segmentation of coco data: null (all), "voc" or a list of category ids / names
    synthetic: dict = dataclasses.field(default_factory=dict)  # SyntheticConfig overrides
    batch_size: int = 8
    num_workers: int = 0
    sampler: str = "random"  # random | repeat_factor | class_aware
    rfs_threshold: float = 0.001


@dataclass
class AugmentSection:
    hflip: float = 0.0
    scale_jitter: float = 0.0
    color_jitter: float = 0.0
    strength: Any = 1.0  # number or schedule spec: augmentation strength over iterations
    mixup_prob: float = 0.0
    mixup_alpha: float = 1.5
    cutmix_prob: float = 0.0


@dataclass
class ModelSection:
    name: str = ""  # a densekd.detection.models builder or a torchvision detection builder
    image_size: int = 96
    checkpoint: Optional[str] = None  # state_dict or a densekd training checkpoint
    weights: Optional[str] = None  # torchvision pretrained weights of a torchvision builder, e.g. "DEFAULT"


@dataclass
class OptimSection(OptimSettings):
    """The loop's settings plus what the YAML adds: label smoothing of the student's own loss."""

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        value = self.max_nonfinite_steps
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                f"max_nonfinite_steps must be a whole number >= 0 (consecutive non-finite steps skipped before "
                f"training stops; 0 stops at the first), got {value!r}."
            )


@dataclass
class ExperimentConfig:
    recipe: Optional[str] = None  # configs/recipes/<recipe>.yaml, read first, then overridden
    seed: int = 0
    data: DataSection = dataclasses.field(default_factory=DataSection)
    augment: AugmentSection = dataclasses.field(default_factory=AugmentSection)
    teacher: ModelSection = dataclasses.field(default_factory=ModelSection)
    extra_teachers: list = dataclasses.field(default_factory=list)  # more ModelSection mappings
    student: ModelSection = dataclasses.field(default_factory=ModelSection)
    teacher_optim: OptimSection = dataclasses.field(default_factory=lambda: OptimSection(iterations=500))
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    distill: Optional[dict] = None  # a distillation config (see parse_distillation_config)
    checkpoint_every: int = 100
    log_every: int = 50


_SECTIONS = {
    "data": DataSection,
    "augment": AugmentSection,
    "teacher": ModelSection,
    "student": ModelSection,
    "teacher_optim": OptimSection,
    "optim": OptimSection,
}
RECIPES_DIR = Path(__file__).resolve().parents[2] / "configs" / "recipes"


def _field_types(cls) -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(cls)}


_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}


def _check_value(where: str, value: Any, annotation: str) -> Any:
    """Type-check ``value`` against a dataclass field annotation written as a string."""
    if annotation == "Any":
        return value
    optional = annotation.startswith("Optional[")
    base = annotation[len("Optional[") : -1] if optional else annotation
    if value is None and optional:
        return None
    allowed = _SCALARS[base]
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{where} must be {base}, got {value!r}.")
    if not isinstance(value, allowed):
        raise ConfigError(f"{where} must be {base}{' or null' if optional else ''}, got {value!r}.")
    return float(value) if base == "float" else value


def _build_section(where: str, cls, values: Mapping[str, Any]):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}.")
    types = _field_types(cls)
    checked = {}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(
                f"{where}: unknown key {key!r}.{did_you_mean(str(key), list(types))} Valid keys: {', '.join(types)}."
            )
        checked[key] = _check_value(f"{where}.{key}", value, types[key])
    try:
        return cls(**checked)
    except ConfigError as error:  # a section's own range checks name the key, not the section
        raise ConfigError(f"{where}.{error}") from None


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Section-wise merge: override's keys win inside each section mapping. A ``distill``
    mapping with ``terms`` replaces the base's whole; one without (``--set
    distill.teacher_cache=true``) adjusts the base's settings."""
    merged = dict(base)
    for key, value in override.items():
        replaces_distill = key == "distill" and isinstance(value, Mapping) and "terms" in value
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and not replaces_distill:
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=0.01", "seed=3"]`` -> nested mapping; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. optim.lr=0.01.")
        key, raw = assignment.split("=", 1)
        value = yaml.load(raw, Loader=_SafeLoaderYaml12Booleans)
        parts = key.strip().split(".")
        if len(parts) > 2:
            raise ConfigError(f"--set {key}: at most one dot (section.key).")
        if len(parts) == 2:
            nested.setdefault(parts[0], {})[parts[1]] = value
        else:
            nested[parts[0]] = value
    return nested


def parse_experiment_config(values: Mapping[str, Any], recipes_dir: Path = RECIPES_DIR) -> ExperimentConfig:
    """Validate an experiment mapping; a named recipe is read first and the mapping overrides it."""
    values = dict(values or {})
    recipe = values.get("recipe")
    if recipe is not None:
        if not isinstance(recipe, str):
            raise ConfigError(f"recipe must be a name, got {recipe!r}.")
        path = recipes_dir / f"{recipe}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in recipes_dir.glob("*.yaml"))
            raise ConfigError(
                f"unknown recipe {recipe!r}.{did_you_mean(recipe, names)} Recipes: {', '.join(names)}."
            )
        recipe_values = read_yaml(path) or {}
        if "recipe" in recipe_values:
            raise ConfigError(f"{path}: a recipe cannot name another recipe (one level of composition).")
        values = _merge(recipe_values, values)
    types = _field_types(ExperimentConfig)
    built: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(
                f"unknown key {key!r}.{did_you_mean(str(key), list(types))} Valid keys: {', '.join(types)}."
            )
        if key in _SECTIONS:
            built[key] = _build_section(key, _SECTIONS[key], value)
        elif key == "extra_teachers":
            if not isinstance(value, list):
                raise ConfigError(f"extra_teachers must be a list of model sections, got {value!r}.")
            built[key] = [_build_section(f"extra_teachers[{i}]", ModelSection, v) for i, v in enumerate(value)]
        elif key == "distill":
            parse_distillation_config(value)  # validate now; terms are built once counts are known
            built[key] = value
        else:
            built[key] = _check_value(key, value, types[key])
    config = ExperimentConfig(**built)
    _check_teacher_cache(config)
    return config


def _check_teacher_cache(config: ExperimentConfig) -> None:
    """``distill.teacher_cache: true`` computes each teacher output once per image: refuse, naming
    each one, the settings under which the teacher's input or the teacher itself changes."""
    distill = config.distill or {}
    if not distill.get("teacher_cache"):
        return
    augment = config.augment
    blockers = [
        f"augment.{name}={getattr(augment, name)} ({what}): set it to 0"
        for name, what in (
            ("hflip", "random flips; not replayed, a CNN teacher is not mirror-symmetric"),
            ("scale_jitter", "random zoom"),
            ("color_jitter", "random colour"),
            ("mixup_prob", "MixUp with a random partner every epoch"),
            ("cutmix_prob", "CutMix with a random partner every epoch"),
        )
        if getattr(augment, name) > 0
    ]
    if distill.get("self_distillation"):
        blockers.append("distill.self_distillation (the EMA/snapshot teacher changes during training): remove it")
    if distill.get("teacher_geometry", "student") != "student":
        blockers.append(f"distill.teacher_geometry={distill['teacher_geometry']!r}: use 'student'")
    for index, term in enumerate(distill.get("terms", [])):
        if term.get("on") in ROI_OUTPUTS | MASK_OUTPUTS | KEYPOINT_OUTPUTS:
            blockers.append(
                f"distill.terms[{index}] ({term.get('loss')} on {term['on']}: the teacher's RoI heads run on the "
                "student's proposals of each step, which cannot be computed ahead of time): drop the term"
            )
        elif term.get("on") == DETECTIONS:
            blockers.append(
                f"distill.terms[{index}] ({term.get('loss')} on {DETECTIONS}: the cache does not store the teacher's "
                "detections): drop the term"
            )
    if blockers:
        raise ConfigError(
            "distill.teacher_cache=true reuses teacher outputs computed once per image, which these settings rule "
            "out:\n  - " + "\n  - ".join(blockers) + "\nFix each, or set distill.teacher_cache=false (online distillation)."
        )


def load_experiment_config(
    path: Union[str, Path, None] = None, overrides: Sequence[str] = (), recipes_dir: Path = RECIPES_DIR
) -> ExperimentConfig:
    """Read an experiment YAML (or start empty), apply ``--set`` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        values = read_yaml(path) or {}
    try:
        return parse_experiment_config(_merge(values, parse_overrides(overrides)), recipes_dir)
    except ConfigError as error:
        raise ConfigError(f"{path or 'config'}: {error}") from None


MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
_MODEL_KEYS = {
    "architecture": str, "backbone": str, "fpn_channels": int, "head_convs": int, "box_bias_init": (int, float),  # detection
    "width_mult": (int, float),  # detection (SSDlite)
    "aspp_channels": int, "atrous_rates": list, "aux": bool, "inter_channels": int,  # segmentation
}  # fmt: skip


def model_definitions(models_dir: Path = MODELS_DIR) -> dict[str, tuple[str, dict[str, Any]]]:
    """``configs/models/<name>.yaml`` -> {name: (architecture, arguments)}."""
    definitions = {}
    for path in sorted(models_dir.glob("*.yaml")):
        values = read_yaml(path) or {}
        try:
            _check_keys(str(path), values, _MODEL_KEYS, required=["architecture"])
        except ConfigError as error:
            raise ConfigError(str(error)) from None
        values = dict(values)
        definitions[path.stem] = (values.pop("architecture"), values)
    return definitions
