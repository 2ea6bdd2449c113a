"""Non-IID client splits: Dirichlet label skew, the transfer set kept out, each client's label mix.

:func:`dirichlet_split` is the label-skew partition of Hsu et al. (2019), used by most
federated-learning benchmarks: for every class, the class's samples are divided among the
clients in proportions drawn from ``Dirichlet(alpha, ..., alpha)``. A small ``alpha``
(0.1) gives each client a few dominant classes; a large one (100) approaches an IID split.
All randomness comes from a numpy generator seeded with ``seed``, so a split is a pure
function of ``(targets, num_clients, alpha, seed, min_size)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["class_proportions", "dirichlet_split", "holdout_split"]


def _check_targets(targets: Sequence[int] | np.ndarray) -> np.ndarray:
    labels = np.asarray(targets)
    if labels.ndim != 1:
        raise ValueError(f"targets must be one class id per sample, shape (N,); got shape {labels.shape}")
    if labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0):
        raise ValueError("targets must be non-negative integer class ids")
    return labels.astype(np.int64)


def dirichlet_split(
    targets: Sequence[int] | np.ndarray,
    *,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Positions of ``targets`` per client: ``num_clients`` disjoint sorted int64 arrays covering every sample.

    For each class ``c``, ``q ~ Dirichlet(alpha * 1_C)`` and the class's samples (in a
    seeded random order) are cut at the cumulative fractions of ``q``. Draws where a
    client ends with fewer than ``min_size`` samples are redrawn (up to ``max_tries``
    times; then a ValueError suggests a larger ``alpha`` or a smaller ``min_size``).

    ``alpha`` > 0 (finite); ``num_clients`` >= 1; ``min_size`` >= 0 with
    ``num_clients * min_size <= len(targets)``.
    """
    labels = _check_targets(targets)
    n = len(labels)
    if not (isinstance(num_clients, (int, np.integer)) and num_clients >= 1):
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (the Dirichlet concentration) must be a finite number > 0, got {alpha!r}")
    if not (isinstance(min_size, (int, np.integer)) and min_size >= 0):
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
    if num_clients > n:
        raise ValueError(f"num_clients ({num_clients}) is more than the {n} samples to split; every client needs data")
    if num_clients * min_size > n:
        raise ValueError(
            f"{num_clients} clients with min_size {min_size} need {num_clients * min_size} samples, but there are {n}; "
            "lower min_size or num_clients"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))  # this class's positions, shuffled
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))  # (clients,)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        split = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(s) for s in split) >= max(min_size, 1):
            return split
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} samples into {num_clients} clients gave every client "
        f">= {max(min_size, 1)} samples in {max_tries} draws; use a larger alpha, fewer clients or a smaller min_size"
    )


def holdout_split(num_samples: int, *, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(held_out, rest)``: ``size`` positions of ``0..num_samples-1`` drawn at random, and the others (both sorted).

    The held-out part is the shared transfer set, kept out of every client's data.
    """
    if not (isinstance(size, (int, np.integer)) and 1 <= size < num_samples):
        raise ValueError(f"the transfer set size must be an integer in [1, {num_samples - 1}], got {size!r}")
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.sort(order[:size]).astype(np.int64), np.sort(order[size:]).astype(np.int64)


def class_proportions(targets: Sequence[int] | np.ndarray, *, num_classes: int) -> np.ndarray:
    """The label distribution of ``targets``: ``(num_classes,)`` float64 summing to 1."""
    labels = _check_targets(targets)
    if not len(labels):
        raise ValueError("class_proportions: no targets")
    if labels.max() >= num_classes:
        raise ValueError(f"class_proportions: class id {labels.max()} is not below num_classes={num_classes}")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return counts / counts.sum()
