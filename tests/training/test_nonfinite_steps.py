"""Non-finite steps: skipped (no update, BatchNorm statistics kept), named in the progress line
and the JSONL log, counted in the summary and the checkpoint; too many in a row stop training
with a clear error after a checkpoint of the last good weights (tiny regressor, one thread)."""
import json
import os
import shutil
import signal

import pytest
import torch
from training_job import FaultInjector, tiny_job

from densekd.training import NonFiniteTrainingError, TrainingInterrupted, run_training


def faulty_job(out, faults, iterations=12, **settings):
    job = tiny_job(out, iterations=iterations, model="regressor", **settings)
    job.model = FaultInjector(job.model, faults)
    return job


def floating_state(model) -> dict:
    """Parameters and running statistics (integer counters such as BatchNorm's
    ``num_batches_tracked`` count every forward, skipped or not)."""
    return {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def assert_equal_states(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"tensors differ: {different}"


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "run.jsonl").read_text().splitlines()]


def test_nonfinite_steps_are_skipped_named_and_leave_the_weights_of_a_run_without_them(tmp_path, capsys):
    # 0-based steps 2 and 7: kd_x is NaN; step 3: the images are NaN (every loss, and BatchNorm's
    # running statistics if the step were not undone). Steps 2 and 3 are consecutive (<= 5).
    faults = {2: "nan_loss", 3: "nan_input", 7: "nan_loss"}
    job = faulty_job(tmp_path / "faulty", faults)
    summary = run_training(job)
    printed = capsys.readouterr().out

    assert summary["skipped_steps"] == 3
    assert summary["skipped_by_entry"] == {"kd_x": 3, "loss_box_reg": 1}
    assert "it     3/12  skipped the step: non-finite kd_x=nan (1 in a row, 1 in total" in printed
    assert "it     4/12  skipped the step: non-finite loss_box_reg=nan, kd_x=nan (2 in a row, 2 in total" in printed
    events = [r for r in records(tmp_path / "faulty") if r.get("event") == "skipped_nonfinite_step"]
    assert [(r["iteration"], r["nonfinite"], r["consecutive"]) for r in events] == [
        (3, {"kd_x": "nan"}, 1), (4, {"loss_box_reg": "nan", "kd_x": "nan"}, 2), (8, {"kd_x": "nan"}, 1),
    ]  # fmt: skip
    logged = [(r["iteration"], r["skipped_steps"]) for r in records(tmp_path / "faulty") if "losses" in r]
    assert logged == [(4, 2), (8, 3), (12, 3)]
    assert all(all(map(lambda v: v == v, r["losses"].values())) for r in records(tmp_path / "faulty") if "losses" in r)
    checkpoint = torch.load(tmp_path / "faulty" / "run.ckpt", weights_only=True)
    assert checkpoint["nonfinite"]["total"] == 3 and checkpoint["summary"]["skipped_steps"] == 3

    weights = floating_state(job.model)
    assert all(torch.isfinite(v).all() for v in weights.values())
    # The same run where those three steps change nothing by construction (no forward, no gradient).
    reference = faulty_job(tmp_path / "reference", {step: "skip" for step in faults})
    assert run_training(reference)["skipped_steps"] == 0
    assert_equal_states(floating_state(reference.model), weights)
    # ... and those steps did matter: a run without faults ends elsewhere.
    clean = faulty_job(tmp_path / "clean", {})
    run_training(clean)
    assert not torch.equal(floating_state(clean.model)["model.head.weight"], weights["model.head.weight"])


@pytest.mark.parametrize("clip_grad_norm", [None, 10.0])
def test_nonfinite_gradient_with_finite_losses_is_skipped_and_said_so(tmp_path, capsys, clip_grad_norm):
    job = faulty_job(tmp_path, {1: "nan_grad"}, iterations=4, clip_grad_norm=clip_grad_norm)
    summary = run_training(job)
    assert summary["skipped_by_entry"] == {"grad_norm": 1}
    assert "it     2/4  skipped the step: every loss is finite but the gradient norm is nan" in capsys.readouterr().out
    assert [r["nonfinite"] for r in records(tmp_path) if r.get("event")] == [{"grad_norm": "nan"}]
    assert all(torch.isfinite(v).all() for v in floating_state(job.model).values())


