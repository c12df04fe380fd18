import math
import pickle

import pytest

from densekd.core.schedules import SCHEDULES, Constant, Cosine, Linear, Step, build_schedule


def test_constant():
    s = Constant(0.5)
    assert s(0) == 0.5 and s(10**6) == 0.5
    assert isinstance(s(3), float)


def test_linear_values():
    s = Linear(start_value=5.0, end_value=2.0, start_iter=100, end_iter=400)
    assert s(0) == 5.0  # before the ramp
    assert s(100) == 5.0
    assert s(250) == pytest.approx(3.5)  # middle
    assert s(175) == pytest.approx(4.25)  # quarter
    assert s(400) == 2.0
    assert s(10_000) == 2.0  # after the ramp


def test_cosine_values():
    s = Cosine(start_value=0.3, end_value=0.7, start_iter=0, end_iter=100)
    assert s(0) == pytest.approx(0.3)
    assert s(50) == pytest.approx(0.5)  # half-way on a half cosine is the midpoint
    # quarter: 0.7 + (0.3 - 0.7) * (1 + cos(pi/4)) / 2
    assert s(25) == pytest.approx(0.7 - 0.4 * (1 + math.sqrt(0.5)) / 2)
    assert s(25) < 0.4  # slower than linear at the start
    assert s(100) == 0.7 and s(1000) == 0.7
    assert Cosine(1.0, 0.0, 10, 20)(5) == 1.0


def test_step_boundaries():
    s = Step(values=[0.0, 1.0, 0.5], milestones=[10, 20])
    assert s(0) == 0.0
    assert s(9) == 0.0
    assert s(10) == 1.0  # milestone starts the next value
    assert s(19) == 1.0
    assert s(20) == 0.5
    assert s(10**6) == 0.5
    assert Step(values=[2.0], milestones=[])(123) == 2.0


def test_step_validation():
    with pytest.raises(ValueError, match="one more value than milestones"):
        Step(values=[1.0, 2.0], milestones=[10, 20])
    with pytest.raises(ValueError, match="strictly increasing"):
        Step(values=[1.0, 2.0, 3.0], milestones=[20, 20])
    with pytest.raises(ValueError, match="must be a list"):
        Step(values="abc", milestones=[])


def test_ramp_validation():
    with pytest.raises(ValueError, match=r"end_iter \(10\) must be greater than start_iter \(10\).*Constant"):
        Linear(1.0, 2.0, 10, 10)
    with pytest.raises(ValueError, match="end_iter"):
        Cosine(1.0, 2.0, 20, 10)
    with pytest.raises(ValueError, match="start_iter must be a non-negative whole number"):
        Linear(1.0, 2.0, -5, 10)
    with pytest.raises(ValueError, match="start_value must be a finite number"):
        Linear("high", 2.0, 0, 10)
    with pytest.raises(ValueError, match="finite"):
        Constant(float("nan"))


def test_schedules_are_picklable_and_frozen():
    for s in [Constant(1.0), Linear(5, 2, 0, 10), Cosine(0, 1, 0, 10), Step([1, 2], [5])]:
        t = pickle.loads(pickle.dumps(s))
        assert t == s and t(7) == s(7)
        with pytest.raises(Exception):
            s.start_value = 3  # frozen
    assert Step([1, 2], [5]).values == (1.0, 2.0)  # lists normalized to tuples


def test_build_schedule_from_number_and_dict():
    assert build_schedule(0.7) == Constant(0.7)
    assert build_schedule(3) == Constant(3.0)
    spec = {"kind": "linear", "start_value": 5, "end_value": 2, "start_iter": 0, "end_iter": 100}
    s = build_schedule(spec)
    assert s == Linear(5.0, 2.0, 0, 100) and s(50) == pytest.approx(3.5)
    assert "kind" in spec  # not mutated
    assert build_schedule({"kind": "step", "values": [0, 1], "milestones": [5]})(5) == 1.0
    assert build_schedule({"kind": "cosine", "start_value": 1, "end_value": 0, "start_iter": 0, "end_iter": 2})(1) == pytest.approx(0.5)
    assert build_schedule({"kind": "constant", "value": 2})(0) == 2.0
    existing = Linear(1, 2, 0, 3)
    assert build_schedule(existing) is existing
    assert set(SCHEDULES) == {"constant", "linear", "cosine", "step"}


def test_build_schedule_errors():
    with pytest.raises(ValueError, match="Did you mean 'cosine'") as info:
        build_schedule({"kind": "cosin"})
    assert "constant, cosine, linear, step" in str(info.value)
    with pytest.raises(ValueError, match="no 'kind' key"):
        build_schedule({"value": 1.0})
    with pytest.raises(ValueError, match=r"'linear' schedule: unexpected argument\(s\) 'start'.*accepted arguments: start_value, end_value, start_iter, end_iter"):
        build_schedule({"kind": "linear", "start": 5, "end_value": 2, "start_iter": 0, "end_iter": 10})
    with pytest.raises(ValueError, match=r"missing argument\(s\) 'end_iter'"):
        build_schedule({"kind": "linear", "start_value": 5, "end_value": 2, "start_iter": 0})
    with pytest.raises(TypeError, match="number or a dict"):
        build_schedule("0.5")
    with pytest.raises(TypeError):
        build_schedule(True)
