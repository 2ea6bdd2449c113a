"""Logit-level distillation losses as pure functions.

Every function takes logits whose class dimension is the LAST one; all leading dimensions
(batch, and time for sequences) are positions. The position-wise losses (:func:`kd`,
:func:`dkd`, :func:`cross_entropy`) compute one value per position and reduce them with
:func:`~transfuse.functional.reduce_positions` (``mask``, ``weights``), or return them
with ``reduction="none"``. :func:`dist` is a batch-relation loss: its intra-class term
correlates across the positions, so a mask selects rows and weights are refused.

Teacher logits are used as given: detach them at the call site if the teacher must not
receive gradients (the :class:`~transfuse.distiller.Distiller` does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._types import LabelSmoothing, NonNegative, Reduction, Temperature
from .reduce import _checked, _reduce, _refuse_weights, _rows_from_mask, _weigh

#: Offset DKD's official code subtracts from the target logit to drop it from a softmax.
_MASK_OFFSET = 1000.0


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, name: str) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{name}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )


def _check_temperature(temperature: float, name: str) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{name}: temperature must be finite and > 0, got {temperature}")


def _check_reduction(reduction: str, name: str) -> None:
    if reduction not in ("mean", "none"):
        raise ValueError(f"{name}: reduction must be 'mean' or 'none', got {reduction!r}")


def _unmasked(mask: torch.Tensor | None, weights: torch.Tensor | None, values: torch.Tensor) -> bool:
    """True where a loss keeps the arithmetic it had before masks existed (and values are not empty).

    That fast path is what keeps unmasked results bit-identical to earlier releases (and
    so the published benchmark numbers); ``reduce_positions`` may round differently.
    """
    return mask is None and weights is None and values.numel() > 0


def _check_target(student_logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    """Refuse a ``target`` that is not integer class ids of the logits' leading shape.

    Every loss that takes a ``target`` calls this. The losses cast it with ``.long()``,
    which would silently truncate a floating-point target (0.5 -> class 0, 1.2 -> class 1),
    so float, complex and bool dtypes are refused rather than guessed at.
    """
    dtype = target.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(
            f"{name}: target must hold integer class ids; got dtype {dtype} "
            f"(convert whole-number labels with target.long())"
        )
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"{name}: target shape {tuple(target.shape)} must equal the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )


def _usable_target(target: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """``target`` with masked-out entries set to class 0.

    Unlabelled or padded positions often carry a placeholder (-1) that would make
    ``one_hot``/``cross_entropy`` raise; their values are dropped by the mask anyway.
    """
    if mask is None:
        return target
    mask_b, _ = _checked(target, mask, None, name)
    return torch.where(mask_b, target, torch.zeros((), dtype=target.dtype, device=target.device))


def _kl_from_logs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dim, from log-probabilities; 0 * log 0 counts as 0."""
    # exp(log_p) underflows to exactly 0 where p is negligible, so those terms vanish
    # instead of producing 0 * (-inf) = nan.
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: Temperature = 4.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Hinton's soft-target loss: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    Shapes: ``student_logits`` and ``teacher_logits`` are ``(..., C)``, e.g. ``(B, C)``
    or ``(B, T, C)``; the positions are ``(...)``. Per position: summed over classes,
    times ``T^2`` (which keeps gradient magnitudes comparable across temperatures).
    Reduction (``"mean"``): :func:`~transfuse.functional.reduce_positions` over the
    positions with ``mask``/``weights`` (``(...)`` or a prefix, e.g. ``(B,)``); without
    them ``batchmean`` for ``(B, C)`` and the mean over ``B*T`` tokens for ``(B, T, C)``.
    ``reduction="none"`` returns the ``(...)`` values (weights applied, masked-out 0).
    No positions give 0.

    Paper: Hinton et al., Distilling the Knowledge in a Neural Network, 2015,
    https://arxiv.org/abs/1503.02531
    """
    _check_pair(student_logits, teacher_logits, "kd")
    _check_temperature(temperature, "kd")
    _check_reduction(reduction, "kd")
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # (..., C)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)  # (..., C)
    per_position = _kl_from_logs(log_p, log_q)  # (...)
    if reduction == "none":
        return _weigh(temperature**2 * per_position, mask, weights, "kd")
    if _unmasked(mask, weights, per_position):
        return temperature**2 * per_position.mean()
    return _reduce(temperature**2 * per_position, mask, weights, "kd")


def _binary_logs(logits: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """``log [p_target, 1 - p_target]`` per row, computed in log space so it stays finite."""
    log_z = torch.logsumexp(logits, dim=-1)  # (N,)
    log_target = (logits * gt_mask).sum(-1) - log_z  # (N,)  log p_target
    # log(1 - p_target) = logsumexp over the other classes - logsumexp over all classes;
    # this never evaluates log(0) even when p_target rounds to 1.
    rest = logits.masked_fill(gt_mask.bool(), float("-inf"))  # (N, C)
    log_rest = torch.logsumexp(rest, dim=-1) - log_z  # (N,)
    return torch.stack([log_target, log_rest], dim=-1)  # (N, 2)


def _dkd_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's unscaled TCKD and NCKD per row: two ``(N,)`` tensors, ``N`` = the positions flattened."""
    _check_pair(student_logits, teacher_logits, "dkd")
    _check_temperature(temperature, "dkd")
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError("dkd: needs at least 2 classes (the non-target distribution is empty otherwise)")
    _check_target(student_logits, target, "dkd")
    z_s = student_logits.reshape(-1, num_classes) / temperature  # (N, C)
    z_t = teacher_logits.reshape(-1, num_classes) / temperature  # (N, C)
    gt_mask = F.one_hot(target.reshape(-1).long(), num_classes).to(z_s.dtype)  # (N, C)

    # Target-class KD: KL between the binary (target, not-target) distributions.
    tckd = _kl_from_logs(_binary_logs(z_t, gt_mask), _binary_logs(z_s, gt_mask))  # (N,)
    # Non-target-class KD: KL among the other classes, target dropped by a large offset
    # (as the official code does) so the remaining probabilities renormalise.
    log_p_nt = F.log_softmax(z_t - _MASK_OFFSET * gt_mask, dim=-1)  # (N, C)
    log_q_nt = F.log_softmax(z_s - _MASK_OFFSET * gt_mask, dim=-1)  # (N, C)
    nckd = _kl_from_logs(log_p_nt, log_q_nt)  # (N,)
    return tckd, nckd


