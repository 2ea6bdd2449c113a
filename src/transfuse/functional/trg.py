"""TRG: knowledge distillation via a token-level relationship graph, as pure functions.

Paper: Zhang, Liu & He, Knowledge Distillation via Token-level Relationship Graph, 2023,
https://arxiv.org/abs/2306.12442 (no official code).

Tokens are a ViT's patch tokens or a CNN map's positions (``(B, C, H, W)`` -> ``B`` images of
``H*W`` tokens of width ``C``). From each image a few tokens are drawn at random; the drawn
tokens of the whole batch are the graph's nodes (student and teacher draw the same
positions). Three relation terms (the fourth, the logit term, is the ordinary ``kd``/``ce``
terms of a run):

* inner (contextual) loss: ``CS = softmax(F F^T / sqrt(D))`` over the tokens of one image,
  ``MSE(CS^T, CS^S)``;
* local preserving loss: a k-NN graph with Gaussian edges
  ``A_ij = exp(-||T_i - T_j||^2 / (2 sigma))`` inside the neighbourhood;
  ``sum_i KL(softmax_j A^S_ij || softmax_j A^T_ij)`` (here averaged over nodes);
* global contrastive loss: InfoNCE between the linearly projected student token ``i`` and
  teacher token ``i`` against the other teacher tokens, at a temperature annealed from high
  (coarse structure first) to low.

TRG is a batch-relation loss: ``mask`` (bool ``(B,)``) keeps the selected images (the
graph is built over them only), ``weights`` are refused.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ._types import NonNegative, Positive, PositiveInt, Temperature
from .relations import _select, _zero

__all__ = [
    "as_tokens", "align_token_grids", "sample_token_indices", "trg_inner", "trg_local", "trg_global",
    "trg_temperature", "trg",
]


def as_tokens(feats: torch.Tensor, *, name: str = "trg") -> torch.Tensor:
    """``(B, C, H, W)`` map -> ``(B, H*W, C)`` tokens (row-major positions); ``(B, N, D)`` tokens unchanged."""
    if feats.dim() == 4:
        return feats.flatten(2).transpose(1, 2)
    if feats.dim() == 3:
        return feats
    raise ValueError(
        f"{name}: needs token features, a (B, C, H, W) map or (B, N, D) tokens; got shape {tuple(feats.shape)} "
        "(tap a map: the default 'map' layer of a zoo cnn/resnet/wrn/vit)"
    )


def align_token_grids(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher tokens ``(B, N, D_s)``, ``(B, N, D_t)`` at the same positions.

    Two maps of different spatial size: the larger is adaptive-average-pooled to the smaller
    in each dim, so a token stands for the same image region on both sides. Token inputs
    ``(B, N, D)`` must already have equal ``N``.
    """
    if student_feats.dim() == 4 and teacher_feats.dim() == 4 and student_feats.shape[2:] != teacher_feats.shape[2:]:
        size = tuple(min(a, b) for a, b in zip(student_feats.shape[2:], teacher_feats.shape[2:]))
        student_feats = F.adaptive_avg_pool2d(student_feats, size)
        teacher_feats = F.adaptive_avg_pool2d(teacher_feats, size)
    s, t = as_tokens(student_feats), as_tokens(teacher_feats)
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"trg: student tokens {tuple(s.shape)} and teacher tokens {tuple(t.shape)} need the same batch and "
            "number of tokens (positions)"
        )
    return s, t


def sample_token_indices(batch: int, num_tokens: int, per_image: int, *, device: torch.device | None = None) -> torch.Tensor:
    """``(B, n)`` token indices, ``n = min(per_image, num_tokens)`` distinct positions per image,
    uniformly at random (torch's default generator, so ``torch.manual_seed`` fixes them)."""
    n = min(per_image, num_tokens)
    return torch.rand(batch, num_tokens, device=device).argsort(dim=1)[:, :n]


def _context(tokens: torch.Tensor) -> torch.Tensor:
    """``softmax(F F^T / sqrt(D))`` per image: ``(B, N, D) -> (B, N, N)``."""
    return (tokens @ tokens.transpose(1, 2) / math.sqrt(tokens.shape[-1])).softmax(dim=-1)


