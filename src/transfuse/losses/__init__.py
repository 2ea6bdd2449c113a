"""Registered distillation losses: the names a config's ``method:`` or ``loss:`` can use.

Importing this package registers every loss in :data:`LOSSES`, whose entries are
:class:`LossSpec` objects (``LOSSES.get("kd")``): the default weights and inputs, the
options model built from the typed signature, and the module to build
(``spec.build(**options)`` or ``spec.from_shapes(...)``). The arithmetic is in
:mod:`transfuse.functional`.

* logits: ``ce``, ``kd``, ``dkd`` (position-wise), ``dist`` (batch-relation) -- pure
  functions wrapped by the generic :class:`FunctionLoss`;
* the hint map: ``fitnet`` (:class:`FitNet`, a learnable regressor), ``at`` (function);
* peers trained together: ``balanced_kl`` (BD-KD), ``selective_kd`` (KD only where the peer is more reliable on the sample);
* logits, with state or a batch transform: ``taid`` (adaptive interpolation), ``ctkd``
  (a learned, adversarial temperature), ``mixkd`` (std-normalised logits, mixed labels);
* black-box teachers: ``label_only`` (cross-entropy with a label-only teacher's answers);
* the penultimate feature: ``sp``, ``rkd``, ``pkt`` (functions) and ``crd`` (:class:`CRD`,
  embeddings and memory banks), all batch-relation.

``docs/methods.md`` gives each one's formula, options, default weights and paper.
"""

from . import concentration, crd, crkd, ctkd, divergences, minillm, scalekd, tgeo, trg  # noqa: F401
from . import features, hard_labels, logits, mixkd, online, relations, selective, taid  # noqa: F401  (registration happens on import)
from .base import LOSSES, LossSpec, ScheduleDefault, describe_losses, register_loss
from .crd import CRD
from .features import FitNet, build_regressor
from .module import DistillLoss, FunctionLoss

__all__ = [
    "CRD", "LOSSES", "DistillLoss", "FitNet", "FunctionLoss", "LossSpec", "ScheduleDefault", "build_regressor",
    "describe_losses", "register_loss",
]