def dkd_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: Temperature = 4.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's two terms ``(TCKD, NCKD)``, each multiplied by ``T^2`` and reduced over the positions.

    See :func:`dkd` for shapes, the definitions, ``mask``/``weights``/``reduction`` and
    the paper; each term is reduced on its own.
    """
    _check_reduction(reduction, "dkd")
    _check_target(student_logits, target, "dkd")
    target = _usable_target(target, mask, "dkd")
    tckd, nckd = _dkd_rows(student_logits, teacher_logits, target, temperature)  # (N,), (N,)
    scale = temperature**2
    if reduction == "none":
        return (
            _weigh(scale * tckd.reshape(target.shape), mask, weights, "dkd"),
            _weigh(scale * nckd.reshape(target.shape), mask, weights, "dkd"),
        )
    if _unmasked(mask, weights, tckd):
        return scale * tckd.mean(), scale * nckd.mean()
    return (
        _reduce(scale * tckd.reshape(target.shape), mask, weights, "dkd"),
        _reduce(scale * nckd.reshape(target.shape), mask, weights, "dkd"),
    )


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: NonNegative = 1.0,
    beta: NonNegative = 8.0,
    temperature: Temperature = 4.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD``.

    * TCKD = ``T^2 * KL([p_t, 1-p_t] || [q_t, 1-q_t])``, the binary target-vs-rest
      distributions of teacher (p) and student (q) at temperature ``T``;
    * NCKD = ``T^2 * KL(p_hat || q_hat)`` among the non-target classes, where
      ``p_hat = softmax(z/T - 1000 * onehot(target))``.

    Shapes: logits ``(B, C)`` (or ``(..., C)``), ``target`` ``(B,)`` (or ``(...)``) int64;
    the positions are ``(...)``. Per position: summed over classes. Reduction
    (``"mean"``): :func:`~transfuse.functional.reduce_positions` with ``mask``/``weights``
    (``(...)`` or a prefix); without them, the mean over rows of each term.
    ``reduction="none"`` returns ``alpha * TCKD + beta * NCKD`` per position ``(...)``
    (weights applied, masked-out 0); masked-out positions may hold any placeholder
    target. No positions give 0. No warm-up here: DKD's warm-up
    is a weight schedule on the term. The binary log-probabilities are computed in log
    space (``logsumexp``), which equals the official code's ``log`` of probabilities but
    stays finite when a probability underflows.

    Paper: Zhao et al., Decoupled Knowledge Distillation, CVPR 2022,
    https://arxiv.org/abs/2203.08679
    """
    _check_reduction(reduction, "dkd")
    _check_target(student_logits, target, "dkd")
    target = _usable_target(target, mask, "dkd")
    tckd, nckd = _dkd_rows(student_logits, teacher_logits, target, temperature)  # (N,), (N,)
    scale = temperature**2
    if _unmasked(mask, weights, tckd) and reduction == "mean":
        # Today's arithmetic: each term averaged first, then weighted (see _unmasked).
        return alpha * (scale * tckd.mean()) + beta * (scale * nckd.mean())
    per_position = (alpha * (scale * tckd) + beta * (scale * nckd)).reshape(target.shape)  # (...)
    if reduction == "none":
        return _weigh(per_position, mask, weights, "dkd")
    return _reduce(per_position, mask, weights, "dkd")


