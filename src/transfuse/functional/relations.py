"""Relation-level distillation losses as pure functions.

These transfer how samples in a batch relate to each other (similarities, distances,
angles, contrastive scores) rather than the features themselves, so the student's and
the teacher's widths may differ. Inputs are ``(B, ...)`` and are flattened to ``(B, D)``.

They are batch-relation losses: the value depends on the whole batch, so there is no
per-sample value to weight or to return. ``mask`` (bool ``(B,)``) computes the relation
over the selected samples only (``student_feats[mask]``, ``teacher_feats[mask]``);
``weights`` must be None. An unmasked batch of fewer than 2 samples is an error (a
relation needs two samples: the batch size is misconfigured), while a mask that leaves
fewer than 2 gives a 0 connected to the graph, so one sparse batch does not stop a run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._types import NonNegative, Positive, PositiveInt, Temperature
from .reduce import _refuse_weights, _rows_from_mask


def _select(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The samples a relation is computed over, or None when a mask leaves fewer than 2."""
    _refuse_weights(weights, name)
    if student_feats.shape[0] != teacher_feats.shape[0]:
        raise ValueError(
            f"{name}: student batch {student_feats.shape[0]} and teacher batch {teacher_feats.shape[0]} differ"
        )
    if mask is None:
        return student_feats, teacher_feats
    rows = _rows_from_mask(mask, tuple(student_feats.shape[:1]), name)  # (B,)
    student_feats, teacher_feats = student_feats[rows], teacher_feats[rows.to(teacher_feats.device)]
    return (student_feats, teacher_feats) if student_feats.shape[0] >= 2 else None


