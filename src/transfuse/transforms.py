"""Batch transforms a config can name: run on each micro-batch after it reaches the device
and before the forward pass, so every participant sees the transformed batch.

A transform is ``transform(batch, *, step, distiller) -> batch``; it may query any
participant through ``distiller.sources`` (mixup labelled by the teacher, adversarial
samples, generation by the student). Randomness must come from torch's global RNG, which
checkpoints save and restore, so a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .registry import Registry

#: Transforms a config can name (``transforms: [{name: ..., options: {...}}]``).
TRANSFORMS: Registry[type] = Registry("transform")


@TRANSFORMS.register("gaussian_noise", summary="add N(0, std^2) noise to the float input, a fresh draw per step")
class GaussianNoise:
    """``input + std * N(0, 1)`` on the batch's ``input`` (float inputs only): the same noisy
    images go to the student and the teacher, so the teacher labels what the student sees."""

    def __init__(self, *, std: float = 0.1) -> None:
        if not (std >= 0 and math.isfinite(std)):
            raise ValueError(f"gaussian_noise: std must be a finite number >= 0, got {std}")
        self.std = float(std)

    def __call__(self, batch: dict[str, torch.Tensor], *, step: int, distiller: Any = None) -> dict[str, torch.Tensor]:
        x = batch.get("input")
        if x is None or not x.is_floating_point():
            raise ValueError("gaussian_noise needs a float 'input' in the batch (image or feature data)")
        return {**batch, "input": x + self.std * torch.randn_like(x)}


def make_transform(name: str, **options: Any):
    """The registered transform ``name`` built with ``options`` (an unknown name lists the valid ones)."""
    TRANSFORMS.check_options(name, options, where="transforms.options")
    return TRANSFORMS.get(name)(**options)
