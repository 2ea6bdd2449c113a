"""KnFu's personalised knowledge fusion as pure functions (federated knowledge distillation).

In KnFu (Seyedmohammadi et al., 2024) every client shares its *knowledge* -- its softmax
predictions on a shared, unlabelled transfer set -- and the server fuses, for each client
separately, only the knowledge of that client's *semantic neighbours*: the clients whose
knowledge is close to its own. The pieces, on the stacked knowledge ``(C, N, K)`` of ``C``
clients on ``N`` transfer samples over ``K`` classes:

* :func:`knfu_epd` -- each client's estimated probability distribution (EPD) over the
  classes, the mean of its predictions over the transfer set ``(C, K)``: what its model
  has learned of its local label distribution;
* :func:`knfu_divergence` -- ``D[k, j]``, how far client ``j``'s knowledge is from client
  ``k``'s: ``KL(EPD_k || EPD_j)`` (``measure="epd"``), or the mean per-sample
  ``KL(p_k(x) || p_j(x))`` over the transfer set (``measure="per_sample"``);
* :func:`knfu_neighbours` -- ``k``'s semantic neighbours: the other clients ``j`` with
  ``D[k, j]`` at most the mean of ``D[k, .]`` over the other clients (``"below_mean"``),
  or every other client (``"all"``);
* :func:`knfu_weights` -- ``W[k, j] = exp(-beta D[k, j]) / sum_{l in N(k)} exp(-beta D[k, l])``
  over the neighbours ``N(k)`` (0 elsewhere): closer knowledge weighs more, ``beta = 10``
  as in the paper's experiments; :func:`uniform_weights` is FedMD's plain average;
* :func:`fuse_knowledge` -- ``fused[k] = sum_j W[k, j] knowledge[j]``, each client's
  personalised target ``(C, N, K)``; :func:`knfu_fuse` does all of it.

A client's own knowledge is not fused into its own target (``include_self=False``): KnFu
fuses the *neighbours'* knowledge, and with ``D[k, k] = 0`` the client itself would
otherwise always be its own heaviest neighbour.

Paper: Seyedmohammadi, Atapour, Abouei, Mohammadi, KnFu: Effective Knowledge Fusion, 2024,
https://arxiv.org/abs/2403.11892 (no official code; see ``docs/methods.md`` for what was
followed and reconstructed).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ._types import NonNegative, Positive

PAPER = ("Seyedmohammadi et al., KnFu: Effective Knowledge Fusion, 2024, https://arxiv.org/abs/2403.11892")

Measure = Literal["epd", "per_sample"]
Criterion = Literal["below_mean", "all"]
MEASURES: tuple[str, ...] = ("epd", "per_sample")
CRITERIA: tuple[str, ...] = ("below_mean", "all")

__all__ = [
    "fuse_knowledge", "knfu_divergence", "knfu_epd", "knfu_fuse", "knfu_neighbours", "knfu_weights", "uniform_weights",
]


def _check_knowledge(knowledge: torch.Tensor, name: str) -> torch.Tensor:
    """``knowledge`` as float64 ``(C, N, K)`` probabilities, or a ValueError saying what is wrong."""
    if knowledge.dim() != 3:
        raise ValueError(f"{name}: knowledge must be (clients, samples, classes), got shape {tuple(knowledge.shape)}")
    c, n, k = knowledge.shape
    if c < 1 or n < 1 or k < 2:
        raise ValueError(f"{name}: knowledge needs >= 1 client, >= 1 sample and >= 2 classes, got shape {(c, n, k)}")
    probs = knowledge.to(torch.float64)  # divergences of near-equal clients are differences of small numbers
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError(f"{name}: knowledge must be finite, non-negative probabilities (softmax outputs, not logits)")
    sums = probs.sum(-1)  # (C, N)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        worst = float((sums - 1).abs().max())
        raise ValueError(
            f"{name}: each client's knowledge per sample must sum to 1 over the classes (softmax outputs), "
            f"off by up to {worst:.3g}; pass probabilities, not logits"
        )
    return probs


def _check_eps(eps: float, name: str) -> None:
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{name}: eps must be finite and > 0, got {eps}")


def _kl(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """``KL(p || q)`` over the last dim, with ``q`` (and ``p`` inside its log) floored at ``eps``.

    The floor keeps a class one client never predicts from making the divergence infinite;
    terms with ``p = 0`` contribute exactly 0.
    """
    return (p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(-1)


def knfu_epd(knowledge: torch.Tensor) -> torch.Tensor:
    """Each client's estimated probability distribution over the classes: ``(C, N, K) -> (C, K)``.

    The mean of the client's predictions over the transfer samples (float64; rows sum to 1).
    """
    return _check_knowledge(knowledge, "knfu_epd").mean(dim=1)


def knfu_divergence(knowledge: torch.Tensor, *, measure: Measure = "epd", eps: Positive = 1e-8) -> torch.Tensor:
    """``D[k, j]``: how far client ``j``'s knowledge is from client ``k``'s, ``(C, N, K) -> (C, C)`` float64.

    ``measure="epd"``: ``KL(EPD_k || EPD_j)`` between the clients' mean predictions
    (:func:`knfu_epd`); ``"per_sample"``: ``mean_x KL(p_k(x) || p_j(x))`` over the transfer
    samples. Probabilities inside the logs are floored at ``eps``. The diagonal is 0; the
    matrix is not symmetric (KL is not).
    """
    if measure not in MEASURES:
        raise ValueError(f"knfu_divergence: measure must be one of {', '.join(MEASURES)}; got {measure!r}")
    _check_eps(eps, "knfu_divergence")
    probs = _check_knowledge(knowledge, "knfu_divergence")
    if measure == "epd":
        epd = probs.mean(dim=1)  # (C, K)
        divergence = _kl(epd[:, None, :], epd[None, :, :], eps)  # (C, C)
    else:
        divergence = _kl(probs[:, None], probs[None, :], eps).mean(-1)  # (C, C, N) -> (C, C)
    return divergence.fill_diagonal_(0.0)


def knfu_neighbours(
    divergence: torch.Tensor, *, criterion: Criterion = "below_mean", include_self: bool = False
) -> torch.Tensor:
    """Each client's semantic neighbours: bool ``(C, C)``, ``[k, j]`` True if ``j`` is ``k``'s neighbour.

    ``criterion="below_mean"``: the other clients ``j`` with ``D[k, j] <= mean_{l != k} D[k, l]``
    (so at least the closest other client always qualifies); ``"all"``: every other
    client. ``include_self`` adds ``k`` to its own neighbours. One client alone has no
    other client to learn from: ValueError unless ``include_self``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"knfu_neighbours: criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if divergence.dim() != 2 or divergence.shape[0] != divergence.shape[1]:
        raise ValueError(f"knfu_neighbours: divergence must be a square (C, C) matrix, got {tuple(divergence.shape)}")
    c = divergence.shape[0]
    if c < 2 and not include_self:
        raise ValueError("knfu_neighbours: one client has no other client's knowledge to fuse; use >= 2 clients")
    others = ~torch.eye(c, dtype=torch.bool, device=divergence.device)  # (C, C)
    if criterion == "all":
        chosen = others
    else:
        mean_other = (divergence * others).sum(1, keepdim=True) / max(c - 1, 1)  # (C, 1)
        chosen = others & (divergence <= mean_other)
    return chosen | ~others if include_self else chosen


