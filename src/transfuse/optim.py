"""Optimizers and learning-rate schedules, from typed arguments.

The learning rate is a pure function of the step (:func:`lr_at`), set on the optimizer
before every step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def make_optimizer(
    params: Iterable[torch.nn.Parameter], *, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """``sgd`` (Nesterov-free momentum), ``adam`` or ``adamw`` over the trainable ``params``."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to optimise: no parameter requires a gradient")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: adam, adamw, sgd")


def lr_at(step: int, *, base_lr: float, total_steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then constant or cosine to 0."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: constant, cosine")
