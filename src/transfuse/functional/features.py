"""Feature-level distillation losses as pure functions.

These compare intermediate representations position by position (a "hint" map or an
embedding), so both are position-wise: one value per sample (or per token), reduced by
:func:`~transfuse.functional.reduce_positions` with ``mask``/``weights``, or returned with
``reduction="none"``. Any learnable adapter between student and teacher widths (FitNets'
regressor) lives in the loss module, not here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._types import Positive, Reduction
from .reduce import _reduce, _weigh


def _check_reduction(reduction: str, name: str) -> None:
    if reduction not in ("mean", "none"):
        raise ValueError(f"{name}: reduction must be 'mean' or 'none', got {reduction!r}")


def fitnet(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """FitNets' hint loss: the mean squared error between (regressed) student and teacher features.

    Shapes: both ``(B, ...)`` and equal -- the student's features must already be mapped
    to the teacher's shape (the ``fitnet`` loss module's regressor does that).

    Positions: the leading dims that ``mask``/``weights`` cover (the longer of the two),
    by default the batch dim. Per position: the mean squared error over the remaining
    elements, so ``(B,)`` per sample, or ``(B, T)`` per token for ``(B, T, D)`` features
    with a ``(B, T)`` mask. Reduction (``"mean"``):
    :func:`~transfuse.functional.reduce_positions`; without mask and weights exactly
    ``F.mse_loss``, the mean over all elements (as the common code bases do; the paper
    writes ``1/2 * ||.||^2``, a constant factor absorbed in the weight).
    ``reduction="none"`` returns the per-position values (weights applied, masked-out 0).

    Paper: Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015,
    https://arxiv.org/abs/1412.6550
    """
    if student_feats.shape != teacher_feats.shape:
        raise ValueError(
            f"fitnet: student features {tuple(student_feats.shape)} must match the teacher's "
            f"{tuple(teacher_feats.shape)}; map them with a regressor first (the fitnet loss module has one)"
        )
    _check_reduction(reduction, "fitnet")
    if reduction == "mean" and mask is None and weights is None and student_feats.numel() > 0:
        # Today's arithmetic, so unmasked values stay bit-identical to earlier releases.
        return F.mse_loss(student_feats, teacher_feats)
    # Positions: the leading dims the mask/weights cover, at least the batch dim.
    num_pos = max([1, *(t.dim() for t in (mask, weights) if t is not None)])
    if num_pos > student_feats.dim():
        raise ValueError(
            f"fitnet: mask/weights cover {num_pos} dims but the features {tuple(student_feats.shape)} have only "
            f"{student_feats.dim()}"
        )
    lead = tuple(student_feats.shape[:num_pos])
    sq = (student_feats - teacher_feats).pow(2)  # (B, ...)
    per_position = sq.reshape(*lead, math.prod(sq.shape[num_pos:])).mean(-1)  # lead
    if reduction == "none":
        return _weigh(per_position, mask, weights, "fitnet")
    return _reduce(per_position, mask, weights, "fitnet")


_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _match_spatial(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever map is larger in a spatial dim down to the smaller size."""
    s_size, t_size = student_feats.shape[2:], teacher_feats.shape[2:]
    if s_size == t_size:
        return student_feats, teacher_feats
    if len(s_size) != len(t_size) or len(s_size) not in _POOLS:
        raise ValueError(
            f"attention_transfer: cannot match student spatial shape {tuple(s_size)} "
            f"with teacher spatial shape {tuple(t_size)}"
        )
    target = tuple(min(a, b) for a, b in zip(s_size, t_size))
    pool = _POOLS[len(target)]
    if tuple(s_size) != target:
        student_feats = pool(student_feats, target)
    if tuple(t_size) != target:
        teacher_feats = pool(teacher_feats, target)
    return student_feats, teacher_feats


def attention_map(feats: torch.Tensor, *, p: Positive = 2.0) -> torch.Tensor:
    """Spatial attention ``Q = L2-normalise(vec(mean_c |A_c|^p))`` per sample.

    Shapes: ``(B, C, *spatial)`` -> ``(B, prod(spatial))``; a 2-D ``(B, D)`` input is
    read as ``D`` positions with one channel each, giving ``(B, D)``.
    """
    if feats.dim() == 2:
        amap = feats.abs().pow(p)  # (B, D): one channel, D positions
    elif feats.dim() >= 3:
        amap = feats.abs().pow(p).mean(dim=1).flatten(1)  # (B, C, *S) -> (B, prod(S))
    else:
        raise ValueError(f"attention_map: expected (B, D) or (B, C, ...) features, got shape {tuple(feats.shape)}")
    return F.normalize(amap, p=2, dim=1)


def attention_transfer(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    *,
    p: Positive = 2.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Attention transfer: match the normalised spatial attention maps of student and teacher.

    ``loss = mean_{b, s} (Q_s[b, s] - Q_t[b, s])^2`` with ``Q`` from :func:`attention_map`
    (the mdistiller form of the paper's ``||Q_s/||Q_s|| - Q_t/||Q_t|| ||_p``).

    Shapes: ``(B, C_s, *spatial)`` and ``(B, C_t, *spatial')``; channel counts may differ
    (attention averages them out). Where spatial sizes differ, the larger map is
    adaptive-average-pooled to the smaller size before the attention is taken (as
    mdistiller does). 2-D ``(B, D)`` inputs treat each unit as a position and need equal
    ``D``. Per sample: the mean over the attention positions, ``(B,)``. Reduction
    (``"mean"``): :func:`~transfuse.functional.reduce_positions` over the samples with
    ``mask``/``weights`` ``(B,)``; without them the mean over batch and positions.
    ``reduction="none"`` returns the ``(B,)`` values (weights applied, masked-out 0).

    Paper: Zagoruyko & Komodakis, Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer, ICLR 2017,
    https://arxiv.org/abs/1612.03928
    """
    if student_feats.shape[0] != teacher_feats.shape[0]:
        raise ValueError("attention_transfer: student and teacher batch sizes differ")
    _check_reduction(reduction, "attention_transfer")
    if student_feats.dim() == 2 or teacher_feats.dim() == 2:
        if student_feats.shape != teacher_feats.shape:
            raise ValueError(
                f"attention_transfer: flat (B, D) features need equal shapes, got student "
                f"{tuple(student_feats.shape)} and teacher {tuple(teacher_feats.shape)}; tap a (B, C, H, W) map instead"
            )
    else:
        student_feats, teacher_feats = _match_spatial(student_feats, teacher_feats)
    q_s = attention_map(student_feats, p=p)  # (B, S)
    q_t = attention_map(teacher_feats, p=p)  # (B, S)
    sq = (q_s - q_t).pow(2)  # (B, S)
    if reduction == "mean" and mask is None and weights is None and sq.numel() > 0:
        return sq.mean()  # today's arithmetic (bit-identical unmasked values)
    per_sample = sq.mean(1)  # (B,)
    if reduction == "none":
        return _weigh(per_sample, mask, weights, "attention_transfer")
    return _reduce(per_sample, mask, weights, "attention_transfer")
