"""Multi-teacher KD: the student learns from the mean of several teachers' softened predictions."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from . import SCHEMES
from .base import Expansion, Scheme

PAPER = "You et al., Learning from Multiple Teacher Networks, KDD 2017, https://doi.org/10.1145/3097983.3098135"
ENSEMBLE = "teachers"


class MultiTeacherOptions(BaseModel):
    """``distill.options`` of ``multi_teacher``."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(4.0, gt=0, allow_inf_nan=False)
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(
        None, description="one weight per frozen participant, in config order (default: equal)"
    )


def build(distill, participants, options: MultiTeacherOptions) -> Expansion:
    """Every frozen participant is a teacher. A source ``teachers`` averages their
    probabilities at temperature ``T`` (weighted by ``weights``); the student gets
    ``ce_weight * CE`` (default 0.1) and ``weight * T^2 KL(mean_i p_i^T || q^T)`` (default 0.9),
    the KD defaults."""
    from ..config import EnsembleConfig, TermConfig

    teachers = [name for name, p in participants.items() if not p.trainable]
    if not teachers:
        raise ValueError("method 'multi_teacher' needs frozen participants (trainable: false) to learn from; none is given")
    if options.weights is not None and (len(options.weights) != len(teachers) or sum(options.weights) <= 0):
        raise ValueError(
            f"options.weights: expected {len(teachers)} non-negative numbers with a positive sum, one per teacher "
            f"({', '.join(teachers)}); got {options.weights}"
        )
    if ENSEMBLE in participants:
        raise ValueError(f"method 'multi_teacher' adds a source named {ENSEMBLE!r}; rename the participant of that name")
    ensemble = EnsembleConfig(members=teachers, combine="mean_probs", temperature=options.temperature, weights=options.weights)
    ce_weight = 0.1 if distill.ce_weight is None else distill.ce_weight
    terms = []
    if ce_weight > 0:
        terms.append(TermConfig(loss="ce", weight=ce_weight))
    terms.append(TermConfig(loss="kd", name="multi_teacher", weight=0.9 if distill.weight is None else distill.weight,
                            input="student.logits", target=f"{ENSEMBLE}.logits", options={"temperature": options.temperature}))
    return terms, {ENSEMBLE: ensemble}


SCHEMES.register("multi_teacher", summary="the student learns from the mean of several teachers' softened predictions",
                 kind="scheme", paper=PAPER)(Scheme("multi_teacher", MultiTeacherOptions, build, PAPER))