def _flat_pair(
    student_feats: torch.Tensor, teacher_feats: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if student_feats.shape[0] != teacher_feats.shape[0]:
        raise ValueError(
            f"{name}: student batch {student_feats.shape[0]} and teacher batch {teacher_feats.shape[0]} differ"
        )
    if student_feats.shape[0] < 2:
        raise ValueError(f"{name}: a relation loss needs a batch of at least 2 samples")
    return student_feats.flatten(1), teacher_feats.flatten(1)  # (B, D_s), (B, D_t)


def _zero(feats: torch.Tensor) -> torch.Tensor:
    """A 0 that keeps the graph (and the autograd bookkeeping of the caller) intact."""
    return (feats * 0).sum()


def _similarity_matrix(feats: torch.Tensor) -> torch.Tensor:
    gram = feats @ feats.t()  # (B, B)
    return F.normalize(gram, p=2, dim=1)  # each row to unit L2 norm


def similarity_preserving(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Similarity-preserving KD: match the row-normalised batch Gram matrices.

    ``G = F F^T`` over flattened features ``F`` of shape ``(B, D)``, each row L2-normalised;
    ``loss = ||G_s - G_t||_F^2 / B^2``.

    Shapes: ``(B, ...)`` each, flattened; ``D`` may differ between student and teacher.
    Reduction: the squared Frobenius norm divided by ``B^2`` (a mean over the ``B x B`` entries).
    ``mask``/``weights``: see the module docstring (batch-relation).

    Paper: Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019,
    https://arxiv.org/abs/1907.09682
    """
    selected = _select(student_feats, teacher_feats, mask, weights, "similarity_preserving")
    if selected is None:
        return _zero(student_feats)
    f_s, f_t = _flat_pair(*selected, "similarity_preserving")
    batch = f_s.shape[0]
    diff = _similarity_matrix(f_s) - _similarity_matrix(f_t)  # (B, B)
    return diff.pow(2).sum() / batch**2


def pairwise_distances(feats: torch.Tensor, *, eps: Positive = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``feats`` ``(B, D)`` -> ``(B, B)``, zero diagonal.

    Built from the Gram matrix (cheap in memory). The diagonal, and squared distances
    below ``eps`` (duplicate samples), are exactly 0 and never pass through ``sqrt``,
    whose gradient at 0 is infinite.
    """
    sq_norms = feats.pow(2).sum(1)  # (B,)
    sq = sq_norms[:, None] + sq_norms[None, :] - 2.0 * feats @ feats.t()  # (B, B)
    # The Gram form leaves rounding noise on the diagonal, so it is zeroed explicitly.
    off_diagonal = ~torch.eye(feats.shape[0], dtype=torch.bool, device=feats.device)
    positive = (sq > eps) & off_diagonal
    return torch.where(positive, sq.clamp_min(eps).sqrt(), torch.zeros_like(sq))


def _mean_normalised_distances(feats: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(feats)  # (B, B)
    nonzero = d > 0
    # Mean over the non-zero pairs (the diagonal and duplicates excluded), as in the paper's code.
    mean = (d * nonzero).sum() / nonzero.sum().clamp_min(1)
    return d / mean.clamp_min(1e-12)


def rkd_distance(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """RKD distance term: smooth-L1 between mean-normalised pairwise distance matrices.

    ``psi_D(i, j) = ||e_i - e_j|| / mu`` with ``mu`` the mean distance over the batch's
    non-zero pairs. Shapes: ``(B, ...)`` each, flattened; widths may differ.
    Reduction: mean over the ``B x B`` entries (Huber with threshold 1).
    ``mask``/``weights``: see the module docstring (batch-relation).

    Paper: Park et al., Relational Knowledge Distillation, CVPR 2019,
    https://arxiv.org/abs/1904.05068
    """
    selected = _select(student_feats, teacher_feats, mask, weights, "rkd_distance")
    if selected is None:
        return _zero(student_feats)
    f_s, f_t = _flat_pair(*selected, "rkd_distance")
    return F.smooth_l1_loss(_mean_normalised_distances(f_s), _mean_normalised_distances(f_t))


def _angles(feats: torch.Tensor) -> torch.Tensor:
    # diff[j, i] = e_i - e_j: the edge from the vertex j to i.
    diff = feats[None, :, :] - feats[:, None, :]  # (B, B, D)
    unit = F.normalize(diff, p=2, dim=2)  # zero vectors (i == j) stay zero
    return unit @ unit.transpose(1, 2)  # (B, B, B): [j, i, k] = cos of the angle at j


def rkd_angle(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """RKD angle term: smooth-L1 between the cosines of all triplet angles.

    ``psi_A(i, j, k) = cos angle(e_i - e_j, e_k - e_j)`` for every triplet (degenerate
    ones, with a repeated index, are 0 in both models). Shapes: ``(B, ...)`` each,
    flattened; widths may differ. Memory is ``O(B^2 D + B^3)``.
    Reduction: mean over the ``B^3`` triplets.
    ``mask``/``weights``: see the module docstring (batch-relation).

    Paper: Park et al., Relational Knowledge Distillation, CVPR 2019,
    https://arxiv.org/abs/1904.05068
    """
    selected = _select(student_feats, teacher_feats, mask, weights, "rkd_angle")
    if selected is None:
        return _zero(student_feats)
    f_s, f_t = _flat_pair(*selected, "rkd_angle")
    return F.smooth_l1_loss(_angles(f_s), _angles(f_t))


def rkd(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    distance_weight: NonNegative = 25.0,
    angle_weight: NonNegative = 50.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relational KD: ``distance_weight * rkd_distance + angle_weight * rkd_angle``.

    Shapes: ``(B, ...)`` each; widths may differ. A zero weight skips that term's work.
    ``mask``/``weights``: see the module docstring (batch-relation); the mask is applied
    once, before both terms.

    Paper: Park et al., Relational Knowledge Distillation, CVPR 2019,
    https://arxiv.org/abs/1904.05068
    """
    selected = _select(student_feats, teacher_feats, mask, weights, "rkd")
    if selected is None:
        return _zero(student_feats)
    if mask is not None:
        student_feats, teacher_feats = selected
    loss = student_feats.new_zeros(())
    if distance_weight:
        loss = loss + distance_weight * rkd_distance(student_feats, teacher_feats)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle(student_feats, teacher_feats)
    return loss


def _conditional_probs(feats: torch.Tensor, eps: float) -> torch.Tensor:
    unit = feats / (feats.norm(dim=1, keepdim=True) + eps)  # (B, D)
    kernel = (unit @ unit.t() + 1.0) / 2.0  # cosine mapped to [0, 1]
    return kernel / kernel.sum(dim=1, keepdim=True)  # (B, B): rows sum to 1


def pkt(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    eps: Positive = 1e-7,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probabilistic knowledge transfer: KL between the batch's similarity distributions.

    With ``K(a, b) = (cos(a, b) + 1) / 2`` and ``P[i, j] = K(f_i, f_j) / sum_j K(f_i, f_j)``,
    ``loss = sum_{i, j} P_t[i, j] * log((P_t[i, j] + eps) / (P_s[i, j] + eps)) / B^2``.

    Shapes: ``(B, ...)`` each, flattened; widths may differ.
    Reduction: the mean over the ``B x B`` entries, as in the paper's code (the code base
    the default weight 30000 comes from); this equals the mean per-row KL divided by ``B``.
    ``mask``/``weights``: see the module docstring (batch-relation).

    Paper: Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge
    Transfer, ECCV 2018, https://arxiv.org/abs/1803.10837
    """
    selected = _select(student_feats, teacher_feats, mask, weights, "pkt")
    if selected is None:
        return _zero(student_feats)
    f_s, f_t = _flat_pair(*selected, "pkt")
    p_s = _conditional_probs(f_s, eps)  # (B, B)
    p_t = _conditional_probs(f_t, eps)  # (B, B)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def crd_scores(
    anchor: torch.Tensor, memory: torch.Tensor, index: torch.Tensor, *, temperature: Temperature = 0.07
) -> torch.Tensor:
    """CRD's unnormalised scores ``exp(<anchor_b, memory[index[b, j]]> / T)``.

    Shapes: ``anchor`` ``(B, F)`` (L2-normalised embeddings of one model), ``memory``
    ``(N, F)`` (the other model's memory bank), ``index`` ``(B, 1 + K)`` rows of ``memory``
    per sample, its positive first -> ``(B, 1 + K)``. Computed in float32 (``exp(1/0.07)``
    overflows float16). When the bank is small next to ``(1 + K) * F`` one ``(B, N)``
    product is cheaper in memory than gathering ``B * (1 + K)`` rows; both give the same
    values. ``memory`` is read, never written, and receives no gradient.

    Paper: Tian et al., Contrastive Representation Distillation, ICLR 2020,
    https://arxiv.org/abs/1910.10699
    """
    anchor = anchor.float()
    memory = memory.detach().float()
    num_rows, feat_dim = memory.shape
    if num_rows <= index.shape[1] * feat_dim:
        logits = (anchor @ memory.t()).gather(1, index)  # (B, N) -> (B, 1 + K)
    else:
        candidates = memory[index]  # (B, 1 + K, F)
        logits = torch.bmm(candidates, anchor.unsqueeze(2)).squeeze(2)  # (B, 1 + K)
    return torch.exp(logits / temperature)


def crd_nce_loss(probs: torch.Tensor, *, num_data: PositiveInt, eps: Positive = 1e-7) -> torch.Tensor:
    """CRD's NCE loss from estimated probabilities ``P = exp(s / T) / Z``.

    With ``K`` negatives per sample and the noise distribution uniform over the data,
    ``Pn = 1 / num_data``:
    ``loss = -mean_b [ log(P_pos / (P_pos + K Pn)) + sum_k log(K Pn / (P_neg_k + K Pn)) ]``.
    ``eps`` is added to the denominators (as the paper's code does).

    Shapes: ``probs`` ``(B, 1 + K)``, positive first. Reduction: mean over the batch.

    Paper: Tian et al., Contrastive Representation Distillation, ICLR 2020,
    https://arxiv.org/abs/1910.10699
    """
    num_neg = probs.shape[1] - 1
    if num_neg < 1:
        raise ValueError("crd_nce_loss: needs at least one negative per sample")
    noise = num_neg / float(num_data)  # K * Pn
    p_pos, p_neg = probs[:, 0], probs[:, 1:]  # (B,), (B, K)
    log_d1 = torch.log(p_pos / (p_pos + noise + eps))  # (B,): log P(data | positive)
    log_d0 = torch.log(noise / (p_neg + noise + eps))  # (B, K): log P(noise | negative)
    return -(log_d1 + log_d0.sum(1)).mean()