def knfu_weights(divergence: torch.Tensor, neighbours: torch.Tensor, *, beta: NonNegative = 10.0) -> torch.Tensor:
    """Fusion weights ``(C, C)``: a softmax of ``-beta * D[k, .]`` over ``k``'s neighbours, 0 elsewhere.

    ``W[k, j] = exp(-beta D[k, j]) / sum_{l in N(k)} exp(-beta D[k, l])``; each row sums to
    1. ``beta = 0`` is the uniform average over the neighbours; a large ``beta`` keeps only
    the closest. Computed in log space, so a large ``beta * D`` never underflows a whole row.
    """
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"knfu_weights: beta must be finite and >= 0, got {beta}")
    if neighbours.shape != divergence.shape or neighbours.dtype != torch.bool:
        raise ValueError(
            f"knfu_weights: neighbours must be a bool matrix of the divergence's shape {tuple(divergence.shape)}, "
            f"got {neighbours.dtype} {tuple(neighbours.shape)}"
        )
    if not neighbours.any(dim=1).all():
        empty = torch.nonzero(~neighbours.any(dim=1)).flatten().tolist()
        raise ValueError(f"knfu_weights: client(s) {empty} have no neighbour to fuse")
    d = divergence.to(torch.float64)
    scores = torch.where(neighbours, -beta * d, torch.full_like(d, -math.inf))  # non-neighbours: weight exp(-inf) = 0
    return torch.softmax(scores, dim=1)  # (C, C), 0 where scores are -inf


