"""Learning from a teacher that answers hard labels only (a label-only, black-box teacher).

A black-box teacher returns the class it predicts for each input it is asked about, never
its logits; each answer costs one query from a budget (:class:`transfuse.blackbox.LabelOnlyTeacher`).
The student is then trained with the cross-entropy against those labels. Inputs the teacher
did not answer carry the label :data:`NO_ANSWER` (-1) and count for nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._types import LabelSmoothing, Reduction
from .reduce import _checked, _reduce, _weigh

#: The label of an input the teacher did not answer (its budget was spent). Negative, so
#: it is never a class id.
NO_ANSWER = -1


def hard_label_ce(
    student_logits: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    label_smoothing: LabelSmoothing = 0.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Cross-entropy of the student against a label-only teacher's answers.

    ``L = CE(y_t, softmax(z_s))`` per position, where ``y_t`` is the class the teacher
    answered; it is :func:`~transfuse.functional.cross_entropy` with the teacher's labels as
    targets, except that a negative label (the teacher did not answer,
    :data:`NO_ANSWER`) masks its position out -- the teacher's ``answered`` mask is carried
    by its labels, so a term needs no batch entry for it.

    Shapes: ``student_logits`` ``(..., C)``; ``teacher_labels`` ``(...)`` integer class ids
    in ``[0, C)`` or negative (float, complex and bool tensors are refused: a label-only
    teacher answers classes, not logits). Reduction (``"mean"``):
    :func:`~transfuse.functional.reduce_positions` over the positions that are answered
    AND kept by ``mask`` (``(...)`` or a prefix such as ``(B,)``), times ``weights``;
    positions the teacher did not answer count neither in the sum nor in the count.
    ``reduction="none"`` returns the ``(...)`` values (weights applied, unanswered and
    masked-out positions 0). No answered position gives a 0 still connected to the graph.
    ``label_smoothing`` mixes the one-hot teacher label with the uniform distribution
    (it softens a hard answer that may be wrong).

    Paper: Orekondy et al., Knockoff Nets: Stealing Functionality of Black-Box Models,
    CVPR 2019, https://arxiv.org/abs/1812.02766 (a student trained on the answers of a
    black box to a budget of queries; its top-1-label setting is this loss).
    """
    name = "hard_label_ce"
    if reduction not in ("mean", "none"):
        raise ValueError(f"{name}: reduction must be 'mean' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1), got {label_smoothing}")
    dtype = teacher_labels.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(
            f"{name}: teacher_labels must hold integer class ids (the teacher's answers, -1 where it did not "
            f"answer); got dtype {dtype}. A label-only teacher answers classes, not logits: to distil logits use kd"
        )
    if teacher_labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"{name}: teacher_labels shape {tuple(teacher_labels.shape)} must equal the student logits' leading "
            f"shape {tuple(student_logits.shape[:-1])}"
        )
    answered = teacher_labels >= 0  # (...)
    keep = answered
    if mask is not None:
        mask_b, _ = _checked(answered, mask, None, name)  # aligned from the left: (B,) against (B, T) labels
        keep = answered & mask_b
    labels = torch.where(keep, teacher_labels, torch.zeros((), dtype=teacher_labels.dtype, device=teacher_labels.device))
    num_classes = student_logits.shape[-1]
    per_position = F.cross_entropy(
        student_logits.reshape(-1, num_classes), labels.reshape(-1).long(), label_smoothing=label_smoothing,
        reduction="none",
    ).reshape(labels.shape)  # (...)
    if reduction == "none":
        return _weigh(per_position, keep, weights, name)
    return _reduce(per_position, keep, weights, name)


__all__ = ["NO_ANSWER", "hard_label_ce"]
