"""What every distiller shares, whatever the model family: frozen teachers and their weights,
term checks against what each model produces, feature-level pairing and connectors, the
iteration counter, warm-up, weighted term losses, self-distillation (EMA or snapshot), the
state_dict that resumes training and the optimizer's parameter groups.

:class:`~densekd.detection.distiller.Distiller` (detection) and
:class:`~densekd.segmentation.distiller.SegmentationDistiller` add their family's adapters,
checks and forward pass.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .connectors import FeatureConnector
from .feature_pairs import connector_key
from .parameter_groups import NORM_CLASSES, weight_decay_groups
from .precision import teacher_autocast
from .terms import Term

SELF_DISTILLATION_MODES = ("ema", "snapshot")


def check_plain_student(student: nn.Module) -> None:
    """Refuse a student inside a parallel wrapper: DistributedDataParallel, DataParallel or any
    module that holds the model as ``.module``. The distiller must be the outermost module under
    the wrapper, so that the connectors train with the student and the frozen teachers stay out
    of gradient synchronisation."""
    inner = getattr(student, "module", None)
    if isinstance(inner, nn.Module):
        raise ValueError(
            f"The student is wrapped in {type(student).__name__}; pass the plain {type(inner).__name__} as the "
            "student and wrap the distiller instead, e.g. model = DistributedDataParallel(distiller) "
            "(a wrapper around the student alone leaves the connectors unsynchronised across processes)."
        )


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class DistillerBase(nn.Module):
    """Frozen teacher(s), a trainable student and terms; subclasses set ``student_adapter`` and
    ``teacher_adapters`` (objects with ``model``, ``provides``, ``num_classes``, ``label_counts``,
    ``missing_output_hint`` and ``features_of``) and implement ``forward``.

    Args:
        student: the model to train.
        teachers: one teacher or a list; frozen here (eval mode, no gradients).
        terms: the distillation terms.
        teacher_weights: per-teacher weights (default: equal), normalized to sum 1.
        warmup_iters: training iterations without distillation (the kd terms are 0).
    """

    #: outputs compared class by class: teacher and student must share the label space
    class_indexed_outputs: frozenset[str] = frozenset()

    def __init__(
        self,
        student: nn.Module,
        teachers: Union[nn.Module, Sequence[nn.Module]],
        terms: Sequence[Term],
        teacher_weights: Optional[Sequence[float]] = None,
        warmup_iters: int = 0,
    ):
        super().__init__()
        check_plain_student(student)
        teachers = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
        if not teachers:
            name = type(self).__name__
            raise ValueError(f"A {name} needs at least one teacher (or use {name}.self_distillation).")
        self.student = student
        self.teachers = nn.ModuleList(_frozen(t) for t in teachers)
        self.teacher_weights = self._normalized_weights(teacher_weights, len(teachers))
        self.warmup_iters = int(warmup_iters)
        self.terms = list(terms)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        # Per term: [sum of the student's own loss, sum of the unscaled term, steps summed] over
        # the steps that set a balanced term's scale (Term.balance); float64 so long sums stay exact.
        self.register_buffer("term_balance", torch.zeros(len(self.terms), 3, dtype=torch.float64))
        self.self_distillation_mode: Optional[str] = None
        self.ema_decay: Optional[float] = None
        self.last_terms: dict[str, dict[str, Tensor]] = {}

    # --- construction ----------------------------------------------------------------
    @classmethod
    def self_distillation(
        cls,
        student: nn.Module,
        terms: Sequence[Term],
        mode: str = "ema",
        ema_decay: float = 0.999,
        warmup_iters: int = 0,
        **kwargs,
    ):
        """Distill the student into itself: the teacher is an exponential moving average of
        the student (``mode="ema"``, updated before every training forward) or a frozen
        snapshot taken when the warm-up ends (``mode="snapshot"``).

        The EMA teacher equals the student until the warm-up ends (nothing is distilled then,
        and an average that starts at the random initial weights would keep a share of them,
        0.99^90 = 40 % after 90 steps, when the distillation begins). From then on its decay
        ramps up to ``ema_decay`` as ``min(ema_decay, (1 + n) / (10 + n))`` after ``n``
        distilled steps (tf.train.ExponentialMovingAverage's ``num_updates``, as in Mean
        Teacher, Tarvainen & Valpola 2017), so it averages only the students that followed."""
        if mode not in SELF_DISTILLATION_MODES:
            raise ValueError(f"Self-distillation mode must be one of {SELF_DISTILLATION_MODES}, got {mode!r}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}.")
        check_plain_student(student)  # before the copy that becomes the teacher
        distiller = cls(student, copy.deepcopy(student), terms, warmup_iters=warmup_iters, **kwargs)
        distiller.self_distillation_mode = mode
        distiller.ema_decay = ema_decay
        return distiller

    @staticmethod
    def _normalized_weights(weights: Optional[Sequence[float]], count: int) -> list[float]:
        if weights is None:
            return [1.0 / count] * count
        if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"teacher_weights must be {count} non-negative numbers with a positive sum, got {weights}.")
        return [float(w) / sum(weights) for w in weights]

    def _check_terms(self) -> None:
        """Unique names; every model produces each term's output; class-indexed outputs share
        the label space; class weights have one entry per label. ``_check_family_term`` adds
        the family's own rules."""
        names = [t.name for t in self.terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Term names must be unique; repeated: {duplicates}. Give each term a distinct name=.")
        num_classes = self.student_adapter.num_classes
        for term in self.terms:
            for role, adapter in [("student", self.student_adapter)] + [
                (f"teacher {i}", a) for i, a in enumerate(self.teacher_adapters)
            ]:
                if term.on not in adapter.provides:
                    hint = adapter.missing_output_hint(term.on)
                    raise ValueError(
                        f"Term {term.name!r} distills {term.on!r}, which the {role} "
                        f"({type(adapter.model).__name__}) does not produce; it produces: "
                        f"{', '.join(sorted(adapter.provides))}.{hint}{self._pairing_hint()}"
                    )
                if term.on in self.class_indexed_outputs and adapter.num_classes != num_classes:
                    raise ValueError(
                        f"Term {term.name!r} compares {term.on!r} class by class, but the {role} predicts "
                        f"{adapter.num_classes} classes and the student {num_classes}. Build both with the same "
                        f"num_classes and category order, or distill features only.{self._pairing_hint()}"
                    )
            self._check_family_term(term)
            for field_name in ("class_weights", "raise_only_classes"):
                per_class = getattr(term, field_name)
                if per_class is not None and per_class.numel() not in self.student_adapter.label_counts:
                    raise ValueError(
                        f"Term {term.name!r}: {field_name} has {per_class.numel()} entries; "
                        f"{self._class_weights_layout()}."
                    )

    def _check_family_term(self, term: Term) -> None:
        """Family-specific rules for one term (raise ValueError)."""

    def _pairing_hint(self) -> str:
        """Appended to the error that refuses a term: the terms that do pair these models ('' here)."""
        return ""

    def _class_weights_layout(self) -> str:
        """The label convention of the student's class weights, for the error of a wrong count."""
        return self.student_adapter.class_weights_convention()

    @torch.no_grad()
    def _probe(self, adapter: Any, size: int) -> dict[str, tuple[int, int, int]]:
        """Level name -> (C, H, W) of the backbone's features on a blank image."""
        model = adapter.model
        was_training = model.training
        model.eval()  # keep BatchNorm statistics untouched
        device = next(model.parameters()).device
        with teacher_autocast(model, device):  # a bfloat16/float16 teacher probes in its precision
            features = adapter.features_of(torch.zeros(1, 3, size, size, device=device))
        model.train(was_training)
        return {name: tuple(f.shape[1:]) for name, f in features.items()}

    def _level_role(self, level: str) -> str:
        """The name under which a level pairs with a teacher's level (its own name by default)."""
        return level

    def _level_pairing_hint(self) -> str:
        return ""

    def _pair_levels(self, term: Term, student_shapes: dict, teacher_shapes: dict) -> list[tuple[str, str]]:
        """(student level, teacher level) pairs of a feature term: by name (``_level_role``),
        else by position when both models have as many levels."""
        student_levels, teacher_levels = list(student_shapes), list(teacher_shapes)
        teacher_by_role = {self._level_role(level): level for level in teacher_levels}
        chosen = term.levels if term.levels is not None else student_levels
        unknown = [level for level in chosen if level not in student_levels]
        if unknown:
            raise ValueError(f"Term {term.name!r}: unknown levels {unknown}; the student's levels are {student_levels}.")
        pairs = []
        for level in chosen:
            if self._level_role(level) in teacher_by_role:
                pairs.append((level, teacher_by_role[self._level_role(level)]))
            elif len(student_levels) == len(teacher_levels):
                pairs.append((level, teacher_levels[student_levels.index(level)]))
            else:
                raise ValueError(
                    f"Term {term.name!r}: cannot pair student level {level!r}; student levels {student_levels}, "
                    f"teacher levels {teacher_levels}. Choose levels= present in both.{self._level_pairing_hint()}"
                )
        return pairs

    def _build_feature_pairs(self, student_shapes: dict, teacher_shapes: list[dict]) -> None:
        """``level_pairs`` (term name -> per teacher, level pairs) and ``connectors`` of the
        feature terms: a 1x1 convolution where a channel-matched loss meets a channel mismatch."""
        self.level_pairs = {
            term.name: [self._pair_levels(term, student_shapes, shapes) for shapes in teacher_shapes]
            for term in self.terms
            if term.on == "features"
        }
        connectors = nn.ModuleDict()
        for term in self.terms:
            if term.on != "features":
                continue
            for index, shapes in enumerate(teacher_shapes):
                for student_level, teacher_level in self.level_pairs[term.name][index]:
                    student_channels, teacher_channels = student_shapes[student_level][0], shapes[teacher_level][0]
                    target = teacher_channels if term.needs_matching_channels else None
                    connectors[connector_key(term, index, student_level)] = FeatureConnector(student_channels, target)
        device = next(self.student.parameters()).device
        self.connectors = connectors.to(device)

    # --- checkpoints ------------------------------------------------------------------------
    @property
    def teachers_are_state(self) -> bool:
        """True for self-distillation, whose EMA or snapshot teacher is trained state; False for
        external teachers, which stay frozen and are the user's own."""
        return self.self_distillation_mode is not None

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """What resuming needs: ``student.*``, ``connectors.*``, ``iteration`` (the steps taken;
        it drives schedules and warm-up) and, for self-distillation, ``teachers.0.*`` (the EMA or
        snapshot teacher). Frozen external teachers are left out: the user already has them and
        passes them again to the distiller that loads this state.

        Save it as a plain ``torch.save(distiller.state_dict(), path)``; under a wrapper
        (``DistributedDataParallel(distiller)``) the wrapper's state_dict leaves them out too."""
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self.teachers_are_state:
            teacher_prefix = prefix + "teachers."
            for key in [k for k in state if k.startswith(teacher_prefix)]:
                del state[key]
            metadata = getattr(state, "_metadata", {})
            for key in [k for k in metadata if k == teacher_prefix[:-1] or k.startswith(teacher_prefix)]:
                del metadata[key]
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Loading (``load_state_dict``, also through a wrapper) takes a state without external
        teachers' entries: the teachers this distiller holds keep their weights. A state that
        has them (checkpoints written while the state_dict still held every teacher) loads them too."""
        if not self.teachers_are_state:
            for key, value in self.teachers.state_dict(prefix=prefix + "teachers.").items():
                state_dict.setdefault(key, value)  # each teacher tensor onto itself: unchanged
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # --- training-time behaviour --------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()  # BatchNorm and dropout of a teacher never switch to training
        return self

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every student and connector parameter with ``requires_grad``,
        named as in the distiller's state_dict (``student.…``, ``connectors.…``); never a
        teacher's (a self-distillation teacher follows the student by EMA or snapshot)."""
        for prefix, module in (("student", self.student), ("connectors", self.connectors)):
            for name, parameter in module.named_parameters(prefix=prefix):
                if parameter.requires_grad:
                    yield name, parameter

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and connector parameters: what an optimizer should update."""
        return [parameter for _, parameter in self.named_trainable_parameters()]

    def parameter_groups(
        self,
        weight_decay: float,
        norm_weight_decay: Optional[float] = None,
        bias_weight_decay: Optional[float] = None,
        norm_classes: tuple[type, ...] = NORM_CLASSES,
    ) -> list[dict[str, Any]]:
        """The trainable parameters (student and connectors) in optimizer groups by weight decay,
        as torchvision's reference scripts split them: normalization layers get
        ``norm_weight_decay`` and parameters named ``bias`` ``bias_weight_decay`` where given
        (see :func:`densekd.core.parameter_groups.weight_decay_groups`)::

            optimizer = torch.optim.SGD(distiller.parameter_groups(1e-4, norm_weight_decay=0.0), lr=0.02, momentum=0.9)
        """
        return weight_decay_groups(
            [self.student, self.connectors], weight_decay, norm_weight_decay, bias_weight_decay, norm_classes
        )

    def _next_iteration(self) -> int:
        """This step's iteration (counted from 0); advances the counter."""
        iteration = int(self.iteration)
        self.iteration += 1
        return iteration

    def _distills_at(self, iteration: int) -> bool:
        return bool(self.terms) and iteration >= self.warmup_iters

    def _with_zero_terms(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """The losses plus a zero ``kd_<term>`` per term (warm-up): the keys never change."""
        zero = next(iter(losses.values())).new_zeros(())
        return {**losses, **{term.key: zero for term in self.terms}}

    def _add_terms(
        self,
        losses: dict[str, Tensor],
        context: Any,
        term_loss: Callable[[Term, Any], Tensor],
        iteration: int,
    ) -> dict[str, Tensor]:
        """One weighted ``kd_<term>`` per term (``losses`` holds the student's own losses); unscaled
        values and the weights applied go to ``last_terms``."""
        self.last_terms = {}
        student_loss = sum(loss.detach() for loss in losses.values())
        for index, term in enumerate(self.terms):
            unscaled = term_loss(term, context)
            weight = float(term.weight_at(iteration)) * self._balance_scale(index, term, student_loss, unscaled)
            losses[term.key] = weight * unscaled
            self.last_terms[term.key] = {"unscaled": unscaled.detach(), "weight": torch.tensor(weight)}
        return losses

    def _balance_scale(self, index: int, term: Term, student_loss: Tensor, unscaled: Tensor) -> float:
        """1 for a plain term; for a balanced one ``balance * mean(student loss) / mean(term)``
        over its first ``balance_iters`` training steps (updated during them, frozen after)."""
        if term.balance is None:
            return 1.0
        stats = self.term_balance[index]  # (3,): student-loss sum, term sum, steps
        step = torch.stack([student_loss.double(), unscaled.detach().double(), torch.ones_like(stats[2])])
        if self.training and stats[2] < term.balance_iters and bool(torch.isfinite(step).all()):
            stats += step.to(stats.device)
        if stats[2] == 0 or stats[1] <= 0:  # nothing measured yet (eval before training), or a zero term
            return term.balance
        return term.balance * float(stats[0] / stats[1])

    @torch.no_grad()
    def _update_self_teacher(self) -> None:
        if self.self_distillation_mode is None:
            return
        teacher = self.teachers[0]
        if self.self_distillation_mode == "snapshot":
            if int(self.iteration) == self.warmup_iters:
                teacher.load_state_dict(self.student.state_dict())
            return
        distilled_steps = int(self.iteration) - self.warmup_iters  # negative during the warm-up
        decay = 0.0 if distilled_steps < 0 else min(self.ema_decay, (1 + distilled_steps) / (10 + distilled_steps))
        for teacher_param, student_param in zip(teacher.parameters(), self.student.parameters()):
            teacher_param.lerp_(student_param.detach(), 1.0 - decay)
        for teacher_buffer, student_buffer in zip(teacher.buffers(), self.student.buffers()):
            teacher_buffer.copy_(student_buffer)
