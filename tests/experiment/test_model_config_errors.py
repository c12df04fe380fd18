"""Model, checkpoint and config mistakes that the rest of the suite does not cover yet: the
non-finite step limit, checkpoints holding pickled objects or cut short, and checkpoints whose
categories come in another order than the dataset's.

Covered elsewhere: different class counts (tests/detection/test_distiller.py), anchors that differ
for per-anchor terms (same file), unknown keys and wrong types (tests/experiment/test_config.py,
tests/experiment/test_recipes.py), missing checkpoint files and other architectures
(tests/detection/test_detection_models.py)."""
import pickle

import pytest
import torch

from densekd.data.categories import CategoryOrderError, categories_path, check_categories, write_categories
from densekd.experiment.config import ConfigError, OptimSection, load_experiment_config
from densekd.training.checkpoints import CheckpointLoadError, load_weights


class Payload:
    """Any class: pickled into a checkpoint, it is code that torch.load(weights_only=True) refuses to run."""


def test_max_nonfinite_steps_must_be_a_whole_number_at_least_zero():
    assert load_experiment_config(None, ["optim.max_nonfinite_steps=0"]).optim.max_nonfinite_steps == 0
    assert OptimSection().max_nonfinite_steps == 5
    with pytest.raises(ConfigError, match=r"optim.max_nonfinite_steps must be a whole number >= 0 .*got -1"):
        load_experiment_config(None, ["optim.max_nonfinite_steps=-1"])
    with pytest.raises(ConfigError, match=r"teacher_optim.max_nonfinite_steps must be int, got 2.5"):
        load_experiment_config(None, ["teacher_optim.max_nonfinite_steps=2.5"])
    with pytest.raises(ConfigError, match=r"optim: unknown key 'max_nonfinite_step'. Did you mean 'max_nonfinite_steps'"):
        load_experiment_config(None, ["optim.max_nonfinite_step=3"])
    with pytest.raises(ConfigError, match=r"max_nonfinite_steps must be a whole number"):
        OptimSection(max_nonfinite_steps=True)


def test_a_checkpoint_holding_a_pickled_object_is_refused_with_what_to_do(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.save({"model": model.state_dict(), "extra": Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointLoadError) as refused:
        load_weights(model, tmp_path / "pickled.pth")
    message = str(refused.value)
    assert f"{tmp_path / 'pickled.pth'} contains a pickled Python object ({__name__}.Payload)" in message
    assert "weights_only=True" in message and "torch.save(model.state_dict(), path)" in message
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)


def test_a_checkpoint_cut_short_is_named(tmp_path):
    model = torch.nn.Linear(2, 2)
    torch.save(model.state_dict(), tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError, match=r"cut.pth cannot be read as a PyTorch checkpoint .*truncated"):
        load_weights(model, tmp_path / "cut.pth")


def test_category_sidecar_refuses_another_order_and_other_categories(tmp_path):
    checkpoint = tmp_path / "teacher.pth"
    checkpoint.write_bytes(b"")  # the sidecar is checked on its own; the weights never load here
    assert not check_categories(checkpoint, ["circle", "square", "star"])  # no sidecar: nothing to check
    sidecar = write_categories(checkpoint, ["circle", "square", "star"], ids=[10, 20, 30])
    assert sidecar == categories_path(checkpoint) == tmp_path / "teacher.pth.categories.json"
    assert check_categories(checkpoint, ["circle", "square", "star"])
    with pytest.raises(CategoryOrderError) as reordered:
        check_categories(checkpoint, ["circle", "star", "square"])
    assert "same categories in another order" in str(reordered.value)
    assert "label 2 is 'square' there but 'star' here; label 3 is 'star' there but 'square' here" in str(reordered.value)
    with pytest.raises(CategoryOrderError, match=r"other categories .* 3 there, 2 here; not in the checkpoint: \['disc'\]"):
        check_categories(checkpoint, ["circle", "disc"])
    sidecar.write_text("{not json")
    with pytest.raises(CategoryOrderError, match="is not a category list"):
        check_categories(checkpoint, ["circle"])
