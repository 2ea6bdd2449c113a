"""Class-balanced subsets of a training split, for the low-label regime."""

from __future__ import annotations

from typing import Any

import torch

from .transfer import IGNORE_TARGET, TransferSet


def _quotas(counts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Samples to take per class: as equal as the class sizes allow, summing to ``n``.

    Water-filling: every class gets ``level`` samples (or all it has, if fewer), with the
    largest ``level`` that fits; the few left over go one each to classes with samples to
    spare, chosen at random so no class is favoured by its label.
    """
    level = 0
    while level < int(counts.max()) and int(counts.clamp(max=level + 1).sum()) <= n:
        level += 1
    quotas = counts.clamp(max=level)
    spare = (counts > quotas).nonzero().flatten()
    left = n - int(quotas.sum())
    chosen = spare[torch.randperm(len(spare), generator=generator)[:left]]
    quotas[chosen] += 1
    return quotas


def stratified_subset(dataset: Any, n: int, *, seed: int, by: Any = None) -> Any:
    """``n`` samples of ``dataset``, as close to equally many per class as possible.

    Deterministic for a ``seed``; which samples of a class are taken is random. Works on an
    :class:`~transfuse.data.base.ArrayDataset`, or any dataset with ``targets`` ``(N,)``
    and ``subset(indices)``. The subset's ``index`` field is renumbered from 0; its
    ``sample_id`` is kept, so ``complement(dataset, subset)`` gives the samples left out.

    Every target must be a class id ``>= 0``: an unlabelled sample (target
    ``IGNORE_TARGET``) has no class to balance, so a :class:`TransferSet` is refused.

    ``by`` ``(N,)`` integers >= 0: the groups to balance instead of the classes (token rows
    have no class; their ``domain`` does); the dataset then needs only ``subset(indices)``.
    """
    if isinstance(dataset, TransferSet):
        raise TypeError(
            "stratified_subset: got a TransferSet, whose unlabelled samples have no class; draw the subset "
            "from the labelled training split first, then build TransferSet(subset, complement(train, subset))"
        )
    if by is not None:
        return _balanced_subset(dataset, torch.as_tensor(by).long(), n, seed=seed)
    if not hasattr(dataset, "targets") or not hasattr(dataset, "subset"):
        raise TypeError(
            "stratified_subset: expected an ArrayDataset, SampleDataset or another dataset with `targets` "
            f"and `subset(indices)`; got {type(dataset).__name__}"
        )
    targets = torch.as_tensor(dataset.targets).long()
    if len(targets) and int(targets.min()) < 0:
        raise ValueError(
            f"stratified_subset: targets must be class ids >= 0; found {int(targets.min())} "
            f"(IGNORE_TARGET = {IGNORE_TARGET} marks an unlabelled sample, which no class subset may draw)"
        )
    return _balanced_subset(dataset, targets, n, seed=seed)


def _balanced_subset(dataset: Any, targets: torch.Tensor, n: int, *, seed: int) -> Any:
    """``n`` samples of ``dataset``, as equally many per value of ``targets`` ``(N,)`` as possible."""
    if not hasattr(dataset, "subset") or targets.dim() != 1 or len(targets) != len(dataset):
        raise ValueError(f"stratified_subset: expected a dataset with subset(indices) and one group per sample "
                         f"({len(dataset)}); got {type(dataset).__name__} and groups of shape {tuple(targets.shape)}")
    if not 1 <= n <= len(targets):
        raise ValueError(f"stratified_subset: n must be in [1, {len(targets)}] (the dataset's size); got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    classes, counts = torch.unique(targets, return_counts=True)  # sorted classes
    quotas = _quotas(counts, n, generator)
    picked = []
    for cls, quota in zip(classes.tolist(), quotas.tolist()):
        members = (targets == cls).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    # Ascending order keeps the subset in the dataset's original order.
    indices = torch.cat(picked).sort().values
    return dataset.subset(indices)
