"""Feature-level distillation losses as pure functions.

These compare intermediate representations position by position (a "hint" map or an
embedding). Any learnable adapter between student and teacher widths (FitNets'
regressor) lives in the loss module, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fitnet(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """FitNets' hint loss: the mean squared error between (regressed) student and teacher features.

    Shapes: both ``(B, ...)`` and equal -- the student's features must already be mapped
    to the teacher's shape (the ``fitnet`` loss module's regressor does that).
    Reduction: mean over all elements (as the common code bases do; the paper writes
    ``1/2 * ||.||^2``, a constant factor absorbed in the weight).

    Paper: Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015,
    https://arxiv.org/abs/1412.6550
    """
    if student_feats.shape != teacher_feats.shape:
        raise ValueError(
            f"fitnet: student features {tuple(student_feats.shape)} must match the teacher's "
            f"{tuple(teacher_feats.shape)}; map them with a regressor first (the fitnet loss module has one)"
        )
    return F.mse_loss(student_feats, teacher_feats)


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


def attention_map(feats: torch.Tensor, *, p: float = 2.0) -> torch.Tensor:
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


def attention_transfer(student_feats: torch.Tensor, teacher_feats: torch.Tensor, *, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: match the normalised spatial attention maps of student and teacher.

    ``loss = mean_{b, s} (Q_s[b, s] - Q_t[b, s])^2`` with ``Q`` from :func:`attention_map`
    (the mdistiller form of the paper's ``||Q_s/||Q_s|| - Q_t/||Q_t|| ||_p``).

    Shapes: ``(B, C_s, *spatial)`` and ``(B, C_t, *spatial')``; channel counts may differ
    (attention averages them out). Where spatial sizes differ, the larger map is
    adaptive-average-pooled to the smaller size before the attention is taken (as
    mdistiller does). 2-D ``(B, D)`` inputs treat each unit as a position and need equal
    ``D``. Reduction: mean over batch and positions.

    Paper: Zagoruyko & Komodakis, Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer, ICLR 2017,
    https://arxiv.org/abs/1612.03928
    """
    if student_feats.shape[0] != teacher_feats.shape[0]:
        raise ValueError("attention_transfer: student and teacher batch sizes differ")
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
    return (q_s - q_t).pow(2).mean()
