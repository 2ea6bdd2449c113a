"""Registered relation losses on the penultimate embedding: SP, RKD, PKT (CRD is in ``crd.py``).

All three are batch-relation losses: a mask selects the samples, weights are refused.
"""

from __future__ import annotations

from .. import functional as TF
from .base import register_loss

register_loss(
    TF.similarity_preserving,
    name="sp",
    kind="relation",
    summary="match the row-normalised batch similarity (Gram) matrices",
    paper="Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019, https://arxiv.org/abs/1907.09682",
    weight=3000.0,
    ce_weight=1.0,
    inputs="feature",
    positionwise=False,
)

register_loss(
    TF.rkd,
    name="rkd",
    kind="relation",
    summary="match mean-normalised pairwise distances and triplet angles (smooth-L1)",
    paper="Park et al., Relational Knowledge Distillation, CVPR 2019, https://arxiv.org/abs/1904.05068",
    weight=1.0,
    ce_weight=1.0,
    inputs="feature",
    positionwise=False,
)

register_loss(
    TF.pkt,
    name="pkt",
    kind="relation",
    summary="KL between the batch's cosine-kernel conditional probability distributions",
    paper=(
        "Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018, "
        "https://arxiv.org/abs/1803.10837"
    ),
    weight=30000.0,
    ce_weight=1.0,
    inputs="feature",
    positionwise=False,
)