def cross_entropy(
    student_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: LabelSmoothing = 0.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Cross-entropy between the student's logits and the labels (no teacher).

    ``label_smoothing`` mixes the one-hot target with the uniform distribution.
    Shapes: logits ``(..., C)``, ``target`` ``(...)`` integer class indices; the positions
    are ``(...)``. Reduction (``"mean"``): :func:`~transfuse.functional.reduce_positions`
    with ``mask``/``weights`` (``(...)`` or a prefix); without them exactly
    ``F.cross_entropy`` on the flattened positions (where a target of ``-100`` is
    ignored, as torch does). On the masked path give padding by ``mask``, not ``-100``;
    masked-out positions may hold any placeholder target (e.g. -1 for "unlabelled").
    ``reduction="none"`` returns the ``(...)`` values (weights applied, masked-out 0).
    No positions give 0.

    Paper (label smoothing): Szegedy et al., Rethinking the Inception Architecture for
    Computer Vision, CVPR 2016, https://arxiv.org/abs/1512.00567
    """
    _check_reduction(reduction, "cross_entropy")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    _check_target(student_logits, target, "cross_entropy")
    target = _usable_target(target, mask, "cross_entropy")
    num_classes = student_logits.shape[-1]
    flat_logits = student_logits.reshape(-1, num_classes)  # (N, C)
    flat_target = target.reshape(-1).long()  # (N,)
    if reduction == "mean" and _unmasked(mask, weights, flat_target):
        return F.cross_entropy(flat_logits, flat_target, label_smoothing=label_smoothing)
    per_position = F.cross_entropy(
        flat_logits, flat_target, label_smoothing=label_smoothing, reduction="none"
    ).reshape(target.shape)  # (...)
    if reduction == "none":
        return _weigh(per_position, mask, weights, "cross_entropy")
    return _reduce(per_position, mask, weights, "cross_entropy")


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (N, M) -> (N,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: NonNegative = 1.0,
    gamma: NonNegative = 1.0,
    temperature: Temperature = 1.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DIST: match the teacher's predictions by correlation rather than exact values.

    With ``y = softmax(z / T)`` of shape ``(N, C)``:

    * inter-class = ``1 - mean_i pearson(y_s[i, :], y_t[i, :])`` (each sample's ranking of classes);
    * intra-class = ``1 - mean_c pearson(y_s[:, c], y_t[:, c])`` (each class's ranking of samples);
    * loss = ``T^2 * (beta * inter + gamma * intra)``.

    Pearson is the cosine similarity of mean-centred vectors with ``1e-8`` added to the
    denominator. Shapes: logits ``(B, C)``; ``(..., C)`` is flattened to ``(N, C)`` first,
    so the intra-class term then correlates over all ``N`` positions. The loss is
    invariant to adding a constant to a row of logits and lies in ``[0, 2T^2(beta+gamma)]``.

    A batch-relation loss (the intra-class term depends on the whole batch): ``mask``, a
    bool ``(B,)`` (or any prefix of the leading shape, e.g. ``(B, T)``), selects the rows
    the correlations are computed over; ``weights`` must be None (ValueError otherwise).
    No rows (an empty batch, or a mask that keeps nothing) give a graph-connected 0.
    A single row is computed as it is (its intra-class correlation is 0, so that term is 1).

    Paper: Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022,
    https://arxiv.org/abs/2205.10536
    """
    _check_pair(student_logits, teacher_logits, "dist")
    _check_temperature(temperature, "dist")
    _refuse_weights(weights, "dist")
    num_classes = student_logits.shape[-1]
    z_s = student_logits.reshape(-1, num_classes)  # (N, C)
    z_t = teacher_logits.reshape(-1, num_classes)  # (N, C)
    if mask is not None:
        rows = _rows_from_mask(mask, tuple(student_logits.shape[:-1]), "dist")  # (N,)
        z_s, z_t = z_s[rows], z_t[rows]
    if z_s.shape[0] == 0:
        return (z_s * 0).sum()
    y_s = F.softmax(z_s / temperature, dim=-1)  # (N, C)
    y_t = F.softmax(z_t / temperature, dim=-1)  # (N, C)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)
