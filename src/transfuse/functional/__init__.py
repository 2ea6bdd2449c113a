"""Pure distillation losses: tensors in, a scalar (or per-position values) out.

No modules, no batches, no config: each function takes keyword-only options (typed with
the constraints in :mod:`transfuse.functional._types`, which the loss registry turns into
config validation), documents its input shapes and its reduction, and cites its paper.
The registered loss modules in :mod:`transfuse.losses` call these.

Two families, by how a mask and per-sample weights apply:

* position-wise -- one value per position (a row of logits, a token, a sample), reduced
  by the one shared rule :func:`reduce_positions` (``mask``, ``weights``; or
  ``reduction="none"`` for the values): :func:`kd`, :func:`dkd` (:func:`dkd_parts`),
  :func:`cross_entropy`, :func:`fitnet`, :func:`attention_transfer`, :func:`selective_kd`;
* batch-relation -- the value depends on the whole batch, so ``mask`` selects the samples
  the relation is computed over and ``weights`` are refused: :func:`dist`,
  :func:`similarity_preserving`, :func:`rkd_distance`, :func:`rkd_angle`, :func:`rkd`,
  :func:`pkt`.

Helpers: :func:`weigh_positions`, :func:`attention_map`, :func:`pairwise_distances`, and
CRD's pieces :func:`crd_scores`, :func:`crd_nce_loss` (used by the ``crd`` module).

Methods added one module each (their public names are re-exported here from each module's
``__all__``): :mod:`.divergences` (the token divergences ``fkl``, ``rkl``, ``tvd``, ``jsd``,
``skew_fkl``, ``skew_rkl``, ``adaptive_kl``; ``topk_divergence``; ``chunked_divergence``),
:mod:`.tgeo` (TGeo-KD), :mod:`.trg` (TRG), :mod:`.scalekd` (ScaleKD), :mod:`.crkd` (Cr-KD,
Sinkhorn, UNO's swapped prediction), :mod:`.concentration` (Knowledge Concentration),
:mod:`.meta_dmoe` (Meta-DMoE's inner step), :mod:`.hard` (HARD's warp and objective),
:mod:`.knfu` (KnFu's fusion weights), :mod:`.minillm` (MiniLLM's policy-gradient objective).
"""

from ._types import LabelSmoothing, NonNegative, Positive, PositiveInt, Probability, Reduction, Temperature
from .ctkd import ctkd, ctkd_temperature, reverse_gradient
from .features import attention_map, attention_transfer, fitnet
from .hard_labels import hard_label_ce
from .logits import cross_entropy, dist, dkd, dkd_parts, kd
from .mixkd import mixkd, std_normalise
from .online import bdkd, bdkd_parts, bdkd_weights, entropy
from .reduce import reduce_positions, weigh_positions
from .selective import more_reliable, selective_kd
from .taid import taid, taid_target
from .relations import (
    crd_nce_loss,
    crd_nce_with_gradient,
    crd_scores,
    pairwise_distances,
    pkt,
    rkd,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)

__all__ = [
    "LabelSmoothing", "NonNegative", "Positive", "PositiveInt", "Probability", "Reduction", "Temperature",
    "attention_map", "attention_transfer", "bdkd", "bdkd_parts", "bdkd_weights", "crd_nce_loss", "crd_nce_with_gradient", "crd_scores", "cross_entropy", "dist", "dkd", "dkd_parts", "entropy",
    "fitnet", "hard_label_ce", "kd", "more_reliable", "pairwise_distances", "pkt", "reduce_positions", "rkd", "rkd_angle", "rkd_distance",
    "selective_kd", "similarity_preserving", "weigh_positions", "ctkd", "ctkd_temperature", "reverse_gradient",
    "mixkd", "std_normalise", "taid", "taid_target",
]

# Methods added one module each; every module lists its public names in __all__.
from . import (  # noqa: E402
    concentration as _concentration, crkd as _crkd, divergences as _divergences, hard as _hard, knfu as _knfu,
    meta_dmoe as _meta_dmoe, minillm as _minillm,
    scalekd as _scalekd, tgeo as _tgeo, trg as _trg,
)

for _module in (_concentration, _crkd, _divergences, _hard, _knfu, _meta_dmoe, _minillm, _scalekd, _tgeo, _trg):
    globals().update({_name: getattr(_module, _name) for _name in _module.__all__})
    __all__ += list(_module.__all__)
