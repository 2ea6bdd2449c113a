"""Meta-DMoE's pure pieces: the inner-step distillation loss, the MAML inner step, and the
masking that keeps a sample's own-domain expert out of the aggregation.

Zhong et al., Meta-DMoE: Adapting to Domain Shift by Meta-Distillation from Mixture-of-Experts,
NeurIPS 2022, https://arxiv.org/abs/2210.03885 (official code: n3il666/Meta-DMoE). The
modules and the training step that use them are in :mod:`transfuse.schemes.meta_dmoe`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from ._types import Positive, Reduction
from .reduce import reduce_positions, weigh_positions


def feature_mse(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Meta-DMoE's inner-step loss: the mean squared difference between the student's
    features and the aggregated teacher features, ``mean_b mean_d (f_b,d - t_b,d)^2``.

    Shapes: ``student``, ``teacher`` ``(B, D)`` (or ``(..., D)``: one value per leading
    position). ``reduction="mean"``: the mean over (masked-in, weighted) positions through
    :func:`~transfuse.functional.reduce_positions`; ``"none"``: the per-position values ``(...)``.
    Without mask and weights this is the official ``l2_loss``, ``torch.mean((t - f)^2)``
    over all elements. The target is NOT detached: the outer step differentiates through it
    into the aggregator.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"feature_mse: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features "
                         "must have one shape (Meta-DMoE distils the aggregator's output into the student's feature)")
    values = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # (...)
    if reduction == "none":
        return weigh_positions(values, mask=mask, weights=weights)
    return reduce_positions(values, mask=mask, weights=weights)


def inner_step(
    params: Mapping[str, Tensor], loss: Tensor, *, lr: Positive, first_order: bool = False,
) -> dict[str, Tensor]:
    """One MAML inner step, ``theta' = theta - lr * grad_theta loss``, as a new parameter dict.

    ``params``: named tensors the ``loss`` (a scalar) was computed from. A parameter the
    loss does not reach (the classifier head, for a loss on features) is returned as it
    is. ``first_order=False`` keeps the graph of the gradient (``create_graph=True``), so
    an outer loss computed with ``theta'`` differentiates through the step: into
    ``theta`` (second-order MAML) and into whatever produced the inner loss's target (the
    aggregator). ``first_order=True`` treats the gradient as a constant (FOMAML): the
    outer gradient reaches ``theta`` through the identity only, and the target not at all.
    The official code uses learn2learn's ``MAML`` with its default ``first_order=False``.
    """
    if loss.dim() != 0:
        raise ValueError(f"inner_step: the inner loss must be a scalar; got shape {tuple(loss.shape)}")
    if not lr > 0:
        raise ValueError(f"inner_step: lr must be > 0; got {lr}")
    names = [n for n, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order, allow_unused=True)
    updated = dict(params)
    for name, grad in zip(names, grads):
        if grad is not None:
            updated[name] = params[name] - lr * grad
    return updated


def expert_keep_mask(domains: Tensor, expert_domains: Sequence[Sequence[int]]) -> Tensor:
    """Which experts each sample may learn from: ``keep`` ``(B, K)`` bool, False exactly where
    expert ``k`` was trained on sample ``b``'s domain.

    ``domains``: ``(B,)`` integer domain of each sample; ``expert_domains``: for each of the
    ``K`` experts, the domains it was trained on. A sample of a domain no expert covers
    (a held-out target domain) keeps every expert. Meta-DMoE's meta-training hides the
    expert of the batch's own domain, so the aggregated knowledge is always about an
    unseen domain, as it is at test time.
    """
    k = len(expert_domains)
    if k == 0:
        raise ValueError("expert_keep_mask: need at least one expert")
    covered = [torch.as_tensor(list(ds), dtype=torch.long, device=domains.device) for ds in expert_domains]
    keep = torch.stack([~torch.isin(domains.long(), c) for c in covered], dim=-1)  # (B, K)
    return keep


def masked_token_mean(tokens: Tensor, keep: Tensor) -> Tensor:
    """The mean over the kept tokens: ``(B, K, D)``, ``keep`` ``(B, K)`` bool -> ``(B, D)``.

    The aggregator's pooling over expert tokens; a masked-out token adds nothing. Every
    sample must keep at least one token.
    """
    if keep.shape != tokens.shape[:2]:
        raise ValueError(f"masked_token_mean: keep {tuple(keep.shape)} must be tokens' leading (B, K) "
                         f"{tuple(tokens.shape[:2])}")
    counts = keep.sum(dim=1, keepdim=True)  # (B, 1)
    if bool((counts == 0).any()):
        raise ValueError("masked_token_mean: a sample keeps no token; every sample needs at least one expert")
    weights = keep.to(tokens.dtype).unsqueeze(-1)  # (B, K, 1)
    return (tokens * weights).sum(dim=1) / counts.to(tokens.dtype)


def drop_tokens(tokens: Tensor, keep: Tensor) -> Tensor:
    """The kept tokens of each sample, gathered: ``(B, K, D)`` -> ``(B, K', D)``, where every
    sample keeps the same number ``K'`` (the official ``mask_feat(..., exclude=True)``).
    :func:`masked_token_mean` with an attention mask gives the same aggregation without
    this restriction."""
    counts = keep.sum(dim=1)
    if len(counts) and bool((counts != counts[0]).any()):
        raise ValueError("drop_tokens: every sample must keep the same number of tokens")
    kept = keep.nonzero()[:, 1].reshape(len(tokens), -1)  # (B, K') positions, in order
    return tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


__all__ = ["drop_tokens", "expert_keep_mask", "feature_mse", "inner_step", "masked_token_mean"]
