"""Scores of a language model's next-token predictions over the positions that carry loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.text import IGNORE_INDEX
from .metrics import accuracy, agreement, expected_calibration_error

#: Targets with this value are not scored (padding, prompts, a row's last position).
UNSCORED = IGNORE_INDEX


def scored_positions(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits[m], targets[m])`` for the scored positions ``m = targets != -100``:
    ``(M, V)`` and ``(M,)``, from ``(..., V)`` logits and ``(...)`` next-token targets."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"token logits {tuple(logits.shape)} must be (..., V) over the targets' positions "
                         f"{tuple(targets.shape)}")
    keep = targets != UNSCORED
    if not bool(keep.any()):
        raise ValueError("no position carries a target (every target is -100)")
    return logits[keep], targets[keep]


def token_scores(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Next-token ``accuracy``, ``ece``, ``nll`` (mean cross-entropy, nats) and ``perplexity``
    (``exp(nll)``) over the scored positions (targets other than -100) of ``(..., V)`` logits."""
    flat_logits, flat_targets = scored_positions(logits, targets)
    nll = float(F.cross_entropy(flat_logits.float(), flat_targets.long()))
    return {
        "accuracy": accuracy(flat_logits, flat_targets),
        "ece": expected_calibration_error(flat_logits, flat_targets),
        "nll": nll,
        "perplexity": math.exp(min(nll, 700.0)),
    }


def token_agreement(a_logits: torch.Tensor, b_logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 agreement of two models over the scored positions."""
    a, _ = scored_positions(a_logits, targets)
    b, _ = scored_positions(b_logits, targets)
    return agreement(a, b)