def test_too_many_consecutive_nonfinite_steps_stop_with_a_clear_error_and_a_usable_checkpoint(tmp_path):
    faults = {4: "nan_input", 5: "nan_loss", 6: "nan_input"}  # iterations 5, 6, 7
    job = faulty_job(tmp_path, faults, checkpoint_every=100, max_nonfinite_steps=2)
    before_streak = {}
    job.iteration_hooks.append(lambda i: before_streak.update(floating_state(job.model)) if i == 4 else None)
    with pytest.raises(NonFiniteTrainingError) as stopped:
        run_training(job)
    message = str(stopped.value)
    for expected in ("stopped at iteration 7/12 after 3 consecutive steps", "iterations 5-7",
                     "loss_box_reg on 2 step(s), kd_x on 3 step(s)", "optim.max_nonfinite_steps=2",
                     str(tmp_path / "run.ckpt"), "lower optim.lr or the kd term weights",
                     "optim.clip_grad_norm", "check the training data"):  # fmt: skip
        assert expected in message, (expected, message)
    assert stopped.value.iteration == 7 and stopped.value.checkpoint == tmp_path / "run.ckpt"
    assert stopped.value.entries == {"loss_box_reg": 2, "kd_x": 3}

    # The checkpoint (written at the stop, not a periodic one) holds the last good weights.
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert state["iteration"] == 7 and not state["finished"] and state["nonfinite"]["consecutive"] == 3
    assert_equal_states(before_streak, {k: v for k, v in state["model"].items() if v.is_floating_point()})
    # ... and resumes: once the cause is fixed (here: no more faults) training completes, still counting.
    fixed = faulty_job(tmp_path, {}, checkpoint_every=100, max_nonfinite_steps=2)
    summary = run_training(fixed, resume=True)
    assert summary["skipped_steps"] == 3 and summary["skipped_by_entry"] == {"kd_x": 3, "loss_box_reg": 2}
    assert all(torch.isfinite(v).all() for v in floating_state(fixed.model).values())


def test_max_nonfinite_steps_zero_stops_at_the_first(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at iteration 1/12 after 1 consecutive steps.*iteration 1;"):
        run_training(faulty_job(tmp_path, {0: "nan_loss"}, max_nonfinite_steps=0))
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["iteration"] == 1


def test_skip_counters_resume_bitwise_with_the_checkpoint(tmp_path):
    faults = {3: "nan_loss", 4: "nan_loss", 9: "nan_loss"}  # iterations 4, 5 (in a row) and 10
    uninterrupted = faulty_job(tmp_path / "uninterrupted", faults, max_nonfinite_steps=2)
    expected = run_training(uninterrupted)
    assert expected["skipped_steps"] == 3

    interrupted = faulty_job(tmp_path / "interrupted", faults, checkpoint_every=100, max_nonfinite_steps=2)
    interrupted.iteration_hooks.append(lambda i: os.kill(os.getpid(), signal.SIGINT) if i == 3 else None)
    with pytest.raises(TrainingInterrupted):
        run_training(interrupted)  # stops after iteration 4, the first of the two skipped in a row
    assert torch.load(tmp_path / "interrupted" / "run.ckpt", weights_only=True)["nonfinite"]["consecutive"] == 1
    shutil.copytree(tmp_path / "interrupted", tmp_path / "strict")

    resumed = faulty_job(tmp_path / "interrupted", faults, checkpoint_every=100, max_nonfinite_steps=2)
    summary = run_training(resumed, resume=True)
    assert summary["skipped_steps"] == 3 and summary["skipped_by_entry"] == expected["skipped_by_entry"]
    assert_equal_states(floating_state(uninterrupted.model), floating_state(resumed.model))
    without_time = lambda out: [{k: v for k, v in r.items() if k != "seconds"} for r in records(out)]  # noqa: E731
    assert without_time(tmp_path / "interrupted") == without_time(tmp_path / "uninterrupted")

    # The streak continues across the resume: with a limit of 1 (a limit a resume may change),
    # iteration 5 is the second in a row and stops training.
    strict = faulty_job(tmp_path / "strict", faults, checkpoint_every=100, max_nonfinite_steps=1)
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at iteration 5/12 after 2 consecutive steps"):
        run_training(strict, resume=True)
