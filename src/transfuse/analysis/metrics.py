"""What moved between models: accuracy, top-1 agreement, calibration and prediction flips.

Pure functions of logits ``(N, C)`` and integer targets ``(N,)``; each returns Python floats.
"""

from __future__ import annotations

import torch


def _check(logits: torch.Tensor, targets: torch.Tensor | None = None, *, what: str = "logits") -> None:
    if logits.dim() != 2:
        raise ValueError(f"{what} must have shape (N, num_classes); got {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError(f"{what} is empty: no samples to score")
    if targets is not None and targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must have shape ({logits.shape[0]},); got {tuple(targets.shape)}")


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of samples whose top-1 prediction is the target."""
    _check(logits, targets)
    return (logits.argmax(dim=1) == targets).float().mean().item()


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Top-1 agreement: fraction of samples where student and teacher predict the same class
    (Stanton et al., 2021, "Does knowledge distillation really work?")."""
    _check(student_logits, what="student_logits")
    _check(teacher_logits, what="teacher_logits")
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student has {student_logits.shape[0]} samples but teacher has {teacher_logits.shape[0]}")
    return (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean().item()


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, *, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017) with ``n_bins`` equal-width confidence bins.

    Confidence is the top softmax probability; bin ``b`` holds confidences in
    ``((b-1)/n_bins, b/n_bins]``. ECE = sum over bins of ``(n_b / N) * |accuracy_b - mean confidence_b|``.
    """
    _check(logits, targets)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    probs = torch.softmax(logits.detach().double(), dim=1)  # double: sums of many small terms
    confidence, prediction = probs.max(dim=1)  # (N,), (N,)
    correct = (prediction == targets).double()
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(confidence, inner_edges)  # right-closed bins: edge values go to the lower bin
    count = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.bincount(bins, weights=confidence, minlength=n_bins)
    correct_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    # Sum over bins of |correct_b - conf_b| / N equals the count-weighted |acc_b - conf_b|.
    return ((correct_sum - conf_sum).abs().sum() / count.sum()).item()


def flips(before_logits: torch.Tensor, after_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """How predictions changed from one model to another (e.g. before and after distillation).

    Returns fractions of all samples: ``positive_flips`` (wrong before, right after) and
    ``negative_flips`` (right before, wrong after). Their difference is the accuracy change.
    :func:`prediction_flips` gives the counts as well.
    """
    counted = prediction_flips(before_logits, after_logits, targets)
    return {"positive_flips": counted["positive_rate"], "negative_flips": counted["negative_rate"]}


def prediction_flips(before_logits: torch.Tensor, after_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | int]:
    """Prediction flips from a model ``before`` to a model ``after``, counted and as rates.

    A positive flip is a sample the top-1 prediction got wrong before and right after; a
    negative flip one it got right before and wrong after (Roth et al., ICLR 2024, count
    these to measure knowledge gained and lost in a transfer; Yan et al., CVPR 2021, call
    the negative ones regression errors). Returns ``samples`` (N), ``positive`` and
    ``negative`` (counts), ``positive_rate`` and ``negative_rate`` (counts / N; their
    difference is the accuracy change from before to after) and ``changed`` (samples whose
    top-1 class differs, right or wrong).

    Shapes: logits ``(N, C)`` each, ``targets`` ``(N,)`` integer class ids.
    """
    _check(before_logits, targets, what="before_logits")
    _check(after_logits, targets, what="after_logits")
    pred_before, pred_after = before_logits.argmax(dim=1), after_logits.argmax(dim=1)
    right_before, right_after = pred_before == targets, pred_after == targets
    n = int(targets.shape[0])
    positive = int((~right_before & right_after).sum().item())
    negative = int((right_before & ~right_after).sum().item())
    return {
        "samples": n,
        "positive": positive,
        "negative": negative,
        "positive_rate": positive / n,
        "negative_rate": negative / n,
        "changed": int((pred_before != pred_after).sum().item()),
    }
