"""Registered relation losses on the penultimate embedding: SP, RKD, PKT (CRD is in ``crd.py``)."""

from __future__ import annotations

import torch

from .. import functional as TF
from .base import DistillLoss, register_loss


@register_loss(
    "sp",
    kind="relation",
    paper="Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019, https://arxiv.org/abs/1907.09682",
    summary="match the row-normalised batch similarity (Gram) matrices",
    weight=3000.0,
    ce_weight=1.0,
    inputs="feature",
)
class SimilarityPreserving(DistillLoss):
    """Similarity-preserving KD (see :func:`transfuse.functional.similarity_preserving`); no options."""

    def __init__(self) -> None:
        # Explicit, so the config check sees "no options" instead of nn.Module's **kwargs.
        super().__init__()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return TF.similarity_preserving(student, teacher)


@register_loss(
    "rkd",
    kind="relation",
    paper="Park et al., Relational Knowledge Distillation, CVPR 2019, https://arxiv.org/abs/1904.05068",
    summary="match mean-normalised pairwise distances and triplet angles (smooth-L1)",
    weight=1.0,
    ce_weight=1.0,
    inputs="feature",
)
class RKD(DistillLoss):
    """Relational KD ``distance_weight * L_D + angle_weight * L_A`` (see :func:`transfuse.functional.rkd`)."""

    def __init__(self, *, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return TF.rkd(student, teacher, distance_weight=self.distance_weight, angle_weight=self.angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


@register_loss(
    "pkt",
    kind="relation",
    paper=(
        "Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018, "
        "https://arxiv.org/abs/1803.10837"
    ),
    summary="KL between the batch's cosine-kernel conditional probability distributions",
    weight=30000.0,
    ce_weight=1.0,
    inputs="feature",
)
class PKT(DistillLoss):
    """Probabilistic knowledge transfer (see :func:`transfuse.functional.pkt`)."""

    def __init__(self, *, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return TF.pkt(student, teacher, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
