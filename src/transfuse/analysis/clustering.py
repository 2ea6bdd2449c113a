"""Clustering accuracy for novel class discovery: the best one-to-one match of clusters to classes.

A discovery model names its novel clusters in an arbitrary order, so its accuracy on the
novel classes is measured after the Hungarian matching of clusters to classes that makes
the most samples agree (Kuhn's assignment, :func:`scipy.optimize.linear_sum_assignment`),
as in the NCD literature (UNO, Cr-KD: ``cluster_acc`` in their ``utils/eval_utils.py``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _labels(values, what: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-d array of integer labels, got shape {array.shape} dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{what} must hold labels >= 0, got {int(array.min())}")
    return array.astype(np.int64)


def cluster_mapping(y_true, y_pred) -> dict[int, int]:
    """The cluster -> class map (``{cluster: class}``) that maximises the number of agreeing samples.

    One-to-one: each cluster goes to at most one class and each class to at most one
    cluster; with more clusters than classes the extra clusters are left out of the map
    (their samples count as wrong). Only labels that occur are matched.
    """
    true, pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {true.size} and {pred.size}")
    classes, true_idx = np.unique(true, return_inverse=True)
    clusters, pred_idx = np.unique(pred, return_inverse=True)
    counts = np.zeros((len(clusters), len(classes)), dtype=np.int64)  # (clusters, classes) co-occurrences
    np.add.at(counts, (pred_idx, true_idx), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(clusters[r]): int(classes[c]) for r, c in zip(rows, cols)}


def cluster_accuracy(y_true, y_pred) -> float:
    """The fraction of samples whose cluster maps to their class under :func:`cluster_mapping`.

    ``y_true``, ``y_pred``: 1-d integer labels (tensors, arrays or lists) of equal length;
    cluster ids need not be class ids. 1.0 for any relabelling of a perfect clustering.
    An empty input raises ``ValueError``.
    """
    true, pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if true.size == 0:
        raise ValueError("cluster_accuracy got no samples")
    mapping = cluster_mapping(true, pred)
    mapped = np.array([mapping.get(int(c), -1) for c in pred])
    return float((mapped == true).mean())


def novel_class_scores(logits: torch.Tensor, targets: torch.Tensor, *, novel: Sequence[int]) -> dict[str, float]:
    """Task-aware scores of a model with one head over known and novel classes.

    ``logits`` ``(N, C)``, ``targets`` ``(N,)``; ``novel`` the novel classes' indices (the
    columns of the novel head; the rest are the known head). Returns:

    * ``novel_cluster_accuracy`` -- on the samples of novel classes, the argmax over the
      novel head only, Hungarian-matched to the classes (:func:`cluster_accuracy`);
    * ``known_accuracy`` -- on the samples of known classes, the argmax over the known head
      only (no matching: those columns are the classes);
    * ``all_cluster_accuracy`` -- task-agnostic: every sample, the argmax over the whole
      head, Hungarian-matched over all classes (UNO's "all", ``split_cluster_acc_v2``).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"novel_class_scores: expected logits (N, C) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    num_classes = logits.shape[1]
    novel = sorted({int(c) for c in novel})
    if not novel or novel[0] < 0 or novel[-1] >= num_classes or len(novel) == num_classes:
        raise ValueError(f"novel_class_scores: novel must name some but not all of the classes 0..{num_classes - 1}, "
                         f"got {novel}")
    known = [c for c in range(num_classes) if c not in set(novel)]
    targets = targets.long().cpu()
    logits = logits.float().cpu()
    is_novel = torch.isin(targets, torch.tensor(novel))
    if not bool(is_novel.any()) or bool(is_novel.all()):
        raise ValueError("novel_class_scores: the samples must include both known and novel classes")
    novel_pred = torch.tensor(novel)[logits[is_novel][:, novel].argmax(1)]
    known_pred = torch.tensor(known)[logits[~is_novel][:, known].argmax(1)]
    return {
        "novel_cluster_accuracy": cluster_accuracy(targets[is_novel], novel_pred),
        "known_accuracy": float((known_pred == targets[~is_novel]).float().mean()),
        "all_cluster_accuracy": cluster_accuracy(targets, logits.argmax(1)),
    }


__all__ = ["cluster_accuracy", "cluster_mapping", "novel_class_scores"]
