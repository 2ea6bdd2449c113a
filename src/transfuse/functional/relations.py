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

    Which features: the official code (RepDistiller ``feat[-2]``, mdistiller ``feats[-1]``)
    compares the last stage's map before pooling, ``(B, C, H, W)`` flattened; the zoo
    models name it ``map_layer`` (an MLP, which has no map, its last hidden layer).

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


def _edges(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv, gram)``, both ``(B, B)``: ``1 / ||e_i - e_j||`` (0 on degenerate edges) and ``E E^T``.

    ``E`` is centred first: every difference ``e_i - e_j`` is unchanged, and the Gram
    expansions below lose less to cancellation. Edges shorter than ``1e-6`` (``i == j``,
    duplicate samples) get ``inv = 0``, never ``1 / sqrt(0)``: their unit vector is 0, as
    ``F.normalize`` makes it in the straightforward form.
    """
    feats = feats.float() if feats.dtype in (torch.float16, torch.bfloat16) else feats
    centred = feats - feats.mean(0, keepdim=True)  # (B, D)
    gram = centred @ centred.t()  # (B, B)
    diag = gram.diagonal()  # (B,): squared norms
    sq = diag[:, None] + diag[None, :] - 2.0 * gram  # (B, B): squared edge lengths
    off_diagonal = ~torch.eye(feats.shape[0], dtype=torch.bool, device=feats.device)
    edge = (sq > 1e-12) & off_diagonal
    inv = torch.where(edge, sq.clamp_min(1e-12).rsqrt(), torch.zeros_like(sq))  # (B, B)
    return inv, gram


def _cosines(inv: torch.Tensor, gram: torch.Tensor, rows: slice) -> torch.Tensor:
    """``(J, B, B)``: ``[j, i, k] = <u_ji, u_jk>`` for the vertices ``j`` in ``rows``, ``u_ji`` the
    unit vector from ``e_j`` to ``e_i``.

    ``<e_i - e_j, e_k - e_j> = G_ik - G_ji - G_jk + G_jj``, so with ``a = inv[j]`` the
    cosines are ``a a^T * G - v a^T - a v^T``, ``v_i = a_i (G_ji - G_jj / 2)``: one
    elementwise product and one rank-2 batched update, no ``(B, B, D)`` differences.
    """
    a = inv[rows]  # (J, B)
    g_rows = gram[rows]  # (J, B)
    g_jj = gram.diagonal()[rows]  # (J,)
    v = a * (g_rows - 0.5 * g_jj[:, None])  # (J, B)
    cos = a[:, :, None] * gram[None]  # (J, B, B)
    cos *= a[:, None, :]
    return cos.baddbmm_(torch.stack([v, a], 2), torch.stack([a, v], 1), alpha=-1)  # - (v a^T + a v^T)


def _cosine_grads(
    w: torch.Tensor, inv: torch.Tensor, gram: torch.Tensor, rows: slice, d_inv: torch.Tensor, d_gram: torch.Tensor
) -> None:
    """Add ``sum_{j in rows, i, k} w[j, i, k] * d cos[j, i, k]`` w.r.t. ``inv`` and ``gram`` into
    ``d_inv``/``d_gram`` (``w`` is symmetric in ``i, k``, as the cosines are)."""
    a = inv[rows]  # (J, B)
    g_rows = gram[rows]  # (J, B)
    g_jj = gram.diagonal()[rows]  # (J,)
    # r_ji = sum_k w_jik a_jk,  s_ji = sum_k w_jik a_jk G_jk,  t_ji = sum_k w_jik G_ik a_jk
    rs = torch.bmm(w, torch.stack([a, a * g_rows], 2))  # (J, B, 2)
    r, s = rs[..., 0], rs[..., 1]
    t = torch.bmm(w * gram[None], a[:, :, None]).squeeze(2)  # (J, B)
    # cos_jik = a_ji a_jk (G_ik - G_ji - G_jk + G_jj); i and k enter symmetrically.
    d_inv[rows] += 2.0 * (t - g_rows * r - s + g_jj[:, None] * r)
    weighted = w * a[:, :, None]
    weighted *= a[:, None, :]
    d_gram += weighted.sum(0)  # the G_ik term
    d_gram[rows] -= 2.0 * a * r  # the G_ji and G_jk terms
    idx = torch.arange(d_gram.shape[0], device=d_gram.device)[rows]
    d_gram[idx, idx] += (a * r).sum(1)  # the G_jj term


class _AngleLoss(torch.autograd.Function):
    """``mean_{j,i,k} huber(cos_s[j,i,k] - cos_t[j,i,k])`` from each side's ``(inv, gram)``.

    The ``B^3`` cosines are built a block of vertices at a time and never stored: the
    forward pass accumulates the value and, while a block is in cache, its gradient
    w.r.t. the four ``(B, B)`` inputs; the backward pass only scales it. Huber (smooth L1,
    threshold 1): with ``d = cos_s - cos_t`` and ``w = clamp(d, -1, 1)``,
    ``huber(d) = w (d - w / 2)`` and ``huber'(d) = w``.
    """

    @staticmethod
    def forward(ctx, inv_s, gram_s, inv_t, gram_t):  # noqa: D102
        batch = inv_s.shape[0]
        need_s, need_t = ctx.needs_input_grad[0] or ctx.needs_input_grad[1], ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        grads_s = (torch.zeros_like(inv_s), torch.zeros_like(gram_s)) if need_s else None
        grads_t = (torch.zeros_like(inv_t), torch.zeros_like(gram_t)) if need_t else None
        total = inv_s.new_zeros(())
        block = max(1, (1 << 18) // (batch * batch))  # vertices per block: about 1 MiB of float32 cosines
        for start in range(0, batch, block):
            rows = slice(start, min(start + block, batch))
            d = _cosines(inv_s, gram_s, rows).sub_(_cosines(inv_t, gram_t, rows))  # (J, B, B)
            w = d.clamp(-1.0, 1.0)
            if grads_s is not None:
                _cosine_grads(w, inv_s, gram_s, rows, *grads_s)
            if grads_t is not None:
                _cosine_grads(w, inv_t, gram_t, rows, *grads_t)
            total += torch.dot(w.reshape(-1), d.sub_(w, alpha=0.5).reshape(-1))
        scale = 1.0 / batch**3
        ctx.scale = scale
        ctx.save_for_backward(*(grads_s or ()), *(grads_t or ()))
        ctx.has = (grads_s is not None, grads_t is not None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        saved = list(ctx.saved_tensors)
        factor = grad_out * ctx.scale
        out = [None, None, None, None]
        if ctx.has[0]:
            d_inv, d_gram = saved.pop(0), saved.pop(0)
            out[0], out[1] = d_inv * factor, d_gram * factor
        if ctx.has[1]:
            d_inv, d_gram = saved.pop(0), saved.pop(0)
            out[2], out[3] = -d_inv * factor, -d_gram * factor
        return tuple(out)


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
    flattened; widths may differ. The cosines come from the Gram matrix (equal, in value
    and gradient, to normalising the ``B x B`` difference vectors as the official code
    does), so the work is ``O(B^2 D + B^3)`` and memory ``O(B^3)``, never ``O(B^2 D)``.
    Reduction: mean over the ``B^3`` triplets.
    ``mask``/``weights``: see the module docstring (batch-relation).

    Paper: Park et al., Relational Knowledge Distillation, CVPR 2019,
    https://arxiv.org/abs/1904.05068
    """
    selected = _select(student_feats, teacher_feats, mask, weights, "rkd_angle")
    if selected is None:
        return _zero(student_feats)
    f_s, f_t = _flat_pair(*selected, "rkd_angle")
    return _AngleLoss.apply(*_edges(f_s), *_edges(f_t))


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


