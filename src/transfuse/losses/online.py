"""Registered online-distillation losses: ``balanced_kl``, BD-KD's student loss (a pure function, registered).

It is registered as ``balanced_kl`` because ``bdkd`` names the scheme
(``distill: {method: bdkd}``), which adds it beside the labels' CE and the teacher's terms.

The teacher's side of BD-KD is the registered ``kd`` loss with the roles swapped (its
input the teacher's logits, its target the student's); the ``bdkd`` scheme
(:mod:`transfuse.schemes.bdkd`) sets up both sides.
"""

from __future__ import annotations

from ..functional import online as online_fn
from .base import register_loss

register_loss(
    online_fn.bdkd,
    name="balanced_kl",
    kind="logits",
    summary="BD-KD's student loss: forward/reverse KL balanced per sample by the teacher-student entropy gap",
    paper=online_fn.PAPER,
    weight=1.0,
    ce_weight=1.0,
)
