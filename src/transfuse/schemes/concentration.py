"""Knowledge Concentration: specialist teachers, one per class group, distilled into one student.

Gao, Guo, Li, Nevatia, Knowledge Concentration: Learning 100K Object Classifiers in a
Single CNN, 2017, https://arxiv.org/abs/1711.07607 (no official code). Every frozen
participant with ``train.classes`` is the specialist of that vertical (class group); a
``by_class_group`` source answers each sample with its vertical's specialist, and the
``concentration`` loss (top-K soft targets, sigmoid cross-entropy, a learnable scale per
vertical) trains the student on it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..losses.concentration import PAPER
from . import SCHEMES
from .base import Expansion, Scheme

STUDENT, SOURCE, TERM = "student", "specialists", "concentration"


class ConcentrationOptions(BaseModel):
    """``distill.options`` of ``knowledge_concentration``."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(100, ge=1, description="keep each specialist's K most probable classes, 0 elsewhere (paper: 100)")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False,
                               description="the specialists' logits are divided by it before their activation (paper: 1)")
    teacher_activation: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="how a specialist's logits become probabilities: sigmoid for specialists trained with "
        "sigmoid cross-entropy (the paper's), softmax for those trained with softmax cross-entropy (transfuse trains "
        "frozen participants so)")
    self_paced: bool = Field(True, description="L2-normalise the student's logits and scale them by a learnable gamma "
                             "per vertical (the paper's self-paced learning)")
    gamma_init: float | None = Field(None, gt=0, allow_inf_nan=False,
                                     description="each gamma's start; default sqrt(N_v), N_v the vertical's classes "
                                     "(the paper's best initialisation)")


def build(distill, participants, options: ConcentrationOptions) -> Expansion:
    """A source ``specialists`` (``by_class_group`` over every frozen participant, in
    config order: per sample, the logits of the specialist whose ``train.classes`` hold
    its label) and the term ``concentration`` (``student.logits`` against
    ``specialists.logits``, weight ``distill.weight``, default 1, with the specialists'
    classes as its ``groups``), plus ``ce`` only if ``ce_weight`` > 0 (default 0: the
    paper's student learns from the specialists' soft targets).

    Every frozen participant must be a specialist (``train.classes`` given), and no class
    may belong to two. That the groups cover every class of the data is checked when the
    term is built (the number of classes is known there).
    """
    from ..config import EnsembleConfig, TermConfig

    student = participants.get(STUDENT)
    if student is None or not student.trainable:
        raise ValueError("method 'knowledge_concentration' trains a participant 'student' with trainable: true; "
                         "there is none")
    specialists = [n for n, p in participants.items() if not p.trainable]
    if not specialists:
        raise ValueError("method 'knowledge_concentration' needs specialists: frozen participants (trainable: false), "
                         "each with train.classes, the classes of its vertical")
    lacking = [n for n in specialists if participants[n].train.classes is None]
    if lacking:
        raise ValueError(
            f"method 'knowledge_concentration': every frozen participant is a specialist of one class group, but "
            f"{', '.join(f'participants.{n}.train.classes' for n in lacking)} "
            f"{'is' if len(lacking) == 1 else 'are'} not given; list the classes of its vertical there "
            "(e.g. train: {classes: [0, 2, 4, 6]})"
        )
    owner: dict[int, str] = {}
    for name in specialists:
        for cls in participants[name].train.classes:
            if cls in owner:
                raise ValueError(f"method 'knowledge_concentration': class {cls} is in the train.classes of both "
                                 f"{owner[cls]!r} and {name!r}; each class belongs to one specialist's vertical")
            owner[cls] = name
    if SOURCE in participants:
        raise ValueError(f"method 'knowledge_concentration' adds a source named {SOURCE!r}; rename the participant of "
                         "that name")
    groups = [list(participants[n].train.classes) for n in specialists]  # group v = member v of the source
    routing = EnsembleConfig(members=specialists, combine="by_class_group")
    ce_weight = 0.0 if distill.ce_weight is None else distill.ce_weight
    terms = []
    if ce_weight > 0:
        terms.append(TermConfig(loss="ce", weight=ce_weight))
    terms.append(TermConfig(
        loss="concentration", name=TERM, weight=1.0 if distill.weight is None else distill.weight,
        input=f"{STUDENT}.logits", target=f"{SOURCE}.logits",
        options={"groups": groups, **options.model_dump()},
    ))
    return terms, {SOURCE: routing}


SCHEMES.register(
    "knowledge_concentration",
    summary="specialists of class groups teach one student: each sample learns the top-K sigmoid targets of its "
            "group's specialist, with a learnable scale per group",
    kind="scheme", paper=PAPER,
)(Scheme("knowledge_concentration", ConcentrationOptions, build, PAPER))
