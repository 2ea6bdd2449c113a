"""Online distillation losses: both sides train, so the loss decides who moves towards whom.

:func:`bdkd` is the student's loss of BD-KD (Amara et al., 2022): per position a weighted
sum of the forward KL ``KL(p || q)`` and the reverse KL ``KL(q || p)`` between the
teacher's ``p`` and the student's ``q`` softened predictions, the weight coming from the
gap between their entropies (:func:`bdkd_weights`). The teacher's side of BD-KD, the
reverse KL ``KL(q || p)`` trained into the teacher, is plain :func:`~transfuse.functional.kd`
with the roles swapped (input: the teacher's logits, target: the student's).

Like every position-wise loss here, :func:`bdkd` takes logits whose class dimension is the
LAST one, computes one value per position and reduces them with
:func:`~transfuse.functional.reduce_positions` (``mask``, ``weights``), or returns them
with ``reduction="none"``. Teacher logits are used as given: the
:class:`~transfuse.distiller.Distiller` detaches them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._types import Positive, Reduction, Temperature
from .logits import _check_pair, _check_reduction, _check_temperature, _kl_from_logs, _unmasked
from .reduce import _reduce, _weigh

PAPER = ("Amara et al., BD-KD: Balancing the Divergences for Online Knowledge Distillation, 2022, "
         "https://arxiv.org/abs/2212.12965")


def entropy(logits: torch.Tensor, *, temperature: Temperature = 1.0) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits / T)`` over the last dim: ``(..., C)`` -> ``(...)``.

    Computed from log-probabilities (in at least float32), so a class whose probability
    underflows to 0 contributes exactly 0 (never ``0 * -inf``).
    """
    _check_temperature(temperature, "entropy")
    # At least float32 (a bf16 entropy is too coarse to compare); float64 stays float64.
    log_p = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def _check_sharpness(sharpness: float) -> None:
    if not (sharpness > 0 and math.isfinite(sharpness)):
        raise ValueError(f"bdkd: sharpness must be finite and > 0, got {sharpness}")


def bdkd_weights(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
    sharpness: Positive = 10.0,
) -> torch.Tensor:
    """BD-KD's per-position weight of the forward KL: ``w = sigmoid(sharpness * (H(p) - H(q)))``.

    ``p = softmax(teacher / T)``, ``q = softmax(student / T)``, entropies in nats
    (:func:`entropy`). Shapes: ``(..., C)`` each -> ``(...)``, values in ``[0, 1]``,
    non-decreasing in the entropy gap ``H(p) - H(q)``:

    * the student more confident than the teacher (``H(q) < H(p)``, over-confident): ``w -> 1``,
      the forward, mode-covering ``KL(p || q)``, which spreads the student's mass over the
      teacher's classes;
    * the student less confident (``H(q) > H(p)``, under-confident): ``w -> 0``, the reverse,
      mode-seeking ``KL(q || p)``, which sharpens it onto the teacher's modes;
    * equal entropies: ``w = 1/2``, the symmetric (Jeffreys) divergence halved.

    ``sharpness`` (per nat) sets how fast the weight switches: a gap of 0.1 nat gives
    0.73 at the default 10, and ``sharpness -> inf`` is the hard switch. The weights are
    returned detached: they choose the divergence, they are not trained through.

    Reconstruction: the paper (arXiv 2212.12965, section 3) weights forward and reverse KL
    per sample from the gap between the teacher's and the student's entropies; its exact
    weighting function could not be consulted (and no official code is known), so this
    smooth switch, its ``sharpness`` and its default are ours.
    """
    _check_pair(student_logits, teacher_logits, "bdkd")
    _check_temperature(temperature, "bdkd")
    _check_sharpness(sharpness)
    with torch.no_grad():
        gap = entropy(teacher_logits, temperature=temperature) - entropy(student_logits, temperature=temperature)
        return torch.sigmoid(sharpness * gap)


def bdkd_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T^2 KL(p || q), T^2 KL(q || p))`` per position ``(...)``: the forward and the reverse
    KL between the teacher's ``p`` and the student's ``q`` at temperature ``T``, unreduced."""
    _check_pair(student_logits, teacher_logits, "bdkd")
    _check_temperature(temperature, "bdkd")
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # (..., C) student
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)  # (..., C) teacher
    scale = temperature**2
    return scale * _kl_from_logs(log_p, log_q), scale * _kl_from_logs(log_q, log_p)


def bdkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
    sharpness: Positive = 10.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """BD-KD's student distillation loss: ``w * KL(p || q) + (1 - w) * KL(q || p)``, per position.

    ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``; both KLs are summed over
    classes and multiplied by ``T^2`` (as :func:`~transfuse.functional.kd`); ``w`` is
    :func:`bdkd_weights` (``sigmoid(sharpness * (H(p) - H(q)))``, detached): mostly
    forward KL where the student is over-confident relative to the teacher, mostly reverse
    KL where it is under-confident. Zero where ``p == q``; never negative. The student's
    full BD-KD objective adds its cross-entropy with the labels (a separate ``ce`` term).

    Shapes: ``student_logits`` and ``teacher_logits`` ``(..., C)``, e.g. ``(B, C)`` or
    ``(B, T, C)``; the positions are ``(...)``. Reduction (``"mean"``):
    :func:`~transfuse.functional.reduce_positions` with ``mask``/``weights`` (``(...)`` or
    a prefix, e.g. ``(B,)``); without them the mean over the positions.
    ``reduction="none"`` returns the ``(...)`` values (weights applied, masked-out 0).
    No positions give 0.

    Reconstruction: the per-sample balance ``w`` follows the paper's description
    (section 3: forward and reverse KL weighted per sample by the teacher-student entropy
    gap), not its exact formula, which could not be consulted; see :func:`bdkd_weights`.
    The temperature default 1 is ours (as deep mutual learning's).

    Paper: Amara et al., BD-KD: Balancing the Divergences for Online Knowledge
    Distillation, 2022, https://arxiv.org/abs/2212.12965
    """
    _check_reduction(reduction, "bdkd")
    w = bdkd_weights(student_logits, teacher_logits, temperature=temperature, sharpness=sharpness)  # (...)
    forward, reverse = bdkd_parts(student_logits, teacher_logits, temperature=temperature)  # (...), (...)
    per_position = w * forward + (1.0 - w) * reverse  # (...)
    if reduction == "none":
        return _weigh(per_position, mask, weights, "bdkd")
    if _unmasked(mask, weights, per_position):
        return per_position.mean()
    return _reduce(per_position, mask, weights, "bdkd")


__all__ = ["bdkd", "bdkd_parts", "bdkd_weights", "entropy"]
