"""A detection Distiller survives deepcopy and pickling (``Distiller.__new__`` dispatches
segmentation students elsewhere and must stay a plain allocation here)."""
import copy
import pickle

import torch

from densekd import Distiller, Term
from tiny_detectors import build_retinanet, make_batch


def test_detection_distiller_deepcopies_and_pickles():
    distiller = Distiller(build_retinanet(), build_retinanet(fpn_width=64), [Term("binary_kd", "cls_logits"), Term("cwd", "features")])
    distiller.train()(*make_batch())
    for clone in (copy.deepcopy(distiller), pickle.loads(pickle.dumps(distiller))):
        assert type(clone) is Distiller and int(clone.iteration) == 1
        assert clone.state_dict().keys() == distiller.state_dict().keys()
        assert all(torch.isfinite(v) for v in clone(*make_batch()).values())
