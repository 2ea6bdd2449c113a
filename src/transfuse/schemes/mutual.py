"""Deep mutual learning: trainable peers that learn from the labels and from each other."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from . import SCHEMES
from .base import Expansion, Scheme

PAPER = "Zhang et al., Deep Mutual Learning, CVPR 2018, https://arxiv.org/abs/1706.00384"


class MutualOptions(BaseModel):
    """``distill.options`` of ``dml``."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="softening of both sides; the paper uses 1")


def build(distill, participants, options: MutualOptions) -> Expansion:
    """Each trainable participant ``k`` of ``K`` gets ``ce_weight * CE(p_k, y)`` and, for
    every other one ``l``, ``weight / (K - 1) * T^2 KL(p_l || p_k)`` with ``p_l`` detached
    (so each KL trains only ``k``). Defaults: ``ce_weight`` 1, ``weight`` 1, ``T`` = 1,
    which is the paper's loss ``L_k = L_C + 1/(K-1) sum_l KL(p_l || p_k)``."""
    return peer_terms(distill, participants, scheme="dml", loss="kd", prefix="kl",
                      options={"temperature": options.temperature})


def peer_terms(distill, participants, *, scheme: str, loss: str, prefix: str, options: dict) -> Expansion:
    """Terms for trainable peers that learn from the labels and from each other with
    ``loss``: ``ce_<k>`` and ``<prefix>_<k>_from_<l>`` for every ordered pair (DML's shape,
    shared by the schemes built on it)."""
    from ..config import TermConfig

    peers = [name for name, p in participants.items() if p.trainable]
    if len(peers) < 2:
        raise ValueError(
            f"method {scheme!r} trains two or more participants from each other, but only {peers} is trainable; add "
            "another participant with trainable: true (e.g. participants.peer)"
        )
    ce_weight = 1.0 if distill.ce_weight is None else distill.ce_weight
    weight = (1.0 if distill.weight is None else distill.weight) / (len(peers) - 1)
    terms = []
    for k in peers:
        if ce_weight > 0:
            terms.append(TermConfig(loss="ce", name=f"ce_{k}", weight=ce_weight, input=f"{k}.logits"))
        for other in peers:
            if other != k:
                terms.append(TermConfig(loss=loss, name=f"{prefix}_{k}_from_{other}", weight=weight, input=f"{k}.logits",
                                        target=f"{other}.logits", options=dict(options)))
    return terms, {}


SCHEMES.register("dml", summary="deep mutual learning: trainable peers learn from labels and from each other",
                 kind="scheme", paper=PAPER)(Scheme("dml", MutualOptions, build, PAPER))
