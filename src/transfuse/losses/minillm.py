"""MiniLLM: the policy gradient of the sequence-level reverse KL, for on-policy distillation.

Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024,
https://arxiv.org/abs/2306.08543. The arithmetic is
:func:`transfuse.functional.minillm.minillm_loss`; the samples come from the ``on_policy``
transform (:mod:`transfuse.on_policy`), whose ``teacher_mix`` option draws them from
MiniLLM's teacher-student mixture and writes the log-probabilities the importance weights
are made of.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..functional._types import Positive, Probability
from ..functional.minillm import minillm_loss
from .base import register_loss
from .module import DistillLoss

#: Batch entries the ``on_policy`` transform writes when ``teacher_mix > 0``: each sampled
#: token's log-probability under the sampling mixture and under the student, aligned with ``target``.
SAMPLE_LOGPROB = "sample_logprob"
STUDENT_LOGPROB = "student_logprob"


@register_loss(
    name="minillm",
    kind="logits",
    summary="MiniLLM: exact per-token reverse KL plus the policy gradient of the length-normalised sequence reward "
            "(importance-weighted under teacher-mixed sampling); use with the on_policy transform",
    paper="Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024, "
          "https://arxiv.org/abs/2306.08543",
    weight=1.0,
    ce_weight=0.0,
    needs=("target",),
)
class MiniLLM(DistillLoss):
    """MiniLLM's objective (:func:`~transfuse.functional.minillm.minillm_loss`) on the
    student's own samples.

    Options (defaults from the official code's training script): ``gamma`` (0.95, the discount of future
    rewards), ``length_norm`` (True: the return is divided by the number of tokens it sums),
    ``single_step`` (True: the exact per-token reverse KL is added), ``reward_from``
    (``"next"``: the paper's return from ``t + 1``; ``"current"``: the official code's, from
    ``t``), ``reward_clip`` (null = none, the default), ``whiten`` (True: advantages whitened over
    the batch's generated tokens), ``clip`` (0.2, PPO's clip of the importance-weighted ratio).

    Batch entries: ``target`` (needed: the sampled tokens), and -- where the ``on_policy``
    transform sampled from a teacher mixture (``teacher_mix > 0``) -- ``sample_logprob`` and
    ``student_logprob``, read through :attr:`optional_needs`; without them the importance
    weight is 1 (the student sampled alone).
    """

    needs = ("target",)
    optional_needs = (SAMPLE_LOGPROB, STUDENT_LOGPROB)

    def __init__(self, *, gamma: Probability = 0.95, length_norm: bool = True, single_step: bool = True,
                 reward_from: Literal["next", "current"] = "next", reward_clip: Positive | None = None,
                 whiten: bool = True, clip: Probability = 0.2) -> None:
        super().__init__()
        if reward_from not in ("next", "current"):
            raise ValueError(f"minillm: reward_from must be 'next' or 'current', got {reward_from!r}")
        self.gamma, self.length_norm, self.single_step = float(gamma), bool(length_norm), bool(single_step)
        self.reward_from, self.whiten, self.clip = reward_from, bool(whiten), float(clip)
        self.reward_clip = None if reward_clip is None else float(reward_clip)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        target: torch.Tensor,
        sample_logprob: torch.Tensor | None = None,
        student_logprob: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return minillm_loss(student, teacher, target, sample_logprob=sample_logprob, student_logprob=student_logprob,
                            gamma=self.gamma, length_norm=self.length_norm, single_step=self.single_step,
                            reward_from=self.reward_from, reward_clip=self.reward_clip, whiten=self.whiten,
                            clip=self.clip, mask=mask, weights=weights)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, length_norm={self.length_norm}, single_step={self.single_step}, "
                f"reward_from={self.reward_from!r}, reward_clip={self.reward_clip}, whiten={self.whiten}, "
                f"clip={self.clip}")


__all__ = ["MiniLLM", "SAMPLE_LOGPROB", "STUDENT_LOGPROB"]
