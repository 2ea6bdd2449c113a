"""Small helpers the built-in models share: input-shape checks and weight initialisation."""

from __future__ import annotations

from typing import Sequence

from torch import nn


def image_shape(input_shape: Sequence[int], *, model: str) -> tuple[int, int, int]:
    """``input_shape`` as ``(C, H, W)``; a convolutional model cannot take anything else."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"model {model!r} needs an image input_shape (channels, height, width); got {shape}. "
            "Use 'mlp' for flat inputs."
        )
    return shape  # type: ignore[return-value]


def positive_ints(values: Sequence[int] | int, *, option: str, model: str) -> list[int]:
    """A list option of positive integers (``hidden``, ``channels``), checked with a clear error."""
    items = [values] if isinstance(values, int) else list(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ValueError(f"model {model!r}: option {option!r} must be a list of positive integers; got {values!r}")
    return items


def init_conv_bn(module: nn.Module) -> None:
    """He-normal convolutions (fan-out) and unit/zero BatchNorm, as the ResNet and WRN papers do."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
