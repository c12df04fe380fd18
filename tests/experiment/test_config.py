"""Distillation settings from YAML: shipped configs build and run; bad keys are named."""
from pathlib import Path

import pytest
import torch
from tiny_detectors import build_rcnn, build_retinanet, make_batch

from densekd import Distiller
from densekd.experiment.config import (
    ConfigError,
    build_terms,
    distiller_kwargs,
    load_distillation_config,
    parse_distillation_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "distill"
COUNTS = [500, 120, 30, 4]  # per-class training images of the tiny 4-class models


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_distillation_config_builds_and_runs_one_step(path):
    config = load_distillation_config(path)
    terms = build_terms(config, image_counts=COUNTS)
    two_stage = any(t.on.startswith(("roi_", "rpn_")) for t in terms)
    student = build_rcnn() if two_stage else build_retinanet()
    kwargs = distiller_kwargs(config)
    if "mode" in kwargs:
        distiller = Distiller.self_distillation(student, terms, **kwargs)
    else:
        teacher = build_rcnn(fpn_width=64) if two_stage else build_retinanet(fpn_width=64)
        distiller = Distiller(student, teacher, terms, **kwargs)
    losses = distiller.train()(*make_batch())
    assert {t.key for t in terms} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_unknown_keys_and_wrong_types_are_named():
    with pytest.raises(ConfigError, match=r"terms\[0\]: unknown key 'temprature'. Did you mean 'temperature'"):
        parse_distillation_config({"terms": [{"loss": "kl", "on": "roi_class_logits", "temprature": 2}]})
    with pytest.raises(ConfigError, match=r"'warmup_iters' must be int"):
        parse_distillation_config({"terms": [], "warmup_iters": "ten"})
    with pytest.raises(ConfigError, match=r"'confidence_weighting' must be bool"):
        parse_distillation_config({"terms": [{"loss": "kl", "on": "roi_class_logits", "confidence_weighting": 1}]})
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['on'\]"):
        parse_distillation_config({"terms": [{"loss": "kl"}]})
    config = parse_distillation_config({"terms": [{"loss": "kll", "on": "roi_class_logits"}]})
    with pytest.raises(ConfigError, match=r"terms\[0\]: unknown loss 'kll'"):
        build_terms(config)


def test_class_weights_need_the_dataset_counts(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("terms:\n  - {loss: kl, on: roi_class_logits, class_weights: {method: inverse}}\n")
    config = load_distillation_config(path)
    with pytest.raises(ConfigError, match="per-class image counts"):
        build_terms(config)
    weights = build_terms(config, image_counts=COUNTS)[0].class_weights
    assert torch.isclose(weights.mean(), torch.tensor(1.0)) and weights.argmax() == 3
    with pytest.raises(ConfigError, match="does not exist"):
        load_distillation_config(tmp_path / "missing.yaml")


def test_yaml_on_and_yes_stay_strings_and_python_tags_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("terms:\n  - {loss: binary_kd, on: cls_logits, name: yes, confidence_weighting: true}\n")
    term = load_distillation_config(path).terms[0]
    assert term == {"loss": "binary_kd", "on": "cls_logits", "name": "yes", "confidence_weighting": True}
    path.write_text("terms: !!python/object/apply:os.system ['echo unsafe']\n")
    with pytest.raises(Exception, match="could not determine a constructor|python/object"):
        load_distillation_config(path)


def test_fractional_iteration_counts_resolve_against_the_run_length():
    from densekd.experiment.config import resolve_iterations, resolve_schedule

    assert resolve_iterations(0.5, 300, "x") == 150 and resolve_iterations(7, 300, "x") == 7
    spec = {"kind": "linear", "start_value": 5.0, "end_value": 2.0, "start_iter": 0, "end_iter": 0.5}
    assert resolve_schedule(spec, 300, "t")["end_iter"] == 150
    assert resolve_schedule(spec, 1, "t")["end_iter"] == 1  # a one-step run still gets a valid ramp
    assert resolve_schedule({"kind": "step", "values": [1, 2], "milestones": [0.25]}, 40, "w")["milestones"] == [10]
    with pytest.raises(ConfigError, match="neither an iteration count"):
        resolve_iterations(1.5, 300, "warmup_iters")
    with pytest.raises(ConfigError, match="needs the run's total iterations"):
        resolve_iterations(0.3, None, "warmup_iters")
