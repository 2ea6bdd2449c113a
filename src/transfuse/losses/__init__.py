"""Registered distillation losses: the names a config's ``method:`` or ``loss:`` can use.

Importing this package registers every loss in :data:`LOSSES`. Each is a
:class:`DistillLoss` holding its hyper-parameters (the config ``options``) and any
learnable part; the arithmetic is in :mod:`transfuse.functional`.

* logits: ``ce`` (:class:`CrossEntropy`), ``kd`` (:class:`KD`), ``dkd`` (:class:`DKD`),
  ``dist`` (:class:`DIST`);
* the hint map: ``fitnet`` (:class:`FitNet`), ``at`` (:class:`AttentionTransfer`);
* the penultimate feature: ``sp`` (:class:`SimilarityPreserving`), ``rkd`` (:class:`RKD`),
  ``pkt`` (:class:`PKT`), ``crd`` (:class:`CRD`).

``docs/methods.md`` gives each one's formula, options, default weights and paper.
"""

from . import crd, features, logits, relations  # noqa: F401  (registration happens on import)
from .base import LOSSES, DistillLoss, register_loss
from .crd import CRD
from .features import AttentionTransfer, FitNet, build_regressor
from .logits import DIST, DKD, KD, CrossEntropy
from .relations import PKT, RKD, SimilarityPreserving

__all__ = [
    "CRD", "DIST", "DKD", "KD", "LOSSES", "PKT", "RKD", "AttentionTransfer", "CrossEntropy", "DistillLoss", "FitNet",
    "SimilarityPreserving", "build_regressor", "register_loss",
]
