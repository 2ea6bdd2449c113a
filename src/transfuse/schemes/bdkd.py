"""BD-KD: online distillation where the student balances forward and reverse KL per sample."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..losses import online as _online  # noqa: F401  (registers the `balanced_kl` loss)
from . import SCHEMES
from .base import Expansion, Scheme

PAPER = ("Amara et al., BD-KD: Balancing the Divergences for Online Knowledge Distillation, 2022, "
         "https://arxiv.org/abs/2212.12965")
STUDENT, TEACHER = "student", "teacher"


class BDKDOptions(BaseModel):
    """``distill.options`` of ``bdkd``."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="softening of both sides, in every KL")
    sharpness: float = Field(10.0, gt=0, allow_inf_nan=False,
                             description="per nat of entropy gap: how fast the student's weight switches between "
                             "forward and reverse KL")
    teacher_weight: float = Field(1.0, ge=0, allow_inf_nan=False,
                                  description="weight of the teacher's reverse-KL regulariser KL(q || p)")


def build(distill, participants, options: BDKDOptions) -> Expansion:
    """Both ``student`` and ``teacher`` are trainable and updated from one forward pass.

    * student: ``ce_weight * CE(q, y) + weight * [w KL(p || q) + (1 - w) KL(q || p)]``
      (the ``balanced_kl`` loss; ``w`` from the entropy gap, see :func:`transfuse.functional.online.bdkd_weights`);
    * teacher: ``ce_weight * CE(p, y) + teacher_weight * KL(q || p)`` (``kd`` with input the
      teacher's logits and target the student's: the reverse KL as a regulariser).

    Each KL's target is detached, so each term trains only its input side. Defaults:
    ``ce_weight`` 1, ``weight`` 1, ``teacher_weight`` 1, ``temperature`` 1, ``sharpness`` 10
    (weights and temperature ours, as deep mutual learning's; the balance is a
    reconstruction of the paper's section 3).
    """
    from ..config import TermConfig

    problems = [name for name in (STUDENT, TEACHER) if name not in participants or not participants[name].trainable]
    if problems:
        have = ", ".join(f"{n} ({'trainable' if p.trainable else 'frozen'})" for n, p in participants.items())
        raise ValueError(
            f"method 'bdkd' trains a student and a teacher together (online KD): participants 'student' and 'teacher' "
            f"must both exist with trainable: true; not so for {problems} (participants: {have})"
        )
    ce_weight = 1.0 if distill.ce_weight is None else distill.ce_weight
    weight = 1.0 if distill.weight is None else distill.weight
    terms = []
    if ce_weight > 0:
        terms.append(TermConfig(loss="ce", name="ce_student", weight=ce_weight, input=f"{STUDENT}.logits"))
    terms.append(TermConfig(loss="balanced_kl", name="balanced_kl", weight=weight, input=f"{STUDENT}.logits",
                            target=f"{TEACHER}.logits",
                            options={"temperature": options.temperature, "sharpness": options.sharpness}))
    if ce_weight > 0:
        terms.append(TermConfig(loss="ce", name="ce_teacher", weight=ce_weight, input=f"{TEACHER}.logits"))
    if options.teacher_weight > 0:
        terms.append(TermConfig(loss="kd", name="teacher_reverse_kl", weight=options.teacher_weight,
                                input=f"{TEACHER}.logits", target=f"{STUDENT}.logits",
                                options={"temperature": options.temperature}))
    return terms, {}


SCHEMES.register("bdkd", summary="online KD: student and teacher train together; the student balances forward and "
                 "reverse KL per sample by their entropy gap", kind="scheme",
                 paper=PAPER)(Scheme("bdkd", BDKDOptions, build, PAPER))
