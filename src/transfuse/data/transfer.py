"""Hinton's transfer set: labelled samples plus unlabelled ones the teacher still answers.

Distillation needs no labels: the teacher's soft targets carry the signal. A transfer set
is a small labelled subset (for the cross-entropy term) and the rest of the data without
labels (for the distillation term only). https://arxiv.org/abs/1503.02531 (section 2)

Typical use::

    labelled = stratified_subset(train, 100, seed=0)
    transfer = TransferSet(labelled, complement(train, labelled))
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .base import ArrayDataset, Batch, collate_batch
from .ids import sample_ids_of

#: The target of a sample without a label. Negative, so it is never a class id; losses
#: that use targets must mask these samples out (``batch["labelled"]``).
IGNORE_TARGET = -1


def _targets_of(dataset: Any) -> torch.Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i]["target"]) for i in range(len(dataset))]
    return torch.as_tensor(targets).long()


def _input_spec(dataset: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Per-sample input shape and dtype, from the first sample (None for an empty dataset)."""
    if isinstance(dataset, ArrayDataset):
        return tuple(dataset.inputs.shape[1:]), dataset.inputs.dtype
    if len(dataset) == 0:
        return None
    sample = dataset[0]
    if "input" not in sample:  # token fields: their lengths may vary per sample, nothing to compare
        return None
    value = torch.as_tensor(sample["input"])
    return tuple(value.shape), value.dtype


class TransferSet(Dataset):
    """The samples of ``labelled`` followed by those of ``unlabelled``, with their labels hidden.

    Each part yields dict samples ``{"input", "target", "index", "sample_id"}``. A sample
    of the transfer set adds ``"labelled"`` (bool: True for the labelled part) and has
    ``"target"`` = :data:`IGNORE_TARGET` in the unlabelled part (a real target there never
    leaks), ``"index"`` = its position in the concatenation (``0..len-1``, for memory banks)
    and ``"sample_id"`` kept from its part (for the teacher-output cache).

    ``ValueError`` if the parts share a sample id (offset one part's ids with
    :func:`~transfuse.data.ids.with_id_offset`) or their inputs differ in shape or dtype.
    """

    def __init__(self, labelled: Dataset, unlabelled: Dataset) -> None:
        self.labelled, self.unlabelled = labelled, unlabelled
        ids_l, ids_u = sample_ids_of(labelled), sample_ids_of(unlabelled)
        shared = ids_l[torch.isin(ids_l, ids_u)]
        if len(shared):
            raise ValueError(
                f"TransferSet: the labelled and unlabelled parts share {len(shared)} sample id(s) "
                f"(e.g. {shared[:5].tolist()}); give one part disjoint ids, e.g. "
                "with_id_offset(unlabelled, int(labelled.sample_ids.max()) + 1), or build the unlabelled "
                "part with complement(train, labelled)"
            )
        spec_l, spec_u = _input_spec(labelled), _input_spec(unlabelled)
        if spec_l is not None and spec_u is not None and spec_l != spec_u:
            raise ValueError(
                f"TransferSet: labelled inputs are {spec_l[0]} {spec_l[1]} per sample but unlabelled inputs are "
                f"{spec_u[0]} {spec_u[1]}; expected the same per-sample shape and dtype"
            )
        self._ids = torch.cat([ids_l, ids_u])  # (N,)
        self._targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def num_labelled(self) -> int:
        """How many samples carry a label: the first ``num_labelled`` of the set."""
        return len(self.labelled)  # type: ignore[arg-type]

    @property
    def sample_ids(self) -> torch.Tensor:
        """Stable sample ids ``(N,)`` int64: the labelled part's, then the unlabelled part's."""
        return self._ids

    @property
    def targets(self) -> torch.Tensor:
        """Targets ``(N,)`` int64, :data:`IGNORE_TARGET` for every unlabelled sample."""
        if self._targets is None:
            hidden = torch.full((len(self) - self.num_labelled,), IGNORE_TARGET, dtype=torch.long)
            self._targets = torch.cat([_targets_of(self.labelled), hidden])
        return self._targets

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(f"TransferSet: index {i} out of range for {len(self)} samples")
        is_labelled = i < self.num_labelled
        sample = dict(self.labelled[i] if is_labelled else self.unlabelled[i - self.num_labelled])
        if not is_labelled:
            sample["target"] = torch.tensor(IGNORE_TARGET)
        sample["index"] = torch.tensor(i)
        sample["labelled"] = torch.tensor(is_labelled)
        return sample

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        if not (isinstance(self.labelled, ArrayDataset) and isinstance(self.unlabelled, ArrayDataset)):
            return collate_batch([self[int(i)] for i in indices])
        idx = torch.as_tensor(indices, dtype=torch.long)  # (B,)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"TransferSet: indices must lie in [0, {len(self)}); got {idx.min()}..{idx.max()}")
        is_labelled = idx < self.num_labelled  # (B,)
        rows_l, rows_u = is_labelled.nonzero().flatten(), (~is_labelled).nonzero().flatten()
        # One gather per part, then each part's rows written back to their places in the batch.
        part_l = self.labelled.__getitems__(idx[rows_l])
        part_u = self.unlabelled.__getitems__(idx[rows_u] - self.num_labelled)
        batch = {}
        for key, value in part_l.items():
            merged = value.new_empty((len(idx), *value.shape[1:]))
            merged[rows_l], merged[rows_u] = value, part_u[key]
            batch[key] = merged
        batch["target"][rows_u] = IGNORE_TARGET
        batch["index"] = idx
        batch["labelled"] = is_labelled
        return batch


def complement(dataset: Any, subset_ids: Any) -> Any:
    """The samples of ``dataset`` whose sample id is not in ``subset_ids``, in dataset order.

    ``subset_ids``: a tensor of ids, or a dataset with ``sample_ids`` (a subset of
    ``dataset``). Returns ``dataset.subset(...)`` (an ArrayDataset or SampleDataset), so
    sample ids are kept and ``index`` is renumbered. ``ValueError`` if some of
    ``subset_ids`` are not in ``dataset`` (a subset of another split, most likely).
    """
    ids = sample_ids_of(dataset)
    taken = sample_ids_of(subset_ids) if isinstance(subset_ids, Dataset) else torch.as_tensor(subset_ids).long()
    unknown = taken[~torch.isin(taken, ids)]
    if len(unknown):
        raise ValueError(
            f"complement: {len(unknown)} of the given sample ids are not in the dataset (e.g. "
            f"{unknown[:5].tolist()}); expected the ids of a subset of this dataset"
        )
    return dataset.subset((~torch.isin(ids, taken)).nonzero().flatten())