def crd_nce_with_gradient(
    anchor: torch.Tensor,
    memory: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: Temperature = 0.07,
    z: torch.Tensor | None = None,
    eps: Positive = 1e-7,
    gradient: bool = True,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One direction of CRD's loss, its gradient w.r.t. the anchor, and ``Z``, in one pass.

    The same value as ``crd_nce_loss(crd_scores(anchor, memory, cat([positive, negatives]),
    temperature=T) / Z, num_data=N, eps=eps)``, with ``N = memory.shape[0]``,
    ``K = negatives.shape[1]`` and ``c = K / N``:
    ``-mean_b [ log(P_0 / (P_0 + c + eps)) + sum_k log(c / (P_k + c + eps)) ]``,
    ``P = exp(<anchor, memory[row]> / T) / Z``; the negatives' terms are summed as
    ``log1p((P_k + eps) / c)``, which keeps their small values exact in float32.

    ``z``: the normaliser; None estimates it from these scores as the official code does
    on its first batch, ``mean(exp(scores / T)) * N`` over the ``B (1 + K)`` scores, and
    returns it. It is a constant to the gradient. The gradient (``gradient=True``) is
    ``dL/d anchor_b = (1/(B T)) [ -(c + eps)/(P_0 + c + eps) m_pos + sum_k P_k/(P_k + c + eps) m_k ]``
    (the memory is a constant), so a caller can update ``memory`` in place afterwards:
    nothing refers to it.

    Shapes: ``anchor`` ``(B, F)``, ``memory`` ``(N, F)``, ``positive`` ``(B,)`` and
    ``negatives`` ``(B, K)`` row indices -> ``(loss, grad (B, F) or None, Z)``, computed in
    float32 (``exp(1/0.07)`` overflows float16). Work: one ``(B, N)`` product for the scores
    and one for the gradient when the bank is small next to ``K * F`` (with ``N <= K`` the
    negatives are counted per row, so ``(B, N)`` values are computed instead of ``(B, K)``),
    else ``B K`` gathered rows. ``workspace``: an optional float32 ``(B, N)`` tensor on the
    anchor's device to hold the score matrix (overwritten), so that a caller can keep one
    between steps instead of allocating it anew (on the CPU, fresh large allocations are
    paged in on first touch, which costs as much as the product).

    Paper: Tian et al., Contrastive Representation Distillation, ICLR 2020,
    https://arxiv.org/abs/1910.10699
    """
    anchor = anchor.detach().float()
    memory = memory.detach().float()
    batch, num_neg = negatives.shape
    num_data, feat_dim = memory.shape
    if num_neg < 1:
        raise ValueError("crd_nce_with_gradient: needs at least one negative per sample")
    noise = num_neg / float(num_data)  # c = K * Pn
    scaled = anchor / temperature  # (B, F): scores are <scaled, row>
    pos_rows = memory[positive]  # (B, F)
    pos_scores = (scaled * pos_rows).sum(1)  # (B,)
    counted = num_data <= num_neg  # fewer rows than draws: count the draws per row
    gathered_rows = None
    counts = None
    full = None
    if num_data <= (num_neg + 1) * feat_dim:
        usable = (workspace is not None and workspace.shape == (batch, num_data) and workspace.dtype == torch.float32
                  and workspace.device == scaled.device)
        full = scores = torch.mm(scaled, memory.t(), out=workspace) if usable else scaled @ memory.t()  # (B, N)
        if counted:
            counts = torch.zeros_like(scores).scatter_add_(1, negatives, scores.new_ones(()).expand(batch, num_neg))
        else:
            scores = scores.gather(1, negatives)  # (B, K)
    else:
        gathered_rows = memory[negatives]  # (B, K, F)
        scores = torch.bmm(gathered_rows, scaled[:, :, None]).squeeze(2)  # (B, K)
    if z is None:
        exp_neg = scores.exp()
        total = pos_scores.exp().sum() + (exp_neg.mul_(counts).sum() if counted else exp_neg.sum())
        z = total / (batch * (num_neg + 1)) * num_data
    z = z.float()
    offset = torch.log(z * noise)  # exp(score - offset) = P / c
    ratio = scores.sub_(offset).exp_()  # (B, K) or (B, N): P / c, in place
    shifted = ratio + eps / noise  # (P + eps) / c
    terms = torch.log1p(shifted)  # -log(c / (P + c + eps))
    loss_neg = torch.dot(terms.reshape(-1), counts.reshape(-1)) if counted else terms.sum()
    p_pos = torch.exp(pos_scores - torch.log(z))  # (B,)
    loss_pos = -torch.log(p_pos / (p_pos + noise + eps)).sum()
    loss = (loss_pos + loss_neg) / batch
    if not gradient:
        return loss, None, z
    coef = ratio.div_(shifted.add_(1.0))  # P / (P + c + eps)
    if counted:
        grad = coef.mul_(counts) @ memory
    elif gathered_rows is None:
        grad = full.zero_().scatter_add_(1, negatives, coef) @ memory  # the score matrix is free again
    else:
        grad = torch.bmm(coef[:, None, :], gathered_rows).squeeze(1)
    grad += (-(noise + eps) / (p_pos + noise + eps))[:, None] * pos_rows
    return loss, grad.div_(batch * temperature), z
