"""The Distiller: a student, a teacher and weighted loss terms, composed into one loss.

``Distiller(student, teacher, terms)(batch, step)`` runs the student (with its feature
taps), runs the teacher once if any term needs it, evaluates every :class:`Term` and
returns ``{"loss": scalar, "parts": {term name: unweighted value}, "weights": {...},
"student_logits": (B, C)}``. It is an ``nn.Module`` whose parameters are the student's
plus the learnable parts of the losses (regressors, embeddings); the teacher is held
outside the module tree, so it is never optimised and never checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .losses.base import DistillLoss
from .schedules import Constant, Schedule
from .taps import FeatureTaps
from .teacher import Teacher, TeacherLike, logits_of, model_input

LOGITS = "logits"


class DistillShapeError(ValueError):
    """Student and teacher outputs that a term cannot compare."""


class MissingBatchKeyError(KeyError):
    """A loss needs a batch entry (``target``, ``index``) the batch does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class Term:
    """One weighted loss between a student output and a teacher output.

    ``student_key``/``teacher_key`` are ``"logits"`` or a module path tapped on that model.
    The term's contribution at step ``s`` is ``weight * schedule.factor(s) * loss(...)``.
    """

    name: str
    loss: DistillLoss
    weight: float = 1.0
    student_key: str = LOGITS
    teacher_key: str = LOGITS
    schedule: Schedule = field(default_factory=Constant)


class Distiller(nn.Module):
    """Composes student, teacher and terms; ``forward(batch, step)`` returns the loss and its parts."""

    def __init__(self, student: nn.Module, teacher: TeacherLike | None, terms: Sequence[Term]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a Distiller needs at least one term")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"term names must be unique, got {names}")
        self.student = student
        self.losses = nn.ModuleDict({t.name: t.loss for t in terms})
        self.terms = list(terms)
        self.uses_teacher = any(t.loss.uses_teacher for t in terms)
        if self.uses_teacher and teacher is None:
            users = [t.name for t in terms if t.loss.uses_teacher]
            raise ValueError(f"terms {users} compare with a teacher, but no teacher was given")
        # Kept out of the module tree on purpose: not in parameters(), not in state_dict().
        object.__setattr__(self, "teacher", teacher if self.uses_teacher else None)
        self.student_taps = FeatureTaps(
            student, [t.student_key for t in terms if t.student_key != LOGITS], role="student"
        )
        teacher_paths = [t.teacher_key for t in terms if t.loss.uses_teacher and t.teacher_key != LOGITS]
        if teacher_paths:
            if not isinstance(teacher, Teacher):
                raise TypeError(f"terms tap teacher features {teacher_paths}, which needs a transfuse.Teacher")
            teacher.add_taps(teacher_paths)  # FeatureTaps drops duplicate paths

    def student_outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's logits and tapped features for ``batch``."""
        with self.student_taps:
            logits = logits_of(self.student(model_input(batch)))
        return {LOGITS: logits, **self.student_taps.collect()}

    def forward(self, batch: dict[str, torch.Tensor], step: int = 0) -> dict[str, object]:
        student_out = self.student_outputs(batch)
        teacher_out = self.teacher.predict(batch) if self.teacher is not None else {}
        total: torch.Tensor | float = 0.0
        parts: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for term in self.terms:
            s = student_out[term.student_key]
            t = teacher_out[term.teacher_key] if term.loss.uses_teacher else None
            if t is not None:
                _check_pair(term, s, t)
            value = term.loss(s, t, **_needs(term, batch))
            weight = term.weight * term.schedule.factor(step)
            parts[term.name] = value.detach()
            weights[term.name] = weight
            total = total + weight * value
        return {"loss": total, "parts": parts, "weights": weights, "student_logits": student_out[LOGITS]}


def _needs(term: Term, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [k for k in term.loss.needs if k not in batch]
    if missing:
        raise MissingBatchKeyError(
            f"term {term.name!r} needs batch entries {missing}, but the batch has only {sorted(batch)}. "
            "Datasets built by transfuse.data provide 'input', 'target' and 'index'; a custom dataset "
            "must return them too."
        )
    return {k: batch[k] for k in term.loss.needs}


def _check_pair(term: Term, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise DistillShapeError(
            f"term {term.name!r}: the student's {term.student_key} has batch size {student.shape[0]} but the "
            f"teacher's {term.teacher_key} has {teacher.shape[0]}; both models must see the same batch."
        )
    if term.student_key == LOGITS and term.teacher_key == LOGITS and student.shape != teacher.shape:
        s_classes, t_classes = student.shape[-1], teacher.shape[-1]
        what = (
            f"the student predicts {s_classes} classes and the teacher {t_classes}"
            if s_classes != t_classes
            else "their non-class dimensions differ"
        )
        raise DistillShapeError(
            f"term {term.name!r} compares student logits of shape {tuple(student.shape)} with teacher logits "
            f"of shape {tuple(teacher.shape)}: {what}. Logit losses need both models to share one label "
            "space; build the student with the teacher's num_classes, or distil features instead."
        )


@torch.no_grad()
def probe_shapes(model: nn.Module, paths: Sequence[str], batch: dict[str, torch.Tensor], *, role: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (batch dim dropped) of ``model``'s logits and of the tapped ``paths``.

    Used once while a run is assembled, so losses with learnable parts can be sized
    before the optimizer exists. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    taps = FeatureTaps(model, paths, role=role)
    try:
        with taps:
            logits = logits_of(model(model_input(batch)))
        out = {LOGITS: logits, **taps.collect()}
    finally:
        model.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in out.items()}
