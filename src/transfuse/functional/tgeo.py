"""TGeo-KD: a per-sample fusion ratio between the teacher's soft targets and the labels.

Paper: Hu, Wu et al., Less or More From Teacher: Exploiting Trilateral Geometry for
Knowledge Distillation, ICLR 2024, https://arxiv.org/abs/2312.15112 (no official code is
public). The student's loss on sample ``i`` is
``alpha_i * KL(p_i || q_i) + (1 - alpha_i) * CE(y_i, q_i)``, where ``alpha_i`` is read
off the trilateral geometry of the student's prediction ``s_i``, the teacher's ``t_i`` and
the one-hot label ``g_i`` (plus the teacher's mean prediction on the label's class) by a
small network trained on held-out data. The pure parts are here: the relation features
(:func:`tgeo_relations`), the class sums of the teacher's predictions that make its
class means (:func:`class_prediction_sums`) and the fused loss for given ratios
(:func:`tgeo_fused`). The network, the running class means and the bilevel update live
in :mod:`transfuse.losses.tgeo`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._types import Reduction, Temperature
from .logits import _check_pair, _check_reduction, _check_target, _usable_target, cross_entropy, kd
from .reduce import _checked, _reduce, _weigh

#: How many ``C``-vectors :func:`tgeo_relations` concatenates: s-t, s-g, t-g, t-tbar.
NUM_RELATIONS = 4


def tgeo_relations(
    student_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    target: torch.Tensor,
    class_means: torch.Tensor,
) -> torch.Tensor:
    """The relation vector ``Delta_i`` of each position: ``[s - t, s - g, t - g, t - tbar_y]``, shape ``(..., 4C)``.

    ``s``/``t``: the student's and teacher's predicted distributions ``(..., C)``; ``g``:
    the one-hot of ``target`` ``(...)`` (integer class ids); ``tbar_y``: row ``y`` of
    ``class_means`` ``(C, C)``, the teacher's mean prediction over the samples of class
    ``y``. The first three are the edges of the triangle S-T-G (the intra-sample
    relations: how right the student is, how right the teacher is, how well the student
    mimics the teacher); the last is the inter-sample relation (how far the teacher is
    from what it predicts for that class on average, which marks outliers). Each edge is
    the vector difference, not only its length, so the direction (which classes the
    errors go to) is kept.

    ``target`` entries outside ``[0, C)`` are an error; give unlabelled positions a valid
    placeholder (their features are meaningless and the loss masks them out).
    """
    _check_pair(student_probs, teacher_probs, "tgeo_relations")
    _check_target(student_probs, target, "tgeo_relations")
    num_classes = student_probs.shape[-1]
    if class_means.shape != (num_classes, num_classes):
        raise ValueError(f"tgeo_relations: class_means must be (C, C) = {(num_classes, num_classes)}, "
                         f"got {tuple(class_means.shape)}")
    one_hot = F.one_hot(target.long(), num_classes).to(student_probs.dtype)  # (..., C)
    teacher_mean = class_means.to(teacher_probs.dtype)[target.long()]  # (..., C): tbar of each position's class
    return torch.cat(
        [student_probs - teacher_probs, student_probs - one_hot, teacher_probs - one_hot, teacher_probs - teacher_mean],
        dim=-1,
    )


def class_prediction_sums(
    teacher_probs: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class ``c``: the sum of the teacher's predictions ``(C,)`` over the positions labelled ``c``, and their count.

    Returns ``(sums (C, C), counts (C,))``, both in ``teacher_probs``' dtype; the class
    mean ``tbar_c`` is ``sums[c] / counts[c]``. ``mask`` (bool, ``(...)`` or a prefix)
    leaves positions out (unlabelled samples, padding). Summed in one ``index_add_``, no
    host synchronisation.
    """
    _check_target(teacher_probs, target, "class_prediction_sums")
    num_classes = teacher_probs.shape[-1]
    target = _usable_target(target, mask, "class_prediction_sums")
    keep = torch.ones(target.shape, dtype=teacher_probs.dtype, device=teacher_probs.device)  # (...)
    if mask is not None:
        mask_b, _ = _checked(keep, mask, None, "class_prediction_sums")
        keep = keep * mask_b.expand(keep.shape).to(keep.dtype)
    flat_target = target.reshape(-1).long()  # (N,)
    flat_keep = keep.reshape(-1)  # (N,)
    flat_probs = teacher_probs.reshape(-1, num_classes) * flat_keep[:, None]  # (N, C)
    sums = torch.zeros(num_classes, num_classes, dtype=teacher_probs.dtype, device=teacher_probs.device)
    counts = torch.zeros(num_classes, dtype=teacher_probs.dtype, device=teacher_probs.device)
    return sums.index_add_(0, flat_target, flat_probs), counts.index_add_(0, flat_target, flat_keep)


def tgeo_fused(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """TGeo-KD's fused loss for given per-position ratios: ``alpha * KD + (1 - alpha) * CE``.

    ``KD`` is :func:`~transfuse.functional.kd` at ``temperature`` (``T^2 * KL(p_T || q_T)``;
    at the default ``T = 1`` exactly ``KL(p || q)``), ``CE`` is
    :func:`~transfuse.functional.cross_entropy` with the labels; both per position.

    Shapes: logits ``(..., C)``, ``target`` ``(...)`` integer class ids, ``alpha`` ``(...)``
    with values in ``[0, 1]`` (gradients flow into ``alpha`` as given: detach it where the
    ratio must not learn from this loss). Reduction (``"mean"``):
    :func:`~transfuse.functional.reduce_positions` with ``mask``/``weights``;
    ``reduction="none"`` returns the ``(...)`` values (weights applied, masked-out 0).
    Masked-out positions may hold any placeholder target.

    Paper: Hu, Wu et al., TGeo-KD, ICLR 2024, https://arxiv.org/abs/2312.15112 (Eq. of the
    sample-wise fused objective).
    """
    _check_pair(student_logits, teacher_logits, "tgeo")
    _check_reduction(reduction, "tgeo")
    _check_target(student_logits, target, "tgeo")
    if alpha.shape != student_logits.shape[:-1]:
        raise ValueError(f"tgeo: alpha must have the positions' shape {tuple(student_logits.shape[:-1])}, "
                         f"got {tuple(alpha.shape)}")
    soft = kd(student_logits, teacher_logits, temperature=temperature, reduction="none")  # (...)
    hard = cross_entropy(student_logits, _usable_target(target, mask, "tgeo"), reduction="none")  # (...)
    per_position = alpha.to(soft.dtype) * soft + (1 - alpha.to(soft.dtype)) * hard  # (...)
    if reduction == "none":
        return _weigh(per_position, mask, weights, "tgeo")
    return _reduce(per_position, mask, weights, "tgeo")


__all__ = ["NUM_RELATIONS", "class_prediction_sums", "tgeo_fused", "tgeo_relations"]
