"""Registered peer-selective loss: ``selective_kd`` (KD only where the peer is more reliable)."""

from __future__ import annotations

from ..functional import selective as _selective
from .base import register_loss

register_loss(
    _selective.selective_kd,
    name="selective_kd",
    kind="logits",
    summary="KD from a peer only on the samples where the peer's CE against the label is lower (selective, online)",
    paper=(
        "Zhu et al., A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative Learning for Semantic "
        "Segmentation, ICCV 2023, https://arxiv.org/abs/2307.12574"
    ),
    weight=1.0,
    ce_weight=1.0,
    needs=("target",),
)
