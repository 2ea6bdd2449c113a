"""KL+DP: a pretrained student learns from a teacher only where the teacher knows better.

Roth et al., Fantastic Gains and Where to Find Them: On the Existence and Prospect of
General Knowledge Transfer between Any Pretrained Model, ICLR 2024. Followed: the official
code (``ExplainableML/FantasticGains``, ``main_distillation.py``, loss ``xekl_dp`` with
strategy ``most-conf``, config ``config/distillation/kl_dp_dist.yaml``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from . import SCHEMES
from .base import Expansion, Scheme

PAPER = ("Roth et al., Fantastic Gains and Where to Find Them: On the Existence and Prospect of General Knowledge "
         "Transfer between Any Pretrained Model, ICLR 2024, https://arxiv.org/abs/2310.17653")
STUDENT, ORIGINAL, SOURCE = "student", "original", "partition"


class KLDPOptions(BaseModel):
    """``distill.options`` of ``kl_dp``."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="the KL's softening (official: kd_T = 1)")
    criterion: Literal["label", "confidence"] = Field(
        "label", description="label: the probability of the true class (official 'most-conf'); confidence: the top-1 "
        "probability, no labels read (official 'most-conf_u')")


def build(distill, participants, options: KLDPOptions) -> Expansion:
    """A source ``partition`` (``most_confident`` over ``[original, teacher, ...]``: per
    sample the logits of the member giving the label the highest probability at
    temperature 1, ties and unlabelled samples to ``original``) and the term ``kl_dp``
    (``kd`` from ``partition.logits`` at ``temperature``, ``weight``, default 1), plus
    ``ce`` only if ``ce_weight`` > 0 (default 0: the official ``alpha = 1``).

    ``student`` must be trainable and start from ``weights`` (a pretrained model);
    ``original`` must be a frozen participant of the same model, options and weights (the
    config adds it from the student's section when it is not given). Every other frozen
    participant is a teacher; with several, each sample goes to the most confident of all
    (the official multi-teacher ``Multi_DP``).
    """
    from ..config import EnsembleConfig, TermConfig

    student = participants.get(STUDENT)
    if student is None or not student.trainable:
        raise ValueError("method 'kl_dp' transfers knowledge into a pretrained participant 'student' with trainable: true; "
                         "there is none")
    if not student.weights:
        raise ValueError("method 'kl_dp' transfers knowledge into a PRETRAINED student: give participants.student.weights "
                         "(a safetensors file, e.g. the student.safetensors of an earlier run)")
    original = participants.get(ORIGINAL)
    if original is None or original.trainable:
        raise ValueError("method 'kl_dp' needs participant 'original', a frozen (trainable: false) copy of the student; "
                         "leave it out and it is added from the student's section")
    differs = [f for f in ("name", "options", "weights") if getattr(original, f) != getattr(student, f)]
    if differs:
        raise ValueError(f"method 'kl_dp': participant 'original' must be the student's frozen copy, but its "
                         f"{', '.join(differs)} differ(s) from participants.student's; leave 'original' out to have it "
                         "copied from the student")
    teachers = [n for n, p in participants.items() if not p.trainable and n != ORIGINAL]
    if not teachers:
        raise ValueError("method 'kl_dp' needs a teacher: a frozen participant (trainable: false) other than 'original'")
    if SOURCE in participants:
        raise ValueError(f"method 'kl_dp' adds a source named {SOURCE!r}; rename the participant of that name")
    # Temperature 1 for the partition, as the official code compares plain softmax outputs.
    partition = EnsembleConfig(members=[ORIGINAL, *teachers], combine="most_confident", criterion=options.criterion,
                               temperature=1.0)
    ce_weight = 0.0 if distill.ce_weight is None else distill.ce_weight
    terms = []
    if ce_weight > 0:
        terms.append(TermConfig(loss="ce", weight=ce_weight))
    terms.append(TermConfig(loss="kd", name="kl_dp", weight=1.0 if distill.weight is None else distill.weight,
                            input=f"{STUDENT}.logits", target=f"{SOURCE}.logits",
                            options={"temperature": options.temperature}))
    return terms, {SOURCE: partition}


SCHEMES.register("kl_dp", summary="a pretrained student learns from the teacher where it is more confident in the label, "
                 "else from its own frozen original", kind="scheme", paper=PAPER)(Scheme("kl_dp", KLDPOptions, build, PAPER))
