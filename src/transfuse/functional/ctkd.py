"""CTKD's pieces: KD at a temperature tensor, the learnable temperature's range, a gradient reversal.

Paper: Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023,
https://arxiv.org/abs/2211.16231. Written after the authors' code (zhengli97/CTKD):
``distiller_zoo/KD.py`` (``DistillKL`` with a temperature tensor), ``models/temp_global.py``
(the global temperature and the gradient reversal layer) and ``helper/loops.py``
(``temp = t_start + t_end * sigmoid(global_T)``). The learnable parameter and the curriculum
live in the registered module (:class:`transfuse.losses.ctkd.CTKD`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._types import Reduction
from .logits import _check_pair, _check_reduction, _kl_from_logs, _unmasked
from .reduce import _reduce, _weigh


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-strength``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(strength)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (strength,) = ctx.saved_tensors
        return -strength.to(grad.dtype) * grad, None


def reverse_gradient(x: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
    """Gradient reversal (Ganin & Lempitsky, 2015): ``x`` unchanged, its gradient times ``-strength``.

    ``strength`` (CTKD's lambda) is a float or a 0-dim tensor; 0 blocks the gradient, 1
    reverses it. A tensor strength needs no host synchronisation.
    """
    strength = torch.as_tensor(strength, device=x.device).detach()
    return _ReverseGradient.apply(x, strength)


def ctkd_temperature(
    logit: torch.Tensor, *, min_temperature: float = 1.0, temperature_range: float = 20.0
) -> torch.Tensor:
    """CTKD's temperature from its unconstrained parameter: ``min_temperature + temperature_range * sigmoid(logit)``.

    The official code's ``t_start + t_end * sigmoid(global_T)`` with ``t_start=1``,
    ``t_end=20``: the temperature stays in ``(1, 21)``.
    """
    return min_temperature + temperature_range * torch.sigmoid(logit)


def ctkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """KD at a temperature TENSOR: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, differentiable in ``T``.

    ``temperature``: a 0-dim (or one-element) tensor -- CTKD's global temperature -- or one
    temperature per position, shape ``(...)`` (an instance-wise temperature); a float
    works too. The gradient reaches ``T`` through both the softmaxes and the ``T^2``
    factor, as in the official ``DistillKL``. With a constant ``T`` the value equals
    :func:`~transfuse.functional.kd` at ``temperature=T``.

    Shapes: logits ``(..., C)``; the positions are ``(...)``. Reduction (``"mean"``):
    :func:`~transfuse.functional.reduce_positions` with ``mask``/``weights`` (``(...)``
    or a prefix); without them the mean over positions (``batchmean`` for ``(B, C)``).
    ``reduction="none"`` returns the ``(...)`` values (weights applied, masked-out 0).

    Paper: Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023,
    https://arxiv.org/abs/2211.16231
    """
    _check_pair(student_logits, teacher_logits, "ctkd")
    _check_reduction(reduction, "ctkd")
    positions = tuple(student_logits.shape[:-1])
    t = torch.as_tensor(temperature, dtype=student_logits.dtype, device=student_logits.device)
    if t.numel() == 1:
        t = t.reshape(())
    elif tuple(t.shape) != positions:
        raise ValueError(f"ctkd: temperature must be one value or one per position {positions}, got shape {tuple(t.shape)}")
    t_rows = t.unsqueeze(-1) if t.dim() else t  # broadcasts against (..., C)
    log_q = F.log_softmax(student_logits / t_rows, dim=-1)  # (..., C)
    log_p = F.log_softmax(teacher_logits / t_rows, dim=-1)  # (..., C)
    per_position = t**2 * _kl_from_logs(log_p, log_q)  # (...)
    if reduction == "none":
        return _weigh(per_position, mask, weights, "ctkd")
    if _unmasked(mask, weights, per_position):
        return per_position.mean()
    return _reduce(per_position, mask, weights, "ctkd")


__all__ = ["ctkd", "ctkd_temperature", "reverse_gradient"]
