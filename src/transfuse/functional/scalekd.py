"""ScaleKD's dual-view feature mimicking, as pure functions (the projector is in ``losses/scalekd.py``).

Paper: Fan, Li, Liu & Yao, ScaleKD: Strong Vision Transformers Could Be Excellent Teachers,
NeurIPS 2024, https://arxiv.org/abs/2411.06786 (official code: deep-optimization/ScaleKD,
``FreqMaskingDistillLossv2``).

* spatial view: ``sum_{c,h,w} (n(S) - n(T))^2`` per sample, ``n`` the L2 normalisation over
  channels at each position;
* frequency view: the same after removing the direct component (DC) of every channel with
  a 2-D DCT: transform, zero the ``(0, 0)`` coefficient, transform back.

The DCT is an orthonormal DCT-II matrix built here (no FFT, no new dependency). Zeroing the
DC coefficient of any DCT-II and inverting subtracts each channel's spatial mean (the DC
basis function is constant), whatever the transform's normalisation, so the result does
not depend on the official code's unnormalised scaling.
"""

from __future__ import annotations

import math

import torch

from ._types import NonNegative, Reduction
from .reduce import _reduce, _weigh

__all__ = ["dct_matrix", "dct2d", "idct2d", "remove_dc", "normalized_mse_per_sample", "scalekd_mimic"]


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` ``(n, n)``: ``D[k, i] = s_k cos(pi (2i + 1) k / (2n))``,
    ``s_0 = sqrt(1/n)``, ``s_k = sqrt(2/n)``. ``D @ x`` transforms a length-``n`` signal and
    ``D.T`` inverts it (``D @ D.T = I``)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"dct_matrix: n must be a positive integer, got {n!r}")
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)  # (n, 1) frequency
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)  # (1, n) position
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n))  # (n, n)
    scale = torch.full((n, 1), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return (scale * basis).to(dtype=dtype, device=device)


def _matrices(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 2:
        raise ValueError(f"dct2d: expected (..., H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    return dct_matrix(h, dtype=x.dtype, device=x.device), dct_matrix(w, dtype=x.dtype, device=x.device)


def dct2d(x: torch.Tensor) -> torch.Tensor:
    """The 2-D orthonormal DCT-II over the last two dims: ``(..., H, W) -> (..., H, W)``, ``D_H x D_W^T``."""
    d_h, d_w = _matrices(x)
    return d_h @ x @ d_w.transpose(0, 1)


def idct2d(coefficients: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`dct2d`: ``D_H^T X D_W``."""
    d_h, d_w = _matrices(coefficients)
    return d_h.transpose(0, 1) @ coefficients @ d_w


def remove_dc(feature_map: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` with the DC coefficient of its 2-D DCT set to 0 (ScaleKD's frequency view).

    Equal to subtracting the spatial mean of each ``(H, W)`` plane (tested); computed through
    the transform, as the method describes it.
    """
    coefficients = dct2d(feature_map)  # (..., H, W)
    keep = torch.ones_like(coefficients)
    keep[..., 0, 0] = 0  # a product, not an in-place write, so autograd sees an ordinary op
    return idct2d(coefficients * keep)


def normalized_mse_per_sample(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Per sample ``sum_{c,h,w} (n(S) - n(T))^2``, ``n`` = L2 normalisation over channels (dim 1)
    at each position (``F.normalize``, eps 1e-12). ``(B, C, H, W)`` twice -> ``(B,)``."""
    if student_map.shape != teacher_map.shape or student_map.dim() < 3:
        raise ValueError(
            f"scalekd: the (projected) student map {tuple(student_map.shape)} must have the teacher map's shape "
            f"{tuple(teacher_map.shape)}, (B, C, H, W)"
        )
    s = torch.nn.functional.normalize(student_map, dim=1)
    t = torch.nn.functional.normalize(teacher_map, dim=1)
    return (s - t).pow(2).flatten(1).sum(1)  # (B,)


def scalekd_mimic(
    student_spatial: torch.Tensor,
    teacher_map: torch.Tensor,
    student_frequency: torch.Tensor | None = None,
    *,
    alpha_spatial: NonNegative = 0.08,
    alpha_frequency: NonNegative = 0.06,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """ScaleKD's dual-view feature mimicking of projected student features.

    ``L = alpha_spatial * sum (n(S_sp) - n(T))^2 + alpha_frequency * sum (n(R(S_fq)) - n(R(T)))^2``,
    sums over channels and positions of one sample, ``n`` the channel-wise L2 normalisation
    at each position, ``R`` = :func:`remove_dc`.

    Shapes: ``student_spatial``, ``student_frequency`` and ``teacher_map`` ``(B, C, H, W)``,
    all equal: the student's map already projected to the teacher's shape (the official
    code has one projector per view; ``student_frequency`` None uses ``student_spatial``
    for both). Per sample ``(B,)``; reduction (``"mean"``):
    :func:`~transfuse.functional.reduce_positions` over samples with ``mask``/``weights``
    ``(B,)`` -- unmasked, the official ``MSELoss(reduction='sum') / N``.
    ``reduction="none"`` returns the ``(B,)`` values (weights applied, masked-out 0).

    Defaults: ``alpha = [0.08, 0.06]`` of every official configuration's stage-3 term.
    Paper: Fan et al., ScaleKD, NeurIPS 2024, https://arxiv.org/abs/2411.06786
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"scalekd: reduction must be 'mean' or 'none', got {reduction!r}")
    if student_frequency is None:
        student_frequency = student_spatial
    spatial = normalized_mse_per_sample(student_spatial, teacher_map)  # (B,)
    frequency = normalized_mse_per_sample(remove_dc(student_frequency), remove_dc(teacher_map))  # (B,)
    per_sample = alpha_spatial * spatial + alpha_frequency * frequency  # (B,)
    if reduction == "none":
        return _weigh(per_sample, mask, weights, "scalekd")
    return _reduce(per_sample, mask, weights, "scalekd")
