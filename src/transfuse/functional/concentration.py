"""Knowledge Concentration's pure pieces: top-K soft targets from a specialist, the
sigmoid cross-entropy with those targets, and the self-paced rescaling of the student's
logits.

Paper: Gao, Guo, Li, Nevatia, Knowledge Concentration: Learning 100K Object Classifiers
in a Single CNN, 2017, https://arxiv.org/abs/1711.07607 (no official code). The
registered loss (``concentration``, :mod:`transfuse.losses.concentration`) holds the
learnable scale per vertical (class group) and routes each sample to its vertical's
scale; the specialist of the sample's vertical is picked by a ``by_class_group`` source.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from ._types import PositiveInt, Reduction, Temperature
from .reduce import _reduce, _weigh

__all__ = [
    "TEACHER_ACTIVATIONS", "knowledge_concentration", "self_paced_logits", "sigmoid_soft_bce", "teacher_probabilities",
    "top_k_soft_targets",
]

#: How a specialist's logits become per-class probabilities.
TeacherActivation = Literal["softmax", "sigmoid"]
TEACHER_ACTIVATIONS: tuple[str, ...] = ("softmax", "sigmoid")


def top_k_soft_targets(teacher_probs: torch.Tensor, *, top_k: PositiveInt = 100) -> torch.Tensor:
    """The teacher's probabilities kept at its ``top_k`` most probable classes, 0 elsewhere.

    Shapes: ``teacher_probs`` ``(..., C)`` -> ``(..., C)``. With ``top_k >= C`` every
    probability is kept. Ties at the K-th value are broken by :func:`torch.topk` (one of
    the tied classes is kept). The paper keeps K = 100 of its specialists' classes, so
    that a specialist's near-zero tail over thousands of classes is not distilled.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k_soft_targets: top_k must be an int >= 1, got {top_k!r}")
    num_classes = teacher_probs.shape[-1]
    if top_k >= num_classes:
        return teacher_probs
    kept = teacher_probs.topk(top_k, dim=-1).indices  # (..., K)
    keep = torch.zeros_like(teacher_probs, dtype=torch.bool).scatter_(-1, kept, True)  # (..., C)
    return torch.where(keep, teacher_probs, torch.zeros((), dtype=teacher_probs.dtype, device=teacher_probs.device))


