"""MIX-KD: KD and a mixed-label CE on standard-deviation-scaled logits, trained on partially mixed inputs.

Written after the paper (Choi et al., Understanding the Role of Mixup in Knowledge
Distillation: An Empirical Study, WACV 2023, https://arxiv.org/abs/2211.03946) and the
authors' ``distiller_zoo/MIXSTD.py``, ``helper/loops_mixstd.py`` and
``train_student_MIXSTD.py`` (hchoi71/MIX-KD). The arithmetic is
:func:`transfuse.functional.mixkd.mixkd`; the inputs are mixed by the batch transform
``partial_mixup`` (:mod:`transfuse.transforms`).
"""

from __future__ import annotations

import torch

from ..functional._types import NonNegative
from ..functional.mixkd import mixkd
from .base import register_loss
from .module import DistillLoss


@register_loss(
    name="mixkd",
    kind="logits",
    summary="KD and mixed-label CE on logits divided by their per-sample std (use with the partial_mixup transform)",
    paper=(
        "Choi et al., Understanding the Role of Mixup in Knowledge Distillation: An Empirical Study, WACV 2023, "
        "https://arxiv.org/abs/2211.03946"
    ),
    weight=1.0,
    ce_weight=0.0,
    needs=("target",),
)
class MixKD(DistillLoss):
    """MIX-KD's ``MIXSTDLoss``: ``alpha * KL(p || q) + gamma * CE_mixed``, ``p``/``q`` the
    softmaxes of the teacher's/student's logits divided by each row's standard deviation.

    The CE is part of this term (``gamma``, default 0.1, beside ``alpha`` 0.9 for the KL,
    the official ``-r 0.1 -a 0.9``), because it must read the mixed labels: the term's
    default weight is 1 and the short form adds no separate ``ce`` term (``ce_weight`` 0).

    Batch entries: ``target`` (needed), and -- where the ``partial_mixup`` transform wrote
    them -- ``target_b`` (the mixup partner's label) and ``lam`` (each sample's share of
    ``target``), read through :attr:`optional_needs`: a batch without them (the probe
    batch a run checks shapes on, or training without the transform) is an unmixed batch,
    ``lam = 1``. As for every loss that reads ``target``, a transfer set's unlabelled
    samples are masked out of the whole term.
    """

    needs = ("target",)
    #: Batch entries passed when the batch has them (written by the ``partial_mixup`` transform).
    optional_needs = ("target_b", "lam")

    def __init__(self, *, gamma: NonNegative = 0.1, alpha: NonNegative = 0.9) -> None:
        super().__init__()
        if not (gamma >= 0 and alpha >= 0):
            raise ValueError(f"mixkd: gamma and alpha must be >= 0, got gamma={gamma}, alpha={alpha}")
        self.gamma, self.alpha = float(gamma), float(alpha)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        target: torch.Tensor,
        target_b: torch.Tensor | None = None,
        lam: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return mixkd(student, teacher, target, target_b, lam, gamma=self.gamma, alpha=self.alpha,
                     mask=mask, weights=weights)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}"


__all__ = ["MixKD"]
