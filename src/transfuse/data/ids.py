"""Stable sample ids: a sample's position in the original split of its data set.

``index`` is renumbered whenever a dataset is subset (memory banks need ``0..N-1``), so it
cannot key anything that outlives one dataset object. ``sample_id`` never changes: a
teacher-output cache written for a whole split answers correctly for any subset of it.
"""

from __future__ import annotations

from typing import Any

import torch


def check_ids(ids: Any, n: int, *, where: str) -> torch.Tensor:
    """``ids`` as an int64 tensor ``(n,)`` of distinct, non-negative integers, or ``ValueError``.

    Duplicates are refused because two samples with one id would read each other's cached
    teacher outputs; negative ids because caches address their rows by id.
    """
    tensor = torch.as_tensor(ids)
    if tensor.dim() != 1 or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{where}: ids must be a 1-d integer tensor; got {tensor.dtype} {tuple(tensor.shape)}")
    if len(tensor) != n:
        raise ValueError(f"{where}: expected {n} ids (one per sample); got {len(tensor)}")
    tensor = tensor.long()
    if n and int(tensor.min()) < 0:
        raise ValueError(f"{where}: ids must be non-negative; found {int(tensor.min())}")
    duplicates = n - len(torch.unique(tensor))
    if duplicates:
        raise ValueError(f"{where}: ids must be distinct; {duplicates} duplicate(s) found")
    return tensor


def sample_ids_of(dataset: Any) -> torch.Tensor:
    """The sample ids ``(N,)`` int64 of ``dataset``: its ``sample_ids`` property, or else read
    from every sample's ``"sample_id"`` (``ValueError`` if the samples carry none)."""
    ids = getattr(dataset, "sample_ids", None)
    if ids is not None:
        return torch.as_tensor(ids).long()
    values = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if not isinstance(sample, dict) or "sample_id" not in sample:
            raise ValueError(
                f"expected samples with a 'sample_id'; sample {i} of {type(dataset).__name__} has none "
                "(wrap the dataset with from_datasets or SampleDataset, which number them)"
            )
        values.append(int(sample["sample_id"]))
    return torch.tensor(values, dtype=torch.long)


def with_id_offset(dataset: Any, offset: int) -> Any:
    """The same samples with ``offset`` added to every sample id (index and order unchanged).

    Gives a second data set ids disjoint from the first's, so both can share one
    teacher-output cache or one :class:`~transfuse.data.transfer.TransferSet`: e.g.
    ``with_id_offset(extra, len(train))``. Works on any dataset with ``with_ids(ids)``
    (:class:`~transfuse.data.base.ArrayDataset`, :class:`~transfuse.data.tensors.SampleDataset`).
    """
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"with_id_offset: offset must be an int; got {type(offset).__name__}")
    if not hasattr(dataset, "with_ids"):
        raise TypeError(
            f"with_id_offset: expected an ArrayDataset or SampleDataset (a dataset with with_ids(ids)); "
            f"got {type(dataset).__name__}"
        )
    return dataset.with_ids(sample_ids_of(dataset) + offset)
