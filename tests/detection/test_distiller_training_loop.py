"""The Distiller inside someone else's training loop: wrapped students are refused, the
state_dict carries what resuming needs, and the optimizer's parameter groups."""
import copy
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from densekd import Distiller, Term, weight_decay_groups
from tiny_detectors import build_fcos, build_retinanet, make_batch

WRAP_THE_DISTILLER = r"wrap the distiller instead, e\.g\. model = DistributedDataParallel\(distiller\)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a wrapped student is refused -------------------------------------------------------------
class _Wrapper(nn.Module):
    """A parallel wrapper of some other library: the model lives in ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


@pytest.mark.parametrize("wrap", [nn.DataParallel, _Wrapper], ids=["DataParallel", "custom"])
def test_a_wrapped_student_is_refused_with_the_fix(wrap):
    terms = [Term("binary_kd", "cls_logits")]
    with pytest.raises(ValueError, match=rf"wrapped in {wrap.__name__}; pass the plain RetinaNet.*{WRAP_THE_DISTILLER}") as caught:
        Distiller(wrap(build_retinanet()), build_retinanet(fpn_width=64), terms)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=WRAP_THE_DISTILLER):
        Distiller.self_distillation(wrap(build_retinanet()), terms)


def test_a_student_inside_distributed_data_parallel_is_refused():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        student = nn.parallel.DistributedDataParallel(build_retinanet())
        with pytest.raises(ValueError, match=rf"wrapped in DistributedDataParallel.*{WRAP_THE_DISTILLER}"):
            Distiller(student, build_retinanet(fpn_width=64), [Term("cwd", "features")])
    finally:
        dist.destroy_process_group()


# --- state_dict: what resuming needs, without the frozen teachers -------------------------------
def _terms() -> list[Term]:
    # The weight follows the iteration (a restored count matters) and "hint" needs a connector
    # between the 32-channel student and the 64-channel teacher (restored connectors matter).
    ramp = {"kind": "linear", "start_value": 0.0, "end_value": 1.0, "start_iter": 0, "end_iter": 8}
    return [Term("binary_kd", "cls_logits", temperature=2.0, weight=ramp), Term("hint", "features", weight=0.5)]


def _external(student: nn.Module, teacher: nn.Module) -> Distiller:
    return Distiller(student, teacher, _terms(), warmup_iters=1, probe_size=64)


def _self_distilled(student: nn.Module, teacher: nn.Module) -> Distiller:
    return Distiller.self_distillation(student, _terms()[:1], mode="ema", ema_decay=0.5, warmup_iters=1, probe_size=64)


def _steps(distiller: Distiller, optimizer: torch.optim.Optimizer, count: int) -> None:
    distiller.train()
    images, targets = make_batch(num_images=1)
    for _ in range(count):
        losses = distiller(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def test_state_dict_leaves_external_teachers_out_and_keeps_a_self_distillation_teacher():
    distiller = _external(build_retinanet(), build_retinanet(fpn_width=64))
    keys = distiller.state_dict().keys()
    assert not [k for k in keys if k.startswith("teachers.")]
    assert "iteration" in keys and any(k.startswith("connectors.") and k.endswith("project.weight") for k in keys)
    assert {k[len("student."):] for k in keys if k.startswith("student.")} == set(distiller.student.state_dict())
    assert set(keys) == {k for k in nn.Module.state_dict(distiller) if not k.startswith("teachers.")}
    # under a wrapper (DDP, or any container) the wrapper's state_dict leaves them out as well
    wrapper = nn.ModuleDict({"module": distiller})
    assert {k for k in wrapper.state_dict()} == {f"module.{k}" for k in keys}
    assert not wrapper.load_state_dict(wrapper.state_dict(), strict=True).missing_keys

    ema = _self_distilled(build_retinanet(), None)
    _steps(ema, torch.optim.SGD(ema.trainable_parameters(), lr=0.1), 2)
    state = ema.state_dict()
    teacher = {k[len("teachers.0."):]: v for k, v in state.items() if k.startswith("teachers.0.")}
    assert teacher.keys() == ema.teachers[0].state_dict().keys() and int(state["iteration"]) == 2
    assert all(torch.equal(v, ema.teachers[0].state_dict()[k]) for k, v in teacher.items())
    assert not torch.equal(teacher["head.classification_head.cls_logits.weight"],
                           ema.student.head.classification_head.cls_logits.weight)  # fmt: skip


@pytest.mark.parametrize("build", [_external, _self_distilled], ids=["external_teacher", "ema_teacher"])
def test_save_load_into_a_fresh_distiller_then_continue_is_bitwise_the_uninterrupted_run(tmp_path, build):
    torch.manual_seed(0)
    student, teacher = build_retinanet(), build_retinanet(fpn_width=64)
    initial_student, teacher_weights = copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())

    def distiller_and_optimizer(student_weights):
        fresh_student, fresh_teacher = build_retinanet(), build_retinanet(fpn_width=64)  # new random weights
        fresh_student.load_state_dict(student_weights)
        fresh_teacher.load_state_dict(teacher_weights)  # the user's own teacher file
        distiller = build(fresh_student, fresh_teacher)
        return distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(1)
    uninterrupted, optimizer = distiller_and_optimizer(initial_student)
    _steps(uninterrupted, optimizer, 3)

    torch.manual_seed(1)
    first, optimizer = distiller_and_optimizer(initial_student)
    _steps(first, optimizer, 2)
    torch.save({"distiller": first.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "checkpoint.pth")
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert any(k.startswith("teachers.") for k in checkpoint["distiller"]) == (build is _self_distilled)

    torch.manual_seed(2)  # another initialisation: everything that matters must come from the file
    resumed, optimizer = distiller_and_optimizer(build_retinanet().state_dict())
    assert int(resumed.iteration) == 0
    resumed.load_state_dict(checkpoint["distiller"], strict=True)
    optimizer.load_state_dict(checkpoint["optimizer"])
    assert int(resumed.iteration) == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.connectors.parameters(), first.connectors.parameters()))
    _steps(resumed, optimizer, 1)

    expected, actual = nn.Module.state_dict(uninterrupted), nn.Module.state_dict(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_a_state_dict_that_still_holds_the_teachers_loads():
    distiller = _external(build_retinanet(), build_retinanet(fpn_width=64))
    full = nn.Module.state_dict(distiller)  # what checkpoints held before teachers were left out
    fresh = _external(build_retinanet(), build_retinanet(fpn_width=64))
    fresh.load_state_dict(full, strict=True)
    assert all(torch.equal(v, nn.Module.state_dict(fresh)[k]) for k, v in full.items())


# --- optimizer parameter groups ------------------------------------------------------------------
def test_parameter_groups_hold_every_trainable_parameter_once_and_no_teacher_parameter():
    student = build_fcos(fpn_width=32)  # FCOS heads use GroupNorm: a norm group to split off
    student.backbone.body.conv1.requires_grad_(False)  # frozen by the user: in no group
    distiller = Distiller(student, build_fcos(fpn_width=64), [Term("hint", "features")], probe_size=64)
    named = dict(distiller.named_trainable_parameters())
    assert named and all(name.startswith(("student.", "connectors.")) for name in named)
    assert any(name.startswith("connectors.") for name in named)
    assert set(named) == {n for n, p in distiller.named_parameters() if p.requires_grad}
    assert "student.backbone.body.conv1.weight" not in named
    assert [id(p) for p in distiller.trainable_parameters()] == [id(p) for p in named.values()]

    groups = distiller.parameter_groups(1e-4, norm_weight_decay=0.0, bias_weight_decay=0.5)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 0.5]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in named.values())  # each exactly once
    teacher = {id(p) for p in distiller.teachers.parameters()}
    assert teacher and not teacher & set(grouped)
    other, norm, bias = ({id(p) for p in g["params"]} for g in groups)
    norm_layers = [m for m in student.modules() if isinstance(m, nn.GroupNorm)]
    assert norm == {id(m.weight) for m in norm_layers}  # the norm layers' biases go to the bias group
    assert bias == {id(p) for n, p in named.items() if n.endswith(".bias")}
    torch.optim.SGD(groups, lr=0.01, momentum=0.9).step()

    # without norm/bias settings: one group, as torchvision's reference does by default
    (single,) = distiller.parameter_groups(1e-4)
    assert single["weight_decay"] == 1e-4 and len(single["params"]) == len(named)
    (others, norms) = weight_decay_groups([student], 1e-4, norm_weight_decay=0.0)
    assert {id(p) for p in norms["params"]} == {id(p) for m in norm_layers for p in m.parameters()}