def sigmoid_soft_bce(
    student_logits: torch.Tensor,
    soft_targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Sigmoid cross-entropy with soft targets, summed over classes, averaged over positions.

    Per position: ``-sum_j [z_j log sigmoid(x_j) + (1 - z_j) log(1 - sigmoid(x_j))]``,
    every class an independent binary problem (computed stably from the logits).
    Shapes: ``student_logits`` and ``soft_targets`` ``(..., C)``, targets in ``[0, 1]``;
    positions ``(...)``. Reduction (``"mean"``): :func:`~transfuse.functional.reduce_positions`
    over the positions with ``mask``/``weights`` (``(...)`` or a prefix), i.e. the paper's
    ``1/N_b`` over the batch; ``"none"`` returns the ``(...)`` values (weights applied,
    masked-out 0). Not 0 when ``sigmoid(x) = z``: it is a cross-entropy, whose minimum is
    the targets' own binary entropy.
    """
    if student_logits.shape != soft_targets.shape:
        raise ValueError(
            f"sigmoid_soft_bce: student logits {tuple(student_logits.shape)} and soft targets "
            f"{tuple(soft_targets.shape)} must have the same shape"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"sigmoid_soft_bce: reduction must be 'mean' or 'none', got {reduction!r}")
    per_class = F.binary_cross_entropy_with_logits(student_logits.float(), soft_targets.float(), reduction="none")
    values = per_class.sum(-1)  # (...)
    if reduction == "none":
        return _weigh(values, mask, weights, "sigmoid_soft_bce")
    return _reduce(values, mask, weights, "sigmoid_soft_bce")


def self_paced_logits(logits: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """``scale * x / ||x||_2``: each position's logit vector L2-normalised, times its scale.

    Shapes: ``logits`` ``(..., C)``; ``scale`` ``(...)`` (one value per position, e.g.
    the learnable scale of the sample's vertical) or a scalar -> ``(..., C)``. A zero
    vector stays zero (its norm is clamped to ``eps``). Gradients reach both ``logits``
    and ``scale``. Scaling a vector by a positive number keeps its ranking, so the
    student's plain argmax is the argmax of the rescaled logits.
    """
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"self_paced_logits: eps must be finite and > 0, got {eps}")
    scale = torch.as_tensor(scale, dtype=logits.dtype, device=logits.device)
    if scale.dim() and tuple(scale.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"self_paced_logits: scale of shape {tuple(scale.shape)} must be a scalar or one value per position "
            f"{tuple(logits.shape[:-1])}"
        )
    return F.normalize(logits, p=2.0, dim=-1, eps=eps) * scale.unsqueeze(-1)


def teacher_probabilities(
    teacher_logits: torch.Tensor, *, temperature: float, activation: TeacherActivation
) -> torch.Tensor:
    """A specialist's per-class probabilities ``(..., C)`` at ``temperature``."""
    if activation not in TEACHER_ACTIVATIONS:
        raise ValueError(f"teacher_activation must be one of {', '.join(TEACHER_ACTIVATIONS)}; got {activation!r}")
    scaled = teacher_logits.float() / temperature
    return torch.sigmoid(scaled) if activation == "sigmoid" else torch.softmax(scaled, dim=-1)


def knowledge_concentration(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    top_k: PositiveInt = 100,
    temperature: Temperature = 1.0,
    teacher_activation: TeacherActivation = "softmax",
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Knowledge Concentration's student loss against the specialist of each sample's vertical.

    ``-(1/N_b) sum_i sum_j [z*_ij log sigmoid(x_ij) + (1 - z*_ij) log(1 - sigmoid(x_ij))]``
    where ``z*_i`` are the specialist's probabilities (``teacher_activation`` of
    ``teacher_logits / temperature``) kept at its ``top_k`` classes and 0 elsewhere
    (:func:`top_k_soft_targets`), and ``x_i`` are the student's logits -- or, with
    ``scale`` (self-paced learning), ``scale_i * x_i / ||x_i||`` (:func:`self_paced_logits`),
    ``scale_i`` being the learnable scale of sample ``i``'s vertical.

    Shapes: ``student_logits``, ``teacher_logits`` ``(..., C)`` (the teacher's row of
    each position is already the specialist of its vertical); ``scale`` ``(...)`` or
    None; positions ``(...)``. Reduction: as :func:`sigmoid_soft_bce` (sum over classes,
    :func:`~transfuse.functional.reduce_positions` over positions with ``mask`` and
    ``weights``). Gradients reach the student's logits and ``scale``; the teacher is used
    as given (detach it at the call site).

    Paper: Gao et al., Knowledge Concentration: Learning 100K Object Classifiers in a
    Single CNN, 2017, https://arxiv.org/abs/1711.07607 (K = 100; specialists trained
    with sigmoid cross-entropy, so ``teacher_activation="sigmoid"`` reads them as the
    paper does; ``"softmax"`` suits specialists trained with softmax cross-entropy).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"knowledge_concentration: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"knowledge_concentration: temperature must be finite and > 0, got {temperature}")
    probs = teacher_probabilities(teacher_logits, temperature=temperature, activation=teacher_activation)  # (..., C)
    targets = top_k_soft_targets(probs, top_k=top_k)  # (..., C), z*
    inputs = student_logits.float() if scale is None else self_paced_logits(student_logits.float(), scale)
    return sigmoid_soft_bce(inputs, targets, mask=mask, weights=weights, reduction=reduction)
