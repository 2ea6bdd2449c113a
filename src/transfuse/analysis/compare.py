"""Two models on one data set: accuracy and calibration of each, their agreement, the flips between them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .metrics import accuracy, agreement, expected_calibration_error, prediction_flips
from .predict import predict


def compare_logits(a_logits: torch.Tensor, b_logits: torch.Tensor, targets: torch.Tensor, *, n_bins: int = 15) -> dict[str, Any]:
    """The comparison of two models' logits ``(N, C)`` on the same samples, ``targets`` ``(N,)``.

    Returns ``{"samples", "a": {"accuracy", "ece"}, "b": {...}, "agreement", "flips"}``:
    ``agreement`` is the top-1 agreement of A and B, ``flips`` the
    :func:`~transfuse.analysis.prediction_flips` from A (before) to B (after), so
    ``b.accuracy - a.accuracy == flips.positive_rate - flips.negative_rate``. ECE with
    ``n_bins`` equal-width bins.
    """
    if a_logits.shape != b_logits.shape:
        raise ValueError(f"the two models' logits differ in shape: {tuple(a_logits.shape)} and {tuple(b_logits.shape)}")
    return {
        "samples": int(targets.shape[0]),
        "a": {"accuracy": accuracy(a_logits, targets), "ece": expected_calibration_error(a_logits, targets, n_bins=n_bins)},
        "b": {"accuracy": accuracy(b_logits, targets), "ece": expected_calibration_error(b_logits, targets, n_bins=n_bins)},
        "agreement": agreement(a_logits, b_logits),
        "flips": prediction_flips(a_logits, b_logits, targets),
    }


def compare(
    model_a: nn.Module, model_b: nn.Module, dataset: Dataset, *, batch_size: int = 512,
    device: str | torch.device = "cpu", n_bins: int = 15,
) -> dict[str, Any]:
    """Run both models over ``dataset`` (:func:`~transfuse.analysis.predict`, eval mode,
    in order) and compare them (:func:`compare_logits`; A is "before", B "after")."""
    a_logits, targets = predict(model_a, dataset, batch_size=batch_size, device=device)
    b_logits, b_targets = predict(model_b, dataset, batch_size=batch_size, device=device)
    if not torch.equal(targets, b_targets):  # a data set that is not deterministic would compare nothing
        raise ValueError("the data set gave different targets on the two passes; compare needs a fixed order")
    return compare_logits(a_logits, b_logits, targets, n_bins=n_bins)
