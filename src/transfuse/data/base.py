"""What every data source returns: train/test splits of dict-batched, indexed samples.

A sample is a dict ``{"input": Tensor, "target": int64 Tensor, "index": int64 Tensor,
"sample_id": int64 Tensor}``. ``index`` is the sample's position in the current dataset,
renumbered from 0 by every subset: memory banks (CRD) need ``0..N-1``. ``sample_id`` is its
position in the original split of its data set and survives subsetting: a teacher-output
cache looks samples up by it (see :mod:`transfuse.data.ids`). Batches are dicts too, so
language-model batches (``input_ids``, ``attention_mask``, ``labels``) fit the same engine later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..registry import Registry
from .ids import check_ids

Batch = dict[str, torch.Tensor]

#: Data sets a config can name. Each entry is a function returning :class:`DataSplits`.
DATASETS: Registry[Callable[..., "DataSplits"]] = Registry("dataset")


class ArrayDataset(Dataset):
    """In-memory samples as tensors: inputs ``(N, *input_shape)``, targets ``(N,)``, ids ``(N,)``.

    ``ids`` are the samples' stable ids (default ``0..N-1``: positions in the original
    split); :meth:`subset` keeps them. ``__getitems__`` lets
    :class:`torch.utils.data.DataLoader` gather a batch with one indexing op instead of
    ``batch_size`` Python calls plus a collate, which keeps the framework's overhead near a
    hand-written loop on small models.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, *, ids: Any = None) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs has {len(inputs)} samples but targets has {len(targets)}")
        self.inputs = inputs
        self.targets = targets.long()
        n = len(self.targets)
        self._ids = torch.arange(n) if ids is None else check_ids(ids, n, where="ArrayDataset")

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def sample_ids(self) -> torch.Tensor:
        """Stable sample ids ``(N,)`` int64, in dataset order (do not modify in place)."""
        return self._ids

    def __getitem__(self, i: int) -> Batch:
        return {"input": self.inputs[i], "target": self.targets[i], "index": torch.tensor(i), "sample_id": self._ids[i]}

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)  # (B,)
        return {"input": self.inputs[idx], "target": self.targets[idx], "index": idx, "sample_id": self._ids[idx]}

    def subset(self, indices: torch.Tensor) -> "ArrayDataset":
        """A new dataset of the given rows: ``index`` is renumbered from 0, ``sample_id`` kept."""
        return ArrayDataset(self.inputs[indices], self.targets[indices], ids=self._ids[indices])

    def with_ids(self, ids: Any) -> "ArrayDataset":
        """The same samples (tensors shared, not copied) with new sample ids ``(N,)``."""
        return ArrayDataset(self.inputs, self.targets, ids=ids)


@dataclass
class DataSplits:
    """A data set ready to train on."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]


def first_batch(dataset: Dataset, n: int = 8) -> Batch:
    """The first ``min(n, len(dataset))`` samples as one batch (used to probe output shapes)."""
    indices = list(range(min(n, len(dataset))))
    getitems = getattr(dataset, "__getitems__", None)
    return collate_batch(getitems(indices) if getitems else [dataset[i] for i in indices])


def collate_batch(items: Any) -> Batch:
    """Collate for the engine's loader: a pre-batched dict passes through, a list of
    dict samples is stacked key by key (so ``index``, ``sample_id`` and any key of a
    user's own pass through unchanged), and ``(input, target)`` tuples become dicts."""
    if isinstance(items, dict):
        return items
    first = items[0]
    if isinstance(first, dict):
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in first}
    if isinstance(first, (tuple, list)) and len(first) == 2:
        return {
            "input": torch.stack([torch.as_tensor(it[0]) for it in items]),
            "target": torch.as_tensor([int(it[1]) for it in items], dtype=torch.long),
        }
    raise TypeError(
        "a dataset sample must be a dict with 'input' and 'target' or an (input, target) "
        f"pair; got {type(first).__name__}"
    )