def uniform_weights(num_clients: int, *, include_self: bool = True) -> torch.Tensor:
    """FedMD's consensus as fusion weights ``(C, C)``: every client's knowledge weighs the same.

    ``include_self=True`` (FedMD): the plain average over all ``C`` clients, each row
    ``1 / C``; ``False``: the average over the other ``C - 1`` clients.
    """
    if num_clients < 1 or (num_clients < 2 and not include_self):
        raise ValueError(f"uniform_weights: needs >= {1 if include_self else 2} clients, got {num_clients}")
    mask = torch.ones(num_clients, num_clients, dtype=torch.float64)
    if not include_self:
        mask.fill_diagonal_(0.0)
    return mask / mask.sum(1, keepdim=True)


def fuse_knowledge(knowledge: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each client's fused knowledge: ``fused[k] = sum_j W[k, j] knowledge[j]``.

    Shapes: ``knowledge`` ``(C, N, K)`` probabilities, ``weights`` ``(C, C)`` with
    non-negative rows summing to 1 -> ``(C, N, K)`` probabilities (in the knowledge's dtype).
    """
    probs = _check_knowledge(knowledge, "fuse_knowledge")
    c = probs.shape[0]
    if weights.shape != (c, c):
        raise ValueError(f"fuse_knowledge: weights must be ({c}, {c}) for {c} clients, got {tuple(weights.shape)}")
    w = weights.to(torch.float64)
    rows_sum_to_one = torch.allclose(w.sum(1), torch.ones(c, dtype=w.dtype), atol=1e-6)
    if not torch.isfinite(w).all() or (w < 0).any() or not rows_sum_to_one:
        raise ValueError("fuse_knowledge: each row of weights must be finite, non-negative and sum to 1")
    return torch.einsum("kj,jnc->knc", w, probs).to(knowledge.dtype)


def knfu_fuse(
    knowledge: torch.Tensor,
    *,
    beta: NonNegative = 10.0,
    measure: Measure = "epd",
    criterion: Criterion = "below_mean",
    include_self: bool = False,
    eps: Positive = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KnFu's personalised fusion: ``(fused (C, N, K), weights (C, C))`` from the knowledge ``(C, N, K)``.

    :func:`knfu_divergence` (``measure``, ``eps``) -> :func:`knfu_neighbours`
    (``criterion``, ``include_self``) -> :func:`knfu_weights` (``beta``) ->
    :func:`fuse_knowledge`. Paper: Seyedmohammadi et al., KnFu: Effective Knowledge Fusion,
    2024, https://arxiv.org/abs/2403.11892
    """
    divergence = knfu_divergence(knowledge, measure=measure, eps=eps)  # (C, C)
    neighbours = knfu_neighbours(divergence, criterion=criterion, include_self=include_self)  # (C, C) bool
    weights = knfu_weights(divergence, neighbours, beta=beta)  # (C, C)
    return fuse_knowledge(knowledge, weights), weights
