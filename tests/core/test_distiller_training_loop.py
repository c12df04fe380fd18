"""The Distiller inside someone else's training loop: wrapped students are refused, the
state_dict carries what resuming needs, and the optimizer's parameter groups."""
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from densekd import Distiller, Term
from tiny_detectors import build_retinanet

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
