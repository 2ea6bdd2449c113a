"""Collaborative peers with selective distillation: each peer learns from another only on
the samples where that other peer is the more reliable one (``selective_kd``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from . import SCHEMES
from .base import Expansion, Scheme
from .mutual import peer_terms

PAPER = (
    "Zhu et al., A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative Learning for Semantic "
    "Segmentation, ICCV 2023, https://arxiv.org/abs/2307.12574"
)


class CollaborativeOptions(BaseModel):
    """``distill.options`` of ``collaborative``."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="softening of both sides (as DML: 1)")


def build(distill, participants, options: CollaborativeOptions) -> Expansion:
    """Deep mutual learning's terms with ``selective_kd`` in place of KD: peer ``k`` gets
    ``ce_weight * CE(p_k, y)`` and, from every other peer ``l``, ``weight / (K - 1) *
    selective_kd(z_k, z_l, y)``, the KL only where ``l``'s CE against the label is lower.
    Peers of different architectures (a CNN and an MLP or a transformer) are the point:
    each is reliable on different samples."""
    return peer_terms(distill, participants, scheme="collaborative", loss="selective_kd", prefix="skd",
                      options={"temperature": options.temperature})


SCHEMES.register("collaborative", summary="peers learn from labels and from each other only where the other is more "
                 "reliable (bidirectional selective distillation)", kind="scheme",
                 paper=PAPER)(Scheme("collaborative", CollaborativeOptions, build, PAPER))
