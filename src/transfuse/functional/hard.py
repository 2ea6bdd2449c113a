"""HARD's pure pieces: a per-sample affine warp with bounded parameters, and the
augmentor's objective (teacher/student disagreement minus the teacher's own change).

Paper: Nix, Burg, Sinz, HARD: Hard Augmentations for Robust Distillation, 2023,
https://arxiv.org/abs/2305.14890. The batch transforms that optimise these parameters
live in :mod:`transfuse.hard`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._types import NonNegative, Reduction, Temperature
from .logits import kd
from .reduce import reduce_positions, weigh_positions

__all__ = ["AFFINE_PARAMS", "affine_matrices", "affine_warp", "hard_objective"]

#: The meaning of each column of the affine parameters, in order. Every column lives in [-1, 1].
AFFINE_PARAMS: tuple[str, ...] = ("rotation", "scale", "shear", "translate_x", "translate_y")


def _check_bounds(max_rotation: float, max_scale: float, max_shear: float, max_translate: float, name: str) -> None:
    for option, value in (("max_rotation", max_rotation), ("max_scale", max_scale), ("max_shear", max_shear),
                          ("max_translate", max_translate)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name}: {option} must be a finite number >= 0, got {value!r}")
    if max_scale >= 1:
        # 1 - max_scale is the smallest zoom factor; at 0 the image would collapse to a point.
        raise ValueError(f"{name}: max_scale must be < 1 (the zoom factor ranges over 1 +- max_scale), got {max_scale}")


def affine_matrices(
    params: torch.Tensor,
    *,
    max_rotation: NonNegative = 15.0,
    max_scale: NonNegative = 0.15,
    max_shear: NonNegative = 0.15,
    max_translate: NonNegative = 0.15,
) -> torch.Tensor:
    """The ``(B, 2, 3)`` sampling matrices of ``affine_warp`` for parameters in ``[-1, 1]``.

    ``params``: ``(B, 5)``, columns :data:`AFFINE_PARAMS`; values outside ``[-1, 1]`` are
    clamped, so the transformation never leaves its bounds. Column ``u`` maps to

    * rotation ``a = u0 * max_rotation`` degrees,
    * zoom ``s = 1 + u1 * max_scale`` (``max_scale < 1``),
    * shear ``h = u2 * max_shear`` (x moves by ``h * y``),
    * translation ``(u3, u4) * max_translate`` as fractions of the image's width and height.

    The matrix is ``[R(a) @ [[1, h], [0, 1]] * s | 2 * t]`` in
    :func:`torch.nn.functional.affine_grid`'s normalised coordinates (which span 2 per
    side, hence the ``2 * t``); it maps each output position to where it samples the
    input. All parameters 0 give the identity ``[[1, 0, 0], [0, 1, 0]]``.
    """
    _check_bounds(max_rotation, max_scale, max_shear, max_translate, "affine_matrices")
    if params.dim() != 2 or params.shape[1] != len(AFFINE_PARAMS):
        raise ValueError(f"affine_matrices: params must be (B, {len(AFFINE_PARAMS)}) with columns "
                         f"{', '.join(AFFINE_PARAMS)}; got shape {tuple(params.shape)}")
    u = params.clamp(-1.0, 1.0)  # (B, 5)
    angle = u[:, 0] * math.radians(max_rotation)  # (B,)
    zoom = 1.0 + u[:, 1] * max_scale  # (B,)
    shear = u[:, 2] * max_shear  # (B,)
    shift = u[:, 3:5] * (2.0 * max_translate)  # (B, 2) in normalised coordinates
    cos, sin = torch.cos(angle), torch.sin(angle)  # (B,)
    # R @ [[1, h], [0, 1]] = [[cos, cos*h - sin], [sin, sin*h + cos]], then times the zoom.
    row0 = torch.stack([cos, cos * shear - sin], dim=-1) * zoom[:, None]  # (B, 2)
    row1 = torch.stack([sin, sin * shear + cos], dim=-1) * zoom[:, None]  # (B, 2)
    linear = torch.stack([row0, row1], dim=1)  # (B, 2, 2)
    return torch.cat([linear, shift[:, :, None]], dim=2)  # (B, 2, 3)


def affine_warp(
    images: torch.Tensor,
    params: torch.Tensor,
    *,
    max_rotation: NonNegative = 15.0,
    max_scale: NonNegative = 0.15,
    max_shear: NonNegative = 0.15,
    max_translate: NonNegative = 0.15,
    padding_mode: str = "border",
) -> torch.Tensor:
    """Each image warped by its own bounded affine transformation (a spatial transformer).

    ``images``: ``(B, C, H, W)`` float; ``params``: ``(B, 5)`` in ``[-1, 1]`` (see
    :func:`affine_matrices` for the columns and bounds). Bilinear sampling with
    ``align_corners=False``; positions that fall outside the image take the nearest border
    pixel (``padding_mode="border"``: the background of centred objects, whatever the
    normalisation made of it) or 0 (``"zeros"``). Differentiable in ``params`` and
    ``images``. All parameters 0 return the images unchanged (up to float rounding).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"affine_warp: images must be a float (B, C, H, W) tensor; got {images.dtype} "
                         f"of shape {tuple(images.shape)}")
    if params.shape[0] != images.shape[0]:
        raise ValueError(f"affine_warp: {images.shape[0]} images but params for {params.shape[0]}")
    if padding_mode not in ("border", "zeros"):
        raise ValueError(f"affine_warp: padding_mode must be 'border' or 'zeros', got {padding_mode!r}")
    theta = affine_matrices(params, max_rotation=max_rotation, max_scale=max_scale, max_shear=max_shear,
                            max_translate=max_translate).to(images.dtype)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def hard_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_clean_logits: torch.Tensor,
    *,
    lam: NonNegative = 1.0,
    temperature: Temperature = 1.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """What HARD's augmentor maximises: disagreement on the augmented input, minus ``lam``
    times how far the augmentation moved the teacher.

    Per position: ``T^2 KL(p_T(g(x)) || p_S(g(x))) - lam * T^2 KL(p_T(x) || p_T(g(x)))``
    with ``p = softmax(z / T)``: ``student_logits`` and ``teacher_logits`` are the
    student's and the teacher's logits on the augmented input ``g(x)``,
    ``teacher_clean_logits`` the teacher's on the original ``x``; all ``(..., C)``. The
    first term is the KD loss the student will see on ``g(x)`` (the augmentation is hard
    for the student), the second keeps the augmented input valid for the teacher (it
    still says about ``x`` what it said before). Both terms are :func:`kd` with
    ``reduction="none"``.

    Reduction (``"mean"``): :func:`reduce_positions` with ``mask``/``weights``;
    ``"none"``: the per-position values (weights applied, masked-out 0). Not bounded
    below by 0: the penalty can exceed the disagreement.

    Paper: Nix, Burg, Sinz, HARD: Hard Augmentations for Robust Distillation, 2023,
    https://arxiv.org/abs/2305.14890 (the direction of each KL and the temperature are
    this library's choices; see docs/methods.md).
    """
    if isinstance(lam, bool) or not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"hard_objective: lam must be a finite number >= 0, got {lam!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"hard_objective: reduction must be 'mean' or 'none', got {reduction!r}")
    if teacher_clean_logits.shape != teacher_logits.shape:
        raise ValueError(f"hard_objective: teacher_clean_logits {tuple(teacher_clean_logits.shape)} and "
                         f"teacher_logits {tuple(teacher_logits.shape)} must have the same shape")
    disagreement = kd(student_logits, teacher_logits, temperature=temperature, reduction="none")  # (...)
    # kd(input, target) is T^2 KL(target || input): here KL(p_T(x) || p_T(g(x))).
    teacher_change = kd(teacher_logits, teacher_clean_logits, temperature=temperature, reduction="none")  # (...)
    per_position = disagreement - lam * teacher_change  # (...)
    if reduction == "none":
        return weigh_positions(per_position, mask=mask, weights=weights)
    return reduce_positions(per_position, mask=mask, weights=weights)
