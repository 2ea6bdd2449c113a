"""Bring your own data: tensors, arrays in an ``.npz`` file, or any torch ``Dataset``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .base import DATASETS, ArrayDataset, Batch, DataSplits
from .ids import check_ids

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _as_tensor(values: Any) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    # float64 arrays (numpy's default) would clash with float32 weights; integer inputs stay
    # integers because they may be token ids.
    return tensor.float() if tensor.dtype == torch.float64 else tensor


def from_tensors(
    train_inputs: Any,
    train_targets: Any,
    test_inputs: Any,
    test_targets: Any,
    *,
    num_classes: int | None = None,
    name: str = "tensors",
) -> DataSplits:
    """:class:`DataSplits` from in-memory inputs ``(N, *input_shape)`` and integer targets ``(N,)``.

    Tensors or numpy arrays; float64 inputs become float32, other dtypes are kept.
    ``num_classes`` defaults to the largest target + 1; targets outside ``[0, num_classes)``
    raise ``ValueError``.
    """
    x_train, x_test = _as_tensor(train_inputs), _as_tensor(test_inputs)
    y_train, y_test = _as_tensor(train_targets), _as_tensor(test_targets)
    for label, y in (("train_targets", y_train), ("test_targets", y_test)):
        if y.dim() != 1 or y.is_floating_point() or y.is_complex():
            raise ValueError(f"{name}: {label} must be a 1-d integer array of class ids; got {y.dtype} {tuple(y.shape)}")
    if x_train.dim() < 1 or x_test.dim() < 1 or x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{name}: train and test inputs must have the same per-sample shape; got {tuple(x_train.shape[1:])} "
            f"and {tuple(x_test.shape[1:])}"
        )
    if len(y_train) == 0 or len(y_test) == 0:
        raise ValueError(f"{name}: the train and test splits must not be empty")
    highest = int(max(y_train.max(), y_test.max()))
    num_classes = highest + 1 if num_classes is None else int(num_classes)
    if int(min(y_train.min(), y_test.min())) < 0 or highest >= num_classes:
        raise ValueError(f"{name}: targets must lie in [0, {num_classes}); found values up to {highest}")
    return DataSplits(
        name=name,
        train=ArrayDataset(x_train, y_train),  # ArrayDataset checks inputs and targets have equal lengths
        test=ArrayDataset(x_test, y_test),
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
    )


class SampleDataset(Dataset):
    """A user's dataset with samples as dicts ``{"input", "target", "index", "sample_id"}``.

    The wrapped dataset may yield ``(input, target)`` pairs or dicts with ``input``
    (or token fields) and ``target``. ``index`` is always the position in this dataset,
    as memory banks expect. ``sample_id`` is, in order of precedence: ``ids[i]`` when
    ``ids`` is given (:meth:`subset` and :meth:`with_ids` pass them on), the sample's own
    ``"sample_id"`` if the wrapped dataset yields one, else its position ``i``.
    """

    def __init__(self, dataset: Dataset, *, name: str = "dataset", ids: Any = None) -> None:
        self.dataset = dataset
        self.name = name
        self._ids = None if ids is None else check_ids(ids, len(self), where=name)
        self._targets: torch.Tensor | None = None
        self._own_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Batch:
        sample = self.dataset[i]
        if isinstance(sample, dict):
            if "target" not in sample:
                raise ValueError(f"{self.name}: sample {i} is a dict without 'target' (keys: {sorted(sample)})")
            out = {k: torch.as_tensor(v) for k, v in sample.items()}
        elif isinstance(sample, (tuple, list)) and len(sample) == 2:
            out = {"input": torch.as_tensor(sample[0])}
            out["target"] = torch.as_tensor(sample[1])
        else:
            raise TypeError(
                f"{self.name}: sample {i} must be an (input, target) pair or a dict with 'target'; "
                f"got {type(sample).__name__}"
            )
        out["target"] = out["target"].long()
        out["index"] = torch.tensor(i)
        if self._ids is not None:
            out["sample_id"] = self._ids[i]
        else:
            out["sample_id"] = out["sample_id"].long() if "sample_id" in out else torch.tensor(i)
        return out

    @property
    def targets(self) -> torch.Tensor:
        """All targets ``(N,)``, read once by iterating the dataset (for stratified subsets)."""
        if self._targets is None:
            self._targets = torch.tensor([int(self[i]["target"]) for i in range(len(self))], dtype=torch.long)
        return self._targets

    @property
    def sample_ids(self) -> torch.Tensor:
        """Stable sample ids ``(N,)`` int64. Read once by iterating the dataset only when the
        wrapped dataset yields its own ``sample_id``s; otherwise no sample is loaded."""
        if self._ids is not None:
            return self._ids
        if len(self) == 0 or not self._yields_own_ids():
            return torch.arange(len(self))
        if self._own_ids is None:
            ids = torch.tensor([int(self[i]["sample_id"]) for i in range(len(self))], dtype=torch.long)
            self._own_ids = check_ids(ids, len(self), where=f"{self.name} (its samples' own sample_id)")
        return self._own_ids

    def _yields_own_ids(self) -> bool:
        sample = self.dataset[0]
        return isinstance(sample, dict) and "sample_id" in sample

    def subset(self, indices: torch.Tensor) -> "SampleDataset":
        """A new dataset of the given positions: ``index`` is renumbered from 0, ``sample_id`` kept."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:  # a mask, which tensor indexing (ArrayDataset.subset) accepts too
            indices = indices.nonzero().flatten()
        indices = indices.long()
        return SampleDataset(Subset(self.dataset, indices.tolist()), name=self.name, ids=self.sample_ids[indices])

    def with_ids(self, ids: Any) -> "SampleDataset":
        """The same samples (the wrapped dataset shared) with new sample ids ``(N,)``."""
        return SampleDataset(self.dataset, name=self.name, ids=ids)


