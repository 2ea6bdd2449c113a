"""Selective distillation between peers: learn from the other model only where it is the
more reliable one on a sample.

"A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative Learning for
Semantic Segmentation" (Zhu et al., ICCV 2023) trains a CNN and a transformer together
and transfers the logit KL, in each direction, only at the pixels where the source model
is reliable: its cross-entropy against the ground truth is lower than the receiver's. No
official code was found; this is the classification analogue described in the paper's
pixel-wise bidirectional selective distillation (BSD), with a sample in place of a pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._types import Reduction, Temperature
from .logits import _check_pair, _check_reduction, _check_target, _check_temperature, _kl_from_logs, _usable_target
from .reduce import _reduce, _weigh


def more_reliable(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bool ``(...)``: where the teacher's cross-entropy against ``target`` is strictly lower
    than the student's (it gives the label a higher probability). Ties go to the student:
    equal models teach each other nothing. Computed without gradients (a selection, not a loss)."""
    with torch.no_grad():
        index = target.long().unsqueeze(-1)  # (..., 1)
        log_q_y = F.log_softmax(student_logits.float(), dim=-1).gather(-1, index).squeeze(-1)  # (...)
        log_p_y = F.log_softmax(teacher_logits.float(), dim=-1).gather(-1, index).squeeze(-1)  # (...)
        return log_p_y > log_q_y


def selective_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """KD from a peer, gated per position by reliability:
    ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) * [CE(z_t, y) < CE(z_s, y)]``.

    Shapes: logits ``(..., C)``, ``target`` ``(...)`` integer class ids. The gate is
    :func:`more_reliable` (no gradient flows through it). Reduction (``"mean"``): the mean
    over every position kept by ``mask`` (positions where the peer is not more reliable
    count as 0, so the loss's scale does not jump with the number of selected samples);
    ``weights`` multiply per position; ``reduction="none"`` returns the gated values.
    Positions without a label must be masked out (the Distiller masks unlabelled samples
    of a transfer set by default). ``temperature=1`` as in deep mutual learning, the
    online baseline this extends. No positions give 0.

    Paper: Zhu et al., A Good Student is Cooperative and Reliable: CNN-Transformer
    Collaborative Learning for Semantic Segmentation, ICCV 2023, https://arxiv.org/abs/2307.12574
    """
    _check_pair(student_logits, teacher_logits, "selective_kd")
    _check_target(student_logits, target, "selective_kd")
    _check_temperature(temperature, "selective_kd")
    _check_reduction(reduction, "selective_kd")
    target = _usable_target(target, mask, "selective_kd")
    gate = more_reliable(student_logits, teacher_logits, target)  # (...) bool
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # (..., C)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)  # (..., C)
    # where, not a product: an unselected position contributes an exact 0 (and no gradient).
    per_position = torch.where(gate, temperature**2 * _kl_from_logs(log_p, log_q), torch.zeros((), dtype=log_q.dtype,
                                                                                              device=log_q.device))
    if reduction == "none":
        return _weigh(per_position, mask, weights, "selective_kd")
    return _reduce(per_position, mask, weights, "selective_kd")
