"""The registered label-only loss: ``label_only``, the student's cross-entropy against a
black-box teacher's hard labels (:func:`transfuse.functional.hard_labels.hard_label_ce`).

Its target is the ``labels`` field of a label-only source
(:class:`transfuse.blackbox.LabelOnlyTeacher`), e.g. ``target: blackbox.labels``; the
samples that source did not answer (its budget was spent) carry the label -1 and are
masked out by the loss itself. Default weights: the term 1.0, the label CE beside it 0.0:
the method is learning from the teacher's answers alone. A run that also has labels of its
own (``data.label_subset`` with ``transfer: rest``) adds a ``ce`` term explicitly, which
counts only its labelled samples.
"""

from __future__ import annotations

from ..functional.hard_labels import hard_label_ce
from .base import register_loss

#: The source field a ``label_only`` term reads (a bare ``target: <source>`` means this one).
TARGET_FIELD = "labels"

SPEC = register_loss(
    hard_label_ce,
    name="label_only",
    kind="logits",
    summary="cross-entropy with a black-box teacher's hard labels (its top-1 class, from a query budget)",
    paper=(
        "Orekondy et al., Knockoff Nets: Stealing Functionality of Black-Box Models, CVPR 2019, "
        "https://arxiv.org/abs/1812.02766 (label-only teachers: Wang, Zero-Shot Knowledge Distillation from a "
        "Decision-Based Black-Box Model, ICML 2021, https://arxiv.org/abs/2106.03310)"
    ),
    weight=1.0,
    ce_weight=0.0,
)
# The field a bare target reference completes to (config wiring reads it from the module).
SPEC.module.target_field = TARGET_FIELD

__all__ = ["SPEC", "TARGET_FIELD"]
