"""MIX-KD's loss: KD and CE on logits divided by their own standard deviation, with mixed labels.

Paper: Choi et al., Understanding the Role of Mixup in Knowledge Distillation: An
Empirical Study, WACV 2023, https://arxiv.org/abs/2211.03946. Written after the authors'
``distiller_zoo/MIXSTD.py`` (``MIXSTDLoss``) and ``helper/loops_mixstd.py`` (hchoi71/MIX-KD).
The partial mixup of the inputs is the batch transform ``partial_mixup``
(:mod:`transfuse.transforms`), which records ``target_b`` and ``lam`` for the CE here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._types import NonNegative, Reduction
from .logits import _check_pair, _check_reduction, _check_target, _kl_from_logs, _usable_target
from .reduce import _reduce, _weigh

#: Floor of a row's standard deviation: a row of equal logits (std 0) divides by this
#: instead of 0, which leaves its softmax uniform (the official code would give nan).
_STD_FLOOR = 1e-6


def std_normalise(logits: torch.Tensor) -> torch.Tensor:
    """``z / std(z)`` per row: each row of logits ``(..., C)`` divided by its standard deviation over classes.

    The standard deviation is ``torch.std``'s (Bessel-corrected, ``C - 1`` in the
    denominator), as in the official code, floored at 1e-6; it is not detached, so the
    gradient flows through it too. Needs ``C >= 2``.
    """
    if logits.shape[-1] < 2:
        raise ValueError(f"mixkd: the per-row standard deviation needs at least 2 classes, got {logits.shape[-1]}")
    return logits / logits.std(dim=-1, keepdim=True).clamp_min(_STD_FLOOR)


def mixkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    target_b: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    *,
    gamma: NonNegative = 0.1,
    alpha: NonNegative = 0.9,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """MIX-KD's loss: ``alpha * KL(p || q) + gamma * CE_mixed`` with a per-row standard-deviation temperature.

    With ``q = softmax(z_s / std(z_s))`` and ``p = softmax(z_t / std(z_t))`` per row
    (:func:`std_normalise`):

    * ``KL(p || q)`` summed over classes -- no ``T^2`` factor (the official
      ``KLDivLoss(reduction='batchmean')``);
    * ``CE_mixed = -lam * log q[target] - (1 - lam) * log q[target_b]``, the
      cross-entropy with the mixup's soft label ``lam * onehot(target) + (1 - lam) *
      onehot(target_b)``, on the same standard-deviation-scaled student logits (as the
      official ``MIXSTDLoss`` computes it). Without ``target_b``/``lam`` (an unmixed
      batch) it is the plain ``-log q[target]``.

    Shapes: logits ``(..., C)``, ``target`` and ``target_b`` integer ``(...)``, ``lam``
    float ``(...)`` (a sample's share of ``target``; 1 = not mixed). Reduction
    (``"mean"``): :func:`~transfuse.functional.reduce_positions` with ``mask``/``weights``
    (``(...)`` or a prefix); without them the mean over positions, which is the
    official code's sum over the batch divided by ``B`` for both parts.
    ``reduction="none"`` returns the ``(...)`` values (weights applied, masked-out 0);
    masked-out positions may hold any placeholder labels.

    Defaults ``gamma=0.1``, ``alpha=0.9``: the official ``-r 0.1 -a 0.9``.

    Paper: Choi et al., Understanding the Role of Mixup in Knowledge Distillation: An
    Empirical Study, WACV 2023, https://arxiv.org/abs/2211.03946
    """
    _check_pair(student_logits, teacher_logits, "mixkd")
    _check_reduction(reduction, "mixkd")
    _check_target(student_logits, target, "mixkd")
    if (target_b is None) != (lam is None):
        raise ValueError("mixkd: give target_b and lam together (the mixup partner's label and the sample's share)")
    log_q = F.log_softmax(std_normalise(student_logits), dim=-1)  # (..., C)
    log_p = F.log_softmax(std_normalise(teacher_logits), dim=-1)  # (..., C)
    kl = _kl_from_logs(log_p, log_q)  # (...)
    target = _usable_target(target, mask, "mixkd")
    ce = -log_q.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)  # (...)
    if target_b is not None:
        _check_target(student_logits, target_b, "mixkd")
        if tuple(lam.shape) != tuple(target.shape) or not lam.is_floating_point():
            raise ValueError(f"mixkd: lam must be a float tensor of shape {tuple(target.shape)}, "
                             f"got {lam.dtype} {tuple(lam.shape)}")
        target_b = _usable_target(target_b, mask, "mixkd")
        ce_b = -log_q.gather(-1, target_b.long().unsqueeze(-1)).squeeze(-1)  # (...)
        lam = lam.to(log_q.dtype)
        ce = lam * ce + (1 - lam) * ce_b
    per_position = alpha * kl + gamma * ce  # (...)
    if reduction == "none":
        return _weigh(per_position, mask, weights, "mixkd")
    return _reduce(per_position, mask, weights, "mixkd")


__all__ = ["mixkd", "std_normalise"]