def from_datasets(
    train: Dataset, test: Dataset, *, num_classes: int, input_shape: Sequence[int], name: str = "custom"
) -> DataSplits:
    """:class:`DataSplits` around your own torch datasets (samples ``(x, y)`` or dicts).

    ``input_shape`` is the per-sample input shape a zoo model is built for. The first
    sample of each split is read now, so a wrong sample type fails here, not mid-training.
    """
    splits = []
    for label, ds in (("train", train), ("test", test)):
        wrapped = SampleDataset(ds, name=f"{name} {label}")
        if len(wrapped) == 0:
            raise ValueError(f"{name}: the {label} dataset is empty")
        wrapped[0]  # raises for a sample that is neither a pair nor a dict with 'target'
        splits.append(wrapped)
    return DataSplits(
        name=name, train=splits[0], test=splits[1], num_classes=int(num_classes), input_shape=tuple(int(d) for d in input_shape)
    )


@DATASETS.register("npz", summary="arrays x_train, y_train, x_test, y_test from a local .npz file")
def npz(*, path: str | None = None, num_classes: int | None = None) -> DataSplits:
    """A data set from a ``.npz`` file (``numpy.savez``) with arrays ``x_train``, ``y_train``,
    ``x_test``, ``y_test``. ``num_classes`` defaults to the largest label + 1.

    Loaded with ``allow_pickle=False``: an object array is refused, never unpickled.
    """
    if not path:
        raise ValueError("data set 'npz' needs options.path: a .npz file with x_train, y_train, x_test, y_test")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data set 'npz': no such file: {file}")
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{file}: not a readable .npz file ({err})") from None
    if not hasattr(archive, "files"):  # a plain .npy file holds one array, not four
        raise ValueError(f"{file}: expected an .npz archive (numpy.savez) with {', '.join(NPZ_KEYS)}")
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise ValueError(
                f"{file}: missing array(s) {', '.join(map(repr, missing))}; an npz data set needs "
                f"{', '.join(NPZ_KEYS)} (found: {', '.join(archive.files) or 'none'})"
            )
        try:
            arrays = {k: archive[k] for k in NPZ_KEYS}
        except ValueError as err:  # object arrays need pickle, which is refused
            raise ValueError(f"{file}: cannot read the arrays without pickle ({err})") from None
    return from_tensors(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], num_classes=num_classes, name=file.stem
    )
