"""Registered logit losses: cross-entropy with labels, KD, DKD, DIST."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as TF
from .base import DistillLoss, register_loss


@register_loss(
    "ce",
    kind="logits",
    paper=(
        "Szegedy et al., Rethinking the Inception Architecture for Computer Vision, CVPR 2016, "
        "https://arxiv.org/abs/1512.00567 (label smoothing; plain cross-entropy otherwise)"
    ),
    summary="cross-entropy with the labels (no teacher)",
    weight=1.0,
    ce_weight=0.0,
)
class CrossEntropy(DistillLoss):
    """Cross-entropy between the student's logits and the labels; never looks at the teacher.

    ``label_smoothing`` mixes the one-hot target with the uniform distribution.
    Logits ``(..., C)`` with ``target`` ``(...)``; averaged over all positions.
    """

    needs = ("target",)
    uses_teacher = False

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor | None = None, *, target: torch.Tensor
    ) -> torch.Tensor:
        num_classes = student.shape[-1]
        return F.cross_entropy(
            student.reshape(-1, num_classes), target.reshape(-1).long(), label_smoothing=self.label_smoothing
        )

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


@register_loss(
    "kd",
    kind="logits",
    paper="Hinton et al., Distilling the Knowledge in a Neural Network, arXiv 2015, https://arxiv.org/abs/1503.02531",
    summary="soft-target KL at a temperature (classic KD)",
    weight=0.9,
    ce_weight=0.1,
)
class KD(DistillLoss):
    """Hinton KD: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` (see :func:`transfuse.functional.kd`)."""

    def __init__(self, *, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return TF.kd(student, teacher, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@register_loss(
    "dkd",
    kind="logits",
    paper="Zhao et al., Decoupled Knowledge Distillation, CVPR 2022, https://arxiv.org/abs/2203.08679",
    summary="decoupled KD: target-class (TCKD) and non-target-class (NCKD) terms weighted separately",
    weight=1.0,
    ce_weight=1.0,
)
class DKD(DistillLoss):
    """Decoupled KD ``alpha * TCKD + beta * NCKD`` (see :func:`transfuse.functional.dkd`).

    The paper warms the term up linearly (20 of 240 epochs); in transfuse that is a weight
    schedule on the term (``distill.warmup_steps``), not part of the loss.
    """

    needs = ("target",)

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *, target: torch.Tensor) -> torch.Tensor:
        return TF.dkd(student, teacher, target, alpha=self.alpha, beta=self.beta, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


@register_loss(
    "dist",
    kind="logits",
    paper=(
        "Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022, "
        "https://arxiv.org/abs/2205.10536"
    ),
    summary="match predictions by Pearson correlation, across classes and across the batch",
    weight=1.0,
    ce_weight=1.0,
)
class DIST(DistillLoss):
    """DIST ``T^2 * (beta * inter + gamma * intra)`` (see :func:`transfuse.functional.dist`)."""

    def __init__(self, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return TF.dist(student, teacher, beta=self.beta, gamma=self.gamma, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"
