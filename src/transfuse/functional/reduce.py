"""The one reduction every position-wise loss goes through.

A position-wise loss first computes one value per position (a row of logits, a token, a
sample's feature map), then reduces those values here. Masks (padding, ignored tokens,
samples without a teacher output) and per-sample weights therefore mean the same thing
for every loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _aligned(t: Tensor | None, values: Tensor, what: str, name: str) -> Tensor | None:
    """``t`` reshaped so it broadcasts against ``values`` from the LEFT (trailing singleton dims)."""
    if t is None:
        return None
    shape, full = tuple(t.shape), tuple(values.shape)
    if len(shape) > len(full) or shape != full[: len(shape)]:
        raise ValueError(
            f"{name}: {what} of shape {shape} must equal the per-position values' shape {full} "
            f"or a prefix of it (e.g. per-sample {full[:1]})"
        )
    return t.reshape(*shape, *([1] * (len(full) - len(shape))))


def _checked(
    values: Tensor, mask: Tensor | None, weights: Tensor | None, name: str
) -> tuple[Tensor | None, Tensor | None]:
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"{name}: mask must be a bool tensor (True = keep the position), got dtype {mask.dtype}")
    if weights is not None and not weights.is_floating_point():
        raise ValueError(f"{name}: weights must be a floating-point tensor, got dtype {weights.dtype}")
    return _aligned(mask, values, "mask", name), _aligned(weights, values, "weights", name)


def weigh_positions(values: Tensor, *, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Per-position values with the weights multiplied in and masked-out positions set to 0.

    This is what a position-wise loss returns for ``reduction="none"``, so that
    ``reduce_positions(weighed, mask=mask)`` gives the loss's ``"mean"``. Shapes and the
    alignment of ``mask``/``weights`` are as in :func:`reduce_positions`; the result has
    ``values``' shape.
    """
    return _weigh(values, mask, weights, "weigh_positions")


def _weigh(values: Tensor, mask: Tensor | None, weights: Tensor | None, name: str) -> Tensor:
    """:func:`weigh_positions`, naming the calling loss ``name`` in its errors."""
    return _apply(values, *_checked(values, mask, weights, name))


def _apply(values: Tensor, mask_b: Tensor | None, weights_b: Tensor | None) -> Tensor:
    out = values
    if mask_b is not None:
        # where, not a product: a masked-out position may hold inf or nan (a padded token's
        # garbage logits), and 0 * inf would poison the sum.
        out = torch.where(mask_b, out, torch.zeros((), dtype=out.dtype, device=out.device))
    if weights_b is not None:
        if mask_b is not None:
            # Masked too, so a nan weight of a dropped position cannot reach the gradient.
            weights_b = torch.where(mask_b, weights_b, torch.zeros((), dtype=weights_b.dtype, device=weights_b.device))
        out = out * weights_b
    return out


def reduce_positions(values: Tensor, *, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Mean of per-position loss values over the positions a mask keeps, each times its weight.

    ``values``: ``(...)``, one loss value per position. ``mask``: bool, True = the position
    counts. ``weights``: float. Each has ``values``' shape or a prefix of it (per-sample
    ``(B,)`` against per-token ``(B, T)`` values); it is aligned from the LEFT (singleton
    dims appended) and then broadcast.

    Result: ``sum(values * weights * mask) / count(mask)``, where ``count`` counts the
    positions the mask keeps (all positions without a mask). The weights are NOT
    renormalised: a per-sample learned weight multiplies its sample's loss, and weights of
    2 double the loss. Masked-out positions contribute exactly 0, even if they hold inf or
    nan. When the mask keeps nothing (or there are no positions at all) the result is a 0
    still connected to the graph (its gradient is 0), never nan.

    Without mask and weights the result is exactly ``values.mean()`` (bit-identical).
    No host synchronisation: an empty mask is handled by clamping the count, not by a
    branch on its value.
    """
    return _reduce(values, mask, weights, "reduce_positions")


def _reduce(values: Tensor, mask: Tensor | None, weights: Tensor | None, name: str) -> Tensor:
    """:func:`reduce_positions`, naming the calling loss ``name`` in its errors."""
    mask_b, weights_b = _checked(values, mask, weights, name)
    if mask_b is None and weights_b is None:
        return values.mean() if values.numel() else (values * 0).sum()
    total = _apply(values, mask_b, weights_b).sum()
    if mask_b is None:
        return total / max(values.numel(), 1)
    count = mask_b.expand(values.shape).sum()  # positions kept, as a tensor (no host sync)
    return total / count.clamp_min(1)


def _rows_from_mask(mask: Tensor, leading_shape: tuple[int, ...], name: str) -> Tensor:
    """A bool sample mask ``(B,)`` (or any prefix of ``leading_shape``) as a flat ``(N,)`` row selector.

    Used by the batch-relation losses, which compute their relation over the selected
    rows only. ``leading_shape`` is the input's shape without its feature dims.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}: mask must be a bool tensor (True = keep the sample), got dtype {mask.dtype}")
    shape, full = tuple(mask.shape), tuple(leading_shape)
    if not shape or len(shape) > len(full) or shape != full[: len(shape)]:
        raise ValueError(
            f"{name}: mask of shape {shape} must select samples: shape {full[:1]} "
            f"(or a prefix of {full} with at least one dim)"
        )
    return mask.reshape(*shape, *([1] * (len(full) - len(shape)))).expand(full).reshape(-1)


def _refuse_weights(weights: Tensor | None, name: str) -> None:
    """Batch-relation losses have no per-sample value to weight."""
    if weights is not None:
        raise ValueError(f"{name} is a batch-relation loss; per-sample weights are not defined")
