"""What every data source returns: train/test splits of dict-batched, indexed samples.

A sample is a dict ``{"input": Tensor, "target": int64 Tensor, "index": int64 Tensor}``.
``index`` is the sample's position in its split: memory banks (CRD) and a teacher-output
cache look samples up by it. Batches are dicts too, so language-model batches
(``input_ids``, ``attention_mask``, ``labels``) fit the same engine later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..registry import Registry

Batch = dict[str, torch.Tensor]

#: Data sets a config can name. Each entry is a function returning :class:`DataSplits`.
DATASETS: Registry[Callable[..., "DataSplits"]] = Registry("dataset")


class ArrayDataset(Dataset):
    """In-memory samples as two tensors, fetched a whole batch at a time.

    ``__getitems__`` lets :class:`torch.utils.data.DataLoader` gather a batch with one
    indexing op instead of ``batch_size`` Python calls plus a collate, which keeps the
    framework's overhead near a hand-written loop on small models.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs has {len(inputs)} samples but targets has {len(targets)}")
        self.inputs = inputs
        self.targets = targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Batch:
        return {"input": self.inputs[i], "target": self.targets[i], "index": torch.tensor(i)}

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"input": self.inputs[idx], "target": self.targets[idx], "index": idx}

    def subset(self, indices: torch.Tensor) -> "ArrayDataset":
        """A new dataset of the given rows (indices are renumbered from 0)."""
        return ArrayDataset(self.inputs[indices], self.targets[indices])


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
    dict samples is stacked, and ``(input, target)`` tuples become dicts."""
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
