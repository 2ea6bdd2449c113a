"""Bring your own data: tensors, arrays in an ``.npz`` file, or any torch ``Dataset``."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .base import DATASETS, ArrayDataset, Batch, DataSplits
from .ids import check_ids

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

#: How an ``.npz`` file (a zip archive; ``PK\x05\x06`` is an empty one) and an ``.npy`` file begin.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


def _numeric_tensor(values: Any, label: str, where: str, role: str) -> torch.Tensor:
    """``values`` (a tensor, a numpy array or nested lists) as a tensor of a numeric dtype.

    ``label`` names the array in errors (``x_train``); ``role`` says what it holds
    (``inputs``/``targets``). Strings, objects and complex numbers are refused here, before
    torch's own conversion error ("can't convert np.ndarray of type numpy.str_") could leak.
    """
    if isinstance(values, torch.Tensor):
        tensor = values
    else:
        try:
            array = np.asarray(values)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"{where}: {label} is not a rectangular array ({err})") from None
        if array.dtype.kind not in "biuf":  # bool, signed, unsigned, float
            raise ValueError(
                f"{where}: {label} has dtype {array.dtype}; {role} must be numeric (bool, integer or float)"
            )
        if not array.dtype.isnative:  # e.g. '>f4' written on a big-endian machine; torch refuses it
            array = array.astype(array.dtype.newbyteorder("="))
        if array.dtype.kind == "u" and array.dtype.itemsize > 1:
            # torch implements few ops on uint16/32/64; int64 holds every value but uint64's top half.
            if array.dtype.itemsize == 8 and array.size and array.max() > np.iinfo(np.int64).max:
                raise ValueError(f"{where}: {label} holds uint64 values beyond int64's range")
            array = array.astype(np.int64)
        tensor = torch.as_tensor(array)
    if tensor.dtype.is_complex:
        raise ValueError(f"{where}: {label} has dtype {tensor.dtype}; {role} must be numeric (bool, integer or float)")
    return tensor


def _first_bad(bad: torch.Tensor) -> tuple[int, int]:
    """How many entries of the 1-d bool ``bad`` are set, and the index of the first."""
    count = int(bad.sum())
    return count, (int(bad.nonzero()[0, 0]) if count else -1)


def _inputs(values: Any, label: str, where: str, *, scale_uint8: bool) -> torch.Tensor:
    """Inputs ``(N, *input_shape)`` in the dtype a model takes them in.

    Floats (float16, bfloat16, float64) and bools become float32, the dtype of a zoo
    model's weights (otherwise the first layer fails with "mat1 and mat2 must have the same
    dtype"). uint8 is taken for image pixels: float32 divided by 255 into ``[0, 1]``, or
    kept at 0..255 with ``scale_uint8=False``. Other integers stay integers, as they may be
    token ids. Floating inputs must be finite: a NaN would otherwise surface only later, as
    a non-finite loss (training) or a NaN metric (test).
    """
    tensor = _numeric_tensor(values, label, where, "inputs")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float()  # a copy, so dividing in place leaves the caller's data alone
        return tensor.div_(255.0) if scale_uint8 else tensor
    if tensor.dtype == torch.bool:
        return tensor.float()
    if not tensor.is_floating_point():
        # Signed integers are kept; a uint16/32/64 tensor given directly becomes int64, as numpy ones do.
        return tensor if tensor.dtype.is_signed else tensor.long()
    converted = tensor.float()
    if converted.dim() >= 1:
        finite = torch.isfinite(converted)
        finite = finite.flatten(1).all(1) if finite.dim() > 1 else finite  # (N,) per sample
        count, first = _first_bad(~finite)
        if count:
            overflow = ""
            if tensor.dtype == torch.float64 and bool(torch.isfinite(tensor[first]).all()):
                overflow = " (float64 values beyond float32's range, about 3.4e38, became inf)"
            raise ValueError(
                f"{where}: {label} holds non-finite values (NaN or inf) in {count} sample(s), the first at "
                f"index {first}{overflow}; clean or drop them"
            )
    return converted


def _targets(values: Any, label: str, where: str) -> torch.Tensor:
    """Class ids ``(N,)`` as int64. Whole-number float labels (``1.0``) are accepted; bools are 0/1."""
    tensor = _numeric_tensor(values, label, where, "targets")
    if tensor.dim() != 1:
        raise ValueError(f"{where}: {label} must be a 1-d array of class ids; got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point():
        # Casting 1.5 to int64 would silently give class 1; NaN != NaN, so it is caught too.
        whole = tensor == tensor.round()
        count, first = _first_bad(~whole)
        if count:
            raise ValueError(
                f"{where}: {label}: float targets must be whole numbers (class ids); found "
                f"{tensor[first].item()} at index {first}" + (f" ({count} such label(s))" if count > 1 else "")
            )
    return tensor.long()


def from_tensors(
    train_inputs: Any,
    train_targets: Any,
    test_inputs: Any,
    test_targets: Any,
    *,
    num_classes: int | None = None,
    name: str = "tensors",
    scale_uint8: bool = True,
) -> DataSplits:
    """:class:`DataSplits` from in-memory inputs ``(N, *input_shape)`` and class-id targets ``(N,)``.

    Tensors, numpy arrays or nested lists. Inputs are converted to what a model takes:

    * any float (float16, bfloat16, float64) becomes float32, and must be finite: NaN or
      inf raises ``ValueError`` naming the split, the number of samples and the first one;
    * uint8 is taken as image pixels and becomes float32 scaled to ``[0, 1]`` (divided by
      255). To keep the raw 0..255 values (as float32), pass ``scale_uint8=False``; to keep
      byte-sized integers as integers, store them as a signed dtype (e.g. int64);
    * signed integers (int8 .. int64) stay as they are (they may be token ids); other
      unsigned integers become int64; bool becomes float32;
    * strings, objects and complex numbers raise ``ValueError``.

    Targets are class ids; integer dtypes and whole-number floats (``1.0``) become int64.
    ``num_classes`` defaults to the largest target + 1; a target outside
    ``[0, num_classes)`` raises ``ValueError`` with its value and index. Errors name the
    four arrays, in argument order, ``x_train``, ``y_train``, ``x_test``, ``y_test``.
    """
    return _splits_from_arrays(
        train_inputs, train_targets, test_inputs, test_targets,
        num_classes=num_classes, name=name, where=name, scale_uint8=scale_uint8,
    )


def _splits_from_arrays(
    train_inputs: Any,
    train_targets: Any,
    test_inputs: Any,
    test_targets: Any,
    *,
    num_classes: int | None,
    name: str,
    where: str,
    scale_uint8: bool,
) -> DataSplits:
    """:func:`from_tensors` with errors prefixed by ``where`` (a file path for ``npz``) rather than ``name``."""
    if not isinstance(scale_uint8, bool):  # a YAML string such as "no" would otherwise count as True
        raise ValueError(f"{where}: scale_uint8 must be True or False, got {scale_uint8!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1
    ):
        raise ValueError(f"{where}: num_classes must be a positive integer (or None for max label + 1), got {num_classes!r}")
    x_train = _inputs(train_inputs, "x_train", where, scale_uint8=scale_uint8)
    x_test = _inputs(test_inputs, "x_test", where, scale_uint8=scale_uint8)
    y_train, y_test = _targets(train_targets, "y_train", where), _targets(test_targets, "y_test", where)
    if x_train.dim() < 1 or x_test.dim() < 1 or x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{where}: train and test inputs must have the same per-sample shape; got {tuple(x_train.shape[1:])} "
            f"and {tuple(x_test.shape[1:])}"
        )
    for (x_label, x), (y_label, y) in ((("x_train", x_train), ("y_train", y_train)), (("x_test", x_test), ("y_test", y_test))):
        if len(x) != len(y):
            raise ValueError(f"{where}: {x_label} has {len(x)} samples but {y_label} has {len(y)}")
    if len(y_train) == 0 or len(y_test) == 0:
        raise ValueError(f"{where}: the train and test splits must not be empty")
    num_classes = int(max(y_train.max(), y_test.max())) + 1 if num_classes is None else int(num_classes)
    for label, y in (("y_train", y_train), ("y_test", y_test)):
        count, first = _first_bad((y < 0) | (y >= num_classes))
        if count:
            raise ValueError(
                f"{where}: {label}: targets must lie in [0, {num_classes}); found {int(y[first])} at index {first}"
                + (f" ({count} such label(s))" if count > 1 else "")
            )
    return DataSplits(
        name=name,
        train=ArrayDataset(x_train, y_train),
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
        target = out["target"]
        # .long() would truncate 0.5 to class 0; whole-number floats (1.0) are class ids.
        if target.is_floating_point() and not bool((target == target.round()).all()):
            raise ValueError(
                f"{self.name}: sample {i} has target {target.tolist()}; float targets must be whole numbers (class ids)"
            )
        out["target"] = target.long()
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
    sample of each split is read now, so a wrong sample type, or a first target outside
    ``[0, num_classes)``, fails here, not mid-training (the other samples are not read).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be a positive integer, got {num_classes!r}")
    splits = []
    for label, ds in (("train", train), ("test", test)):
        wrapped = SampleDataset(ds, name=f"{name} {label}")
        if len(wrapped) == 0:
            raise ValueError(f"{name}: the {label} dataset is empty")
        # Raises for a sample that is neither a pair nor a dict with 'target', or a fractional target.
        target = wrapped[0]["target"]
        if target.dim() == 0 and not 0 <= int(target) < num_classes:
            raise ValueError(
                f"{name}: the {label} dataset's sample 0 has target {int(target)}; targets must lie in "
                f"[0, {num_classes})"
            )
        splits.append(wrapped)
    return DataSplits(
        name=name, train=splits[0], test=splits[1], num_classes=int(num_classes), input_shape=tuple(int(d) for d in input_shape)
    )


@DATASETS.register("npz", summary="arrays x_train, y_train, x_test, y_test from a local .npz file")
def npz(*, path: str | None = None, num_classes: int | None = None, scale_uint8: bool = True) -> DataSplits:
    """A data set from a ``.npz`` file (``numpy.savez``) with arrays ``x_train``, ``y_train``,
    ``x_test``, ``y_test``. ``num_classes`` defaults to the largest label + 1.

    The arrays are converted as :func:`from_tensors` does: floats become float32 (and must
    be finite), uint8 inputs are taken as image pixels and scaled to float32 in ``[0, 1]``,
    signed integer inputs (token ids) are kept, labels become int64. To keep uint8 pixels
    at 0..255 (as float32) set ``scale_uint8: false``::

        data: {name: npz, options: {path: mine.npz, scale_uint8: false}}

    Loaded with ``allow_pickle=False``: an object array is refused, never unpickled.
    """
    if not path:
        raise ValueError("data set 'npz' needs options.path: a .npz file with x_train, y_train, x_test, y_test")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {file} (data.options.path)")
    with open(file, "rb") as fh:
        head = fh.read(len(_NPY_MAGIC))
    # Decide the format from the first bytes ourselves: numpy calls anything that is neither
    # a zip nor an .npy "pickled (object) data" and suggests allow_pickle, which would run
    # whatever code the file holds.
    if head.startswith(_NPY_MAGIC):
        raise ValueError(
            f"{file}: an .npy file (one array, numpy.save output); the npz data set needs an .npz archive "
            f"(numpy.savez) with {', '.join(NPZ_KEYS)}"
        )
    if not head.startswith(_ZIP_MAGIC):
        what = "the file is empty" if not head else "its first bytes are neither a zip nor an .npy header"
        raise ValueError(f"{file}: not an .npz archive (numpy.savez output); {what}")
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{file}: a damaged zip archive, not readable as .npz ({err})") from None
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise ValueError(
                f"{file}: missing array(s) {', '.join(map(repr, missing))}; an npz data set needs "
                f"{', '.join(NPZ_KEYS)} (found: {', '.join(archive.files) or 'none'})"
            )
        arrays = {k: _npz_array(archive, k, file) for k in NPZ_KEYS}
    return _splits_from_arrays(
        arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
        num_classes=num_classes, name=file.stem, where=str(file), scale_uint8=scale_uint8,
    )


def _npz_array(archive: Any, key: str, file: Path) -> np.ndarray:
    """Array ``key`` of an open ``NpzFile``; an object array or a damaged member raises ``ValueError``."""
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if _member_holds_objects(archive, key):
            raise ValueError(
                f"{file}: array {key!r} holds Python objects (dtype object); object arrays are refused "
                f"because loading them would run pickle, which can execute code from the file. Save it "
                f"with a numeric dtype"
            ) from None
        raise ValueError(f"{file}: array {key!r} is not readable ({err})") from None


def _member_holds_objects(archive: Any, key: str) -> bool:
    """Whether the ``.npy`` header of ``key`` in an open ``NpzFile`` declares an object dtype.

    Only the header is read (never the data), so nothing is unpickled.
    """
    fmt = np.lib.format
    try:
        with archive.zip.open(f"{key}.npy") as member:
            version = fmt.read_magic(member)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            _, _, dtype = read_header(member)
    except Exception:  # a damaged header: not an object array as far as anyone can tell
        return False
    return bool(dtype.hasobject)
