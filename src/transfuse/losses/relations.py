"""Registered relation losses: SP, RKD, PKT (CRD is in ``crd.py``).

All three are batch-relation losses: a mask selects the samples, weights are refused.

Which layer the official code bases (RepDistiller, mdistiller) compare: RKD and PKT the
pooled embedding (``feat[-1]`` / ``pooled_feat``), the ``feature`` input here; SP the last
stage's map before pooling (``feat[-2]`` / ``feats[-1]``), which the zoo models declare as
``map_layer``. A reference can only name ``logits``, ``feature``, ``hint`` or a module
path, so SP's default input stays ``feature`` (the map, average-pooled); for the official
layer point the term at the map: ``input: student.<map_layer>``, ``target:
teacher.<map_layer>`` (``layer3`` for ``resnet``/``wrn``, ``features.block<n>`` for ``cnn``).
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
    inputs="map",
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
