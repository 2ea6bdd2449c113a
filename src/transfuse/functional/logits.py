"""Logit-level distillation losses as pure functions.

Every function takes student and teacher logits whose class dimension is the LAST one;
all leading dimensions (batch, and time for sequences) are positions that the loss
averages over. Teacher logits are used as given: detach them at the call site if the
teacher must not receive gradients (the :class:`~transfuse.distiller.Distiller` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Offset DKD's official code subtracts from the target logit to drop it from a softmax.
_MASK_OFFSET = 1000.0


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, name: str) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{name}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )


def _check_temperature(temperature: float, name: str) -> None:
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def _kl_from_logs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dim, from log-probabilities; 0 * log 0 counts as 0."""
    # exp(log_p) underflows to exactly 0 where p is negligible, so those terms vanish
    # instead of producing 0 * (-inf) = nan.
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's soft-target loss: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    Shapes: ``student_logits`` and ``teacher_logits`` are ``(..., C)``, e.g. ``(B, C)``
    or ``(B, T, C)``. Reduction: summed over classes, averaged over every other position
    (``batchmean`` for ``(B, C)``; the mean over ``B*T`` tokens for ``(B, T, C)``).
    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures.

    Paper: Hinton et al., Distilling the Knowledge in a Neural Network, 2015,
    https://arxiv.org/abs/1503.02531
    """
    _check_pair(student_logits, teacher_logits, "kd")
    _check_temperature(temperature, "kd")
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # (..., C)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)  # (..., C)
    return temperature**2 * _kl_from_logs(log_p, log_q).mean()


def _binary_logs(logits: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """``log [p_target, 1 - p_target]`` per row, computed in log space so it stays finite."""
    log_z = torch.logsumexp(logits, dim=-1)  # (N,)
    log_target = (logits * gt_mask).sum(-1) - log_z  # (N,)  log p_target
    # log(1 - p_target) = logsumexp over the other classes - logsumexp over all classes;
    # this never evaluates log(0) even when p_target rounds to 1.
    rest = logits.masked_fill(gt_mask.bool(), float("-inf"))  # (N, C)
    log_rest = torch.logsumexp(rest, dim=-1) - log_z  # (N,)
    return torch.stack([log_target, log_rest], dim=-1)  # (N, 2)


def dkd_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *, temperature: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's two terms ``(TCKD, NCKD)``, each multiplied by ``T^2`` and averaged over rows.

    See :func:`dkd` for shapes, the definitions and the paper.
    """
    _check_pair(student_logits, teacher_logits, "dkd")
    _check_temperature(temperature, "dkd")
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError("dkd: needs at least 2 classes (the non-target distribution is empty otherwise)")
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"dkd: target shape {tuple(target.shape)} must equal the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
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
    scale = temperature**2
    return scale * tckd.mean(), scale * nckd.mean()


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD``.

    * TCKD = ``T^2 * KL([p_t, 1-p_t] || [q_t, 1-q_t])``, the binary target-vs-rest
      distributions of teacher (p) and student (q) at temperature ``T``;
    * NCKD = ``T^2 * KL(p_hat || q_hat)`` among the non-target classes, where
      ``p_hat = softmax(z/T - 1000 * onehot(target))``.

    Shapes: logits ``(B, C)`` (or ``(..., C)``), ``target`` ``(B,)`` (or ``(...)``) int64.
    Reduction: summed over classes, averaged over rows. No warm-up here: DKD's warm-up is
    a weight schedule on the term. The binary log-probabilities are computed in log space
    (``logsumexp``), which equals the official code's ``log`` of probabilities but stays
    finite when a probability underflows.

    Paper: Zhao et al., Decoupled Knowledge Distillation, CVPR 2022,
    https://arxiv.org/abs/2203.08679
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature=temperature)
    return alpha * tckd + beta * nckd


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (N, M) -> (N,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
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

    Paper: Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022,
    https://arxiv.org/abs/2205.10536
    """
    _check_pair(student_logits, teacher_logits, "dist")
    _check_temperature(temperature, "dist")
    num_classes = student_logits.shape[-1]
    y_s = F.softmax(student_logits.reshape(-1, num_classes) / temperature, dim=-1)  # (N, C)
    y_t = F.softmax(teacher_logits.reshape(-1, num_classes) / temperature, dim=-1)  # (N, C)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)
