"""Pure distillation losses: tensors in, a scalar out.

No modules, no batches, no config: each function takes keyword-only options, documents
its input shapes and its reduction, and cites its paper. The registered loss modules in
:mod:`transfuse.losses` call these.

* logits (class dim last): :func:`kd`, :func:`dkd`, :func:`dkd_parts`, :func:`dist`;
* features: :func:`fitnet`, :func:`attention_map`, :func:`attention_transfer`;
* relations (widths may differ): :func:`similarity_preserving`, :func:`pairwise_distances`,
  :func:`rkd_distance`, :func:`rkd_angle`, :func:`rkd`, :func:`pkt`, :func:`crd_scores`,
  :func:`crd_nce_loss`.
"""

from .features import attention_map, attention_transfer, fitnet
from .logits import dist, dkd, dkd_parts, kd
from .relations import (
    crd_nce_loss,
    crd_scores,
    pairwise_distances,
    pkt,
    rkd,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)

__all__ = [
    "attention_map", "attention_transfer", "crd_nce_loss", "crd_scores", "dist", "dkd", "dkd_parts", "fitnet", "kd",
    "pairwise_distances", "pkt", "rkd", "rkd_angle", "rkd_distance", "similarity_preserving",
]