def trg_inner(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """TRG's contextual (inner-instance) loss: ``MSE(CS^T, CS^S)``, ``CS = softmax(F F^T / sqrt(D))``
    within each image. ``(B, N, D_s)``, ``(B, N, D_t)`` -> a scalar, the mean over ``B*N*N``."""
    return F.mse_loss(_context(student_tokens), _context(teacher_tokens))


def _squared_distances(nodes: torch.Tensor) -> torch.Tensor:
    """``||x_i - x_j||^2`` ``(M, M)`` of L2-normalised nodes: ``2 - 2 cos``, clamped at 0."""
    unit = F.normalize(nodes, dim=1)
    return (2 - 2 * unit @ unit.t()).clamp_min(0)


def trg_local(student_nodes: torch.Tensor, teacher_nodes: torch.Tensor, *, k: PositiveInt = 8,
              sigma: Positive = 1.0) -> torch.Tensor:
    """TRG's local preserving loss over ``M`` graph nodes: ``(M, D_s)``, ``(M, D_t)`` -> a scalar.

    The neighbourhood ``N(i)`` is node ``i``'s ``k`` nearest other nodes in the TEACHER's
    space (``min(k, M - 1)``), the structure the student is to preserve. On both sides,
    ``A_ij = exp(-||x_i - x_j||^2 / (2 sigma))`` of L2-normalised nodes for ``j`` in ``N(i)``,
    ``P_i = softmax_{j in N(i)} A_ij``, and the loss is ``mean_i KL(P^S_i || P^T_i)``.
    """
    m = teacher_nodes.shape[0]
    if m < 2:
        return _zero(student_nodes)
    k = min(int(k), m - 1)
    d_t = _squared_distances(teacher_nodes)  # (M, M)
    d_s = _squared_distances(student_nodes)  # (M, M)
    self_loop = torch.eye(m, dtype=torch.bool, device=d_t.device)
    neighbours = d_t.detach().masked_fill(self_loop, float("inf")).topk(k, dim=1, largest=False).indices  # (M, k)
    a_t = torch.exp(-d_t.gather(1, neighbours) / (2 * sigma))  # (M, k)
    a_s = torch.exp(-d_s.gather(1, neighbours) / (2 * sigma))  # (M, k)
    log_p_s, log_p_t = a_s.log_softmax(dim=1), a_t.log_softmax(dim=1)
    return (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=1).mean()


def trg_global(projected_student_nodes: torch.Tensor, teacher_nodes: torch.Tensor, *,
               temperature: Temperature = 0.1) -> torch.Tensor:
    """TRG's global contrastive loss: InfoNCE of student node ``i`` (projected to the teacher's
    width) against teacher node ``i`` (positive) and every other teacher node (negatives),
    cosine similarity over ``temperature``. ``(M, D)`` twice -> the mean over ``M`` nodes."""
    if projected_student_nodes.shape != teacher_nodes.shape:
        raise ValueError(
            f"trg: projected student tokens {tuple(projected_student_nodes.shape)} must match the teacher's "
            f"{tuple(teacher_nodes.shape)}"
        )
    logits = F.normalize(projected_student_nodes, dim=1) @ F.normalize(teacher_nodes, dim=1).t() / temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def trg_temperature(step: int, total_steps: int, *, start: Temperature = 1.0, end: Temperature = 0.1) -> float:
    """The global loss's temperature at optimizer step ``step`` of ``total_steps``: from ``start``
    to ``end`` along a half cosine (``end`` from the last step on; ``end`` when ``total_steps`` is 0)."""
    if total_steps <= 0:
        return float(end)
    progress = min(max(step, 0) / max(total_steps - 1, 1), 1.0)
    return float(end + (start - end) * (1 + math.cos(math.pi * progress)) / 2)


def trg(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    alpha: NonNegative = 1.0,
    beta: NonNegative = 1.0,
    gamma: NonNegative = 1.0,
    tokens_per_image: PositiveInt = 8,
    k: PositiveInt = 8,
    sigma: Positive = 1.0,
    temperature: Temperature = 0.1,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRG's relation terms: ``alpha * L_inner + beta * L_local + gamma * L_global``.

    Shapes: ``(B, C_s, H_s, W_s)`` and ``(B, C_t, H_t, W_t)`` maps (the larger grid pooled to
    the smaller, :func:`align_token_grids`), or ``(B, N, D)`` tokens with equal ``N``.
    ``L_inner`` (:func:`trg_inner`) uses every token of each image; ``tokens_per_image``
    tokens are then drawn per image (:func:`sample_token_indices`, the same positions on
    both sides) and the ``B * tokens_per_image`` drawn tokens are the nodes of
    :func:`trg_local` (``k``, ``sigma``) and :func:`trg_global` (``temperature``; the
    student nodes first go through ``projection``, a map ``(M, D_s) -> (M, D_t)``; None:
    the identity, for equal widths).

    Batch-relation: ``mask`` (bool ``(B,)``) keeps the selected images (fewer than 2 kept:
    a graph-connected 0); ``weights`` raise ``ValueError``. A scalar.

    Paper: Zhang, Liu & He, Knowledge Distillation via Token-level Relationship Graph, 2023,
    https://arxiv.org/abs/2306.12442
    """
    kept = _select(student_feats, teacher_feats, mask, weights, "trg")
    if kept is None:
        return _zero(student_feats)
    student_tokens, teacher_tokens = align_token_grids(*kept)  # (B, N, D_s), (B, N, D_t)
    b, n = student_tokens.shape[:2]
    total = alpha * trg_inner(student_tokens, teacher_tokens)
    picks = sample_token_indices(b, n, tokens_per_image, device=student_tokens.device)  # (B, n')
    student_nodes = student_tokens.gather(1, picks.unsqueeze(-1).expand(-1, -1, student_tokens.shape[-1])).flatten(0, 1)
    teacher_nodes = teacher_tokens.gather(1, picks.unsqueeze(-1).expand(-1, -1, teacher_tokens.shape[-1])).flatten(0, 1)
    total = total + beta * trg_local(student_nodes, teacher_nodes, k=k, sigma=sigma)
    projected = projection(student_nodes) if projection is not None else student_nodes  # (M, D_t)
    return total + gamma * trg_global(projected, teacher_nodes, temperature=temperature)
