"""TAID's loss: KL from an intermediate target that moves from the student towards the teacher.

Paper: Shing et al., TAID: Temporally Adaptive Interpolated Distillation for Efficient
Knowledge Transfer in Language Models, ICLR 2025, https://arxiv.org/abs/2501.16937.
Written after the paper and the authors' ``src/distil_losses/taid.py`` (SakanaAI/TAID):
the target is the softmax of the interpolated LOGITS, ``(1 - t) * stopgrad(z_s) + t * z_t``.
The schedule of ``t`` lives in the registered module (:class:`transfuse.losses.taid.TAID`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._types import Reduction
from .logits import _check_pair, _check_reduction, _kl_from_logs, _unmasked
from .reduce import _reduce, _weigh


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is a narrower float (a softmax over a large vocabulary in bf16 is coarse)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def taid_target(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, t: float | torch.Tensor) -> torch.Tensor:
    """TAID's intermediate target ``log p_t = log_softmax((1 - t) * stopgrad(z_s) + t * z_t)``, shape ``(..., C)``.

    The student's logits are detached, so no gradient reaches the student through the
    target (the teacher's side is used as given). At ``t = 0`` it is the student's own
    prediction, at ``t = 1`` the teacher's. Computed in at least float32.
    """
    _check_pair(student_logits, teacher_logits, "taid")
    z_s = _at_least_float32(student_logits.detach())
    z_t = _at_least_float32(teacher_logits)
    if isinstance(t, torch.Tensor):
        t = t.to(device=z_s.device, dtype=z_s.dtype)
    elif not 0.0 <= t <= 1.0:
        raise ValueError(f"taid: t must be in [0, 1], got {t}")
    return F.log_softmax((1 - t) * z_s + t * z_t, dim=-1)


def taid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    t: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """TAID's loss at interpolation ``t``: ``KL(p_t || q)`` with ``q = softmax(z_s)``.

    ``p_t = softmax((1 - t) * stopgrad(z_s) + t * z_t)`` (:func:`taid_target`); ``t`` is a
    float in ``[0, 1]`` or a 0-dim tensor (the schedule's buffer, read without a host
    synchronisation). No temperature and no ``T^2`` factor: at ``t = 1`` this is
    :func:`~transfuse.functional.kd` at ``temperature=1``.

    Shapes: logits ``(..., C)``, e.g. ``(B, C)`` or ``(B, T, C)``; the positions are
    ``(...)``. Per position: summed over classes. Reduction (``"mean"``):
    :func:`~transfuse.functional.reduce_positions` with ``mask``/``weights`` (``(...)``
    or a prefix); without them the mean over positions (``batchmean`` for ``(B, C)``).
    ``reduction="none"`` returns the ``(...)`` values (weights applied, masked-out 0).
    Computed in at least float32 (as the official code's softmaxes are), so the result
    is float32 for bf16/fp16 logits.

    The official code reports the cross-entropy ``-sum p_t log q`` (its ``forward_kl``),
    which is this KL plus the entropy of ``p_t``: the same gradient, since ``p_t`` is
    constant for the student; the KL is 0 when student and teacher agree.

    Paper: Shing et al., TAID, ICLR 2025, https://arxiv.org/abs/2501.16937
    """
    _check_reduction(reduction, "taid")
    log_p = taid_target(student_logits, teacher_logits, t=t)  # (..., C), no gradient to the student
    log_q = F.log_softmax(_at_least_float32(student_logits), dim=-1)  # (..., C)
    per_position = _kl_from_logs(log_p, log_q)  # (...)
    if reduction == "none":
        return _weigh(per_position, mask, weights, "taid")
    if _unmasked(mask, weights, per_position):
        return per_position.mean()
    return _reduce(per_position, mask, weights, "taid")


__all__ = ["taid", "taid_target"]
