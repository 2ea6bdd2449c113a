"""Schemes: short-form methods that set up participants' terms together, not one loss.

``distill.method`` names either a registered loss (the student learns from the teacher
with it, beside a label CE term) or a scheme registered here:

* ``dml`` -- deep mutual learning: every trainable participant learns from the labels
  and from each other one (:mod:`.mutual`);
* ``multi_teacher`` -- the student learns from the mean of several frozen teachers'
  softened predictions (:mod:`.multi_teacher`);
* ``bdkd`` -- online KD: a trainable student and a trainable teacher; the student
  balances forward and reverse KL per sample (:mod:`.bdkd`);
* ``kl_dp`` -- a pretrained student learns from a teacher where the teacher is more
  confident in the label, and from its own frozen original elsewhere (:mod:`.kl_dp`);
* ``collaborative`` -- DML's peers, but each learns from another only on the samples
  where that one is more reliable (``selective_kd``; :mod:`.collaborative`).

A scheme is only config expansion: it returns terms and sources, which then run on the
one Distiller and the one engine like any hand-written long form.
"""

from __future__ import annotations

from ..registry import Registry
from .base import NO_DISTILLATION, Scheme, expand

#: Short-form methods that are schemes rather than single losses.
SCHEMES: Registry[Scheme] = Registry("scheme")

from . import bdkd, collaborative, concentration, kl_dp, meta_dmoe, multi_teacher, mutual  # noqa: E402,F401  (registration happens on import)

__all__ = ["NO_DISTILLATION", "SCHEMES", "Scheme", "expand"]
