"""Data sets: IDX files, Fashion-MNIST, digits, stratified subsets and bring-your-own data."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from transfuse.data import (
    DATASETS, ArrayDataset, IDXFormatError, collate_batch, from_datasets, from_tensors, load_dataset, read_idx,
    stratified_subset, with_id_offset,
)
from transfuse.data import fashion_mnist as fm
from transfuse.registry import UnknownNameError


def write_idx(path, array: np.ndarray, *, compress: bool) -> None:
    """An unsigned-byte IDX file written by hand (independently of the reader under test)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


# --- IDX ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("images.gz" if compress else "images")
    write_idx(path, images, compress=compress)
    np.testing.assert_array_equal(read_idx(path, ndim=3), images)


def test_read_idx_rejects_bad_magic_naming_the_file(tmp_path):
    path = tmp_path / "bogus-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(IDXFormatError, match="bogus-idx3-ubyte.*not an IDX file"):
        read_idx(path)


def test_read_idx_rejects_wrong_rank_and_truncation(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.zeros(5, dtype=np.uint8), compress=False)
    with pytest.raises(IDXFormatError, match="3 dimension"):
        read_idx(path, ndim=3)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(IDXFormatError, match="labels.*needs"):
        read_idx(path)


# --- Fashion-MNIST ------------------------------------------------------------------------


def _fake_fashion_root(root, *, n_train=6, n_test=4, compress=True):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        suffix = ".gz" if compress else ""
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress=compress)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress=compress)
    return root


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_from_idx_files(tmp_path, compress):
    root = _fake_fashion_root(tmp_path, compress=compress)
    splits = DATASETS.get("fashion_mnist")(root=str(root))
    assert (splits.num_classes, splits.input_shape) == (10, (1, 28, 28))
    assert splits.train.inputs.shape == (6, 1, 28, 28) and splits.train.inputs.dtype == torch.float32
    assert splits.test.targets.tolist() == [0, 1, 2, 3]
    assert splits.train.sample_ids.tolist() == list(range(6))  # positions in the original split
    lowest = (0.0 - fm.MEAN) / fm.STD  # a black pixel after normalisation
    assert splits.train.inputs.min().item() >= lowest - 1e-6
    assert DATASETS.get("fashion_mnist")(root=str(root)).train.inputs is splits.train.inputs  # decoded once


def test_fashion_mnist_missing_root_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        DATASETS.get("fashion_mnist")(root=str(tmp_path / "nowhere"))
    assert "nowhere" in str(info.value) and "data.options.root" in str(info.value)


def test_fashion_mnist_mismatched_counts(tmp_path):
    root = _fake_fashion_root(tmp_path)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(5), compress=True)
    with pytest.raises(IDXFormatError, match="6 images.*5 labels"):
        DATASETS.get("fashion_mnist")(root=str(root))


# --- digits -------------------------------------------------------------------------------


def test_digits_shapes_and_stratified_split():
    splits = load_dataset("digits")
    x, y = splits.train.inputs, splits.train.targets
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and splits.input_shape == (1, 8, 8)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert len(splits.train) + len(splits.test) == 1797 and len(splits.test) == 450
    share = torch.bincount(splits.test.targets, minlength=10) / torch.bincount(y, minlength=10)
    assert share.min() > 0.3 and share.max() < 0.37  # every class held out at about 1/3 of train


def test_digits_split_is_deterministic_per_seed():
    a, b, c = load_dataset("digits"), load_dataset("digits"), load_dataset("digits", split_seed=1)
    assert torch.equal(a.test.inputs, b.test.inputs)
    assert not torch.equal(a.test.inputs, c.test.inputs)


def test_load_dataset_checks_names_and_options():
    with pytest.raises(ValueError, match="'test_fractoin'"):
        load_dataset("digits", test_fractoin=0.5)
    with pytest.raises(UnknownNameError, match="digits"):
        load_dataset("digitz")


# --- stratified subsets -------------------------------------------------------------------


def test_stratified_subset_is_balanced_and_deterministic():
    train = load_dataset("digits").train
    small = stratified_subset(train, 53, seed=0)
    counts = torch.bincount(small.targets, minlength=10)
    assert len(small) == 53 and counts.min() == 5 and counts.max() == 6
    assert torch.equal(small.inputs, stratified_subset(train, 53, seed=0).inputs)
    assert not torch.equal(small.inputs, stratified_subset(train, 53, seed=1).inputs)
    assert small[0]["index"] == 0  # renumbered
    assert small[0]["sample_id"] == small.sample_ids[0]  # not renumbered


def test_stratified_subset_fills_from_larger_classes():
    targets = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    data = ArrayDataset(torch.arange(22.0).unsqueeze(1), targets)
    counts = torch.bincount(stratified_subset(data, 12, seed=3).targets)
    assert counts.tolist() == [2, 5, 5]
    with pytest.raises(ValueError, match="n must be"):
        stratified_subset(data, 23, seed=0)


def test_stratified_subset_refuses_negative_targets():
    data = ArrayDataset(torch.zeros(4, 1), torch.tensor([0, 1, -1, 1]))
    with pytest.raises(ValueError, match="IGNORE_TARGET"):
        stratified_subset(data, 2, seed=0)


# --- sample ids ---------------------------------------------------------------------------


def assert_same_batch(a: dict, b: dict) -> None:
    """Two dict batches with the same keys, dtypes and values."""
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_sample_ids_survive_stratified_subset_and_subset():
    train = load_dataset("digits").train
    assert torch.equal(train.sample_ids, torch.arange(len(train))) and train.sample_ids.dtype == torch.long
    small = stratified_subset(train, 53, seed=0)
    ids = small.sample_ids  # (53,) positions in the original train split
    assert len(torch.unique(ids)) == 53
    assert torch.equal(small.inputs, train.inputs[ids]) and torch.equal(small.targets, train.targets[ids])
    smaller = small.subset(torch.tensor([40, 2, 5]))
    assert smaller.sample_ids.tolist() == ids[[40, 2, 5]].tolist()
    for i in range(3):
        sample = smaller[i]
        assert int(sample["index"]) == i
        assert torch.equal(sample["input"], train.inputs[int(sample["sample_id"])])


def test_getitem_and_getitems_agree_on_every_key():
    small = stratified_subset(load_dataset("digits").train, 30, seed=2)
    order = [7, 0, 29, 3, 3]
    assert_same_batch(small.__getitems__(order), collate_batch([small[i] for i in order]))
    batch = next(iter(DataLoader(small, batch_size=8, collate_fn=collate_batch)))
    assert set(batch) == {"input", "target", "index", "sample_id"}  # no 'labelled' in an all-labelled batch
    assert batch["sample_id"].tolist() == small.sample_ids[:8].tolist()


def test_array_dataset_checks_ids():
    x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    assert ArrayDataset(x, y, ids=[7, 3, 9])[1]["sample_id"] == 3
    for ids, message in (([0, 0, 1], "distinct"), ([0, 1], "expected 3 ids"), ([0, -1, 2], "non-negative"),
                         ([0.0, 1.0, 2.0], "integer")):
        with pytest.raises(ValueError, match=message):
            ArrayDataset(x, y, ids=ids)


def test_with_id_offset_shifts_ids_only():
    data = ArrayDataset(torch.randn(5, 2), torch.arange(5) % 2)
    shifted = with_id_offset(data, 100)
    assert shifted.sample_ids.tolist() == [100, 101, 102, 103, 104]
    assert data.sample_ids.tolist() == [0, 1, 2, 3, 4]  # the original is unchanged
    assert int(shifted[2]["index"]) == 2 and torch.equal(shifted[2]["input"], data[2]["input"])
    wrapped = from_datasets(Pairs(6), Pairs(2), num_classes=3, input_shape=(1, 4, 4)).train
    assert with_id_offset(wrapped, 10).subset(torch.tensor([1, 4])).sample_ids.tolist() == [11, 14]
    with pytest.raises(TypeError, match="ArrayDataset or SampleDataset"):
        with_id_offset(Pairs(3), 5)


# --- bring your own -----------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    path = tmp_path / "mine.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.normal(size=(10, 3)), y_train=np.arange(10) % 4,
             x_test=rng.normal(size=(5, 3)), y_test=np.arange(5) % 4)
    splits = load_dataset("npz", path=str(path))
    assert (splits.num_classes, splits.input_shape, len(splits.train), len(splits.test)) == (4, (3,), 10, 5)
    assert splits.train.inputs.dtype == torch.float32  # float64 arrays become float32
    assert splits.test.sample_ids.tolist() == [0, 1, 2, 3, 4] and int(splits.test[3]["sample_id"]) == 3


def test_npz_missing_key_names_file_and_key(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.zeros((2, 3)), y_train=np.zeros(2, dtype=int), x_test=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="partial.npz.*'y_test'"):
        load_dataset("npz", path=str(path))
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_dataset("npz", path=str(tmp_path / "absent.npz"))


def test_from_tensors_checks_targets_and_shapes():
    splits = from_tensors(torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]), torch.zeros(2, 2), torch.tensor([0, 2]))
    assert splits.num_classes == 3 and splits.input_shape == (2,)
    assert splits.train.sample_ids.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="targets must lie"):
        from_tensors(torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]), torch.zeros(2, 2), torch.tensor([0, 2]), num_classes=2)
    with pytest.raises(ValueError, match="same per-sample shape"):
        from_tensors(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


class Pairs(Dataset):
    """A user's dataset of ``(x, y)`` tuples."""

    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 1, 4, 4)
        self.y = [i % 3 for i in range(n)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_from_datasets_with_tuple_samples():
    splits = from_datasets(Pairs(12), Pairs(6), num_classes=3, input_shape=(1, 4, 4))
    batch = next(iter(DataLoader(splits.train, batch_size=5, collate_fn=collate_batch)))
    assert batch["input"].shape == (5, 1, 4, 4)
    assert batch["target"].tolist() == [0, 1, 2, 0, 1] and batch["target"].dtype == torch.long
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    small = stratified_subset(splits.train, 6, seed=0)
    assert sorted(int(small[i]["target"]) for i in range(6)) == [0, 0, 1, 1, 2, 2]
    assert [int(small[i]["index"]) for i in range(6)] == list(range(6))
    assert batch["sample_id"].tolist() == [0, 1, 2, 3, 4]
    for i in range(6):  # ids are positions in the original split, and point at the same samples
        sample_id = int(small[i]["sample_id"])
        assert small.sample_ids[i] == sample_id and torch.equal(small[i]["input"], splits.train.dataset.x[sample_id])


class OwnIds(Dataset):
    """A user's dataset whose dict samples carry their own ``sample_id``."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i):
        return {"input": torch.full((2,), float(i)), "target": i % 2, "sample_id": 1000 + i}


def test_a_datasets_own_sample_ids_are_kept():
    batch = next(iter(DataLoader(OwnIds(), batch_size=3, collate_fn=collate_batch)))
    assert batch["sample_id"].tolist() == [1000, 1001, 1002]  # collate passes it through
    train = from_datasets(OwnIds(), OwnIds(), num_classes=2, input_shape=(2,)).train
    assert int(train[4]["sample_id"]) == 1004 and train.sample_ids.tolist() == list(range(1000, 1006))
    small = stratified_subset(train, 2, seed=0)
    assert [int(small[i]["sample_id"]) for i in range(2)] == small.sample_ids.tolist()
    assert all(int(small[i]["input"][0]) + 1000 == int(small[i]["sample_id"]) for i in range(2))


def test_from_datasets_rejects_unusable_samples():
    class Bare(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3)

    with pytest.raises(TypeError, match="pair or a dict"):
        from_datasets(Bare(), Bare(), num_classes=2, input_shape=(3,))


# --- bring your own: dtypes, non-finite values, labels, damaged files ----------------------


def _splits(x_train, y_train=None, x_test=None, y_test=None, **kw):
    """from_tensors with small default targets and test inputs shaped like ``x_train``."""
    n = len(x_train)
    y_train = np.arange(n) % 2 if y_train is None else y_train
    x_test = x_train[:2] if x_test is None else x_test
    y_test = np.array([0, 1]) if y_test is None else y_test
    return from_tensors(x_train, y_train, x_test, y_test, **kw)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=str)
def test_from_tensors_makes_every_float_input_float32(dtype):
    x = np.linspace(-1, 1, 12).reshape(4, 3).astype(dtype)
    splits = _splits(x)
    assert splits.train.inputs.dtype == torch.float32 and splits.test.inputs.dtype == torch.float32
    # float32 inputs meet float32 weights: the first Linear layer runs.
    assert torch.nn.Linear(3, 2)(splits.train.inputs).shape == (4, 2)
    torch_half = _splits(torch.from_numpy(x).to(torch.bfloat16))
    assert torch_half.train.inputs.dtype == torch.float32


def test_from_tensors_scales_uint8_images_to_unit_range_unless_told_not_to():
    x = np.array([[0, 51, 255], [255, 0, 102]], dtype=np.uint8)
    splits = _splits(x, x_test=x)
    assert splits.train.inputs.dtype == torch.float32
    assert torch.allclose(splits.train.inputs, torch.tensor([[0.0, 0.2, 1.0], [1.0, 0.0, 0.4]]))
    raw = _splits(torch.from_numpy(x), x_test=torch.from_numpy(x), scale_uint8=False)
    assert raw.train.inputs.dtype == torch.float32 and raw.test.inputs.max().item() == 255.0
    with pytest.raises(ValueError, match="scale_uint8 must be True or False"):
        _splits(x, scale_uint8="no")


def test_from_tensors_keeps_signed_integer_inputs_and_converts_bool():
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        tokens = np.arange(8, dtype=dtype).reshape(4, 2)  # token ids for a language model
        assert _splits(tokens).train.inputs.dtype == torch.from_numpy(tokens).dtype
    assert _splits(np.arange(8, dtype=np.uint16).reshape(4, 2)).train.inputs.dtype == torch.int64
    flags = _splits(np.array([[True, False], [False, True], [True, True]]))
    assert flags.train.inputs.dtype == torch.float32 and flags.train.inputs.sum().item() == 4.0


@pytest.mark.parametrize(
    "values, dtype",
    [(np.array([["a", "b"], ["c", "d"]]), "<U1"), (np.ones((2, 2), dtype=np.complex64), "complex64"),
     (np.array([[1, None], [2, 3]], dtype=object), "object")],
    ids=["str", "complex", "object"],
)
def test_from_tensors_refuses_non_numeric_inputs_naming_the_array(values, dtype):
    with pytest.raises(ValueError, match=rf"x_train has dtype {dtype}; inputs must be numeric"):
        _splits(values)
    with pytest.raises(ValueError, match="x_train.*complex"):
        _splits(torch.ones(2, 2, dtype=torch.complex64))


def test_from_tensors_refuses_nan_and_inf_naming_split_count_and_first_index():
    x = np.zeros((6, 3), dtype=np.float32)
    x[2, 1], x[4, 0] = np.nan, np.nan
    with pytest.raises(ValueError, match=r"x_train holds non-finite values \(NaN or inf\) in 2 sample\(s\), "
                                         r"the first at index 2; clean or drop them"):
        _splits(x)
    test = np.zeros((5, 3))
    test[3, 2] = np.inf
    with pytest.raises(ValueError, match=r"x_test holds non-finite .* in 1 sample\(s\), the first at index 3"):
        _splits(np.zeros((4, 3)), x_test=test, y_test=np.zeros(5, dtype=int))
    # float64 values beyond float32's range turn into inf when converted: said so.
    with pytest.raises(ValueError, match="x_train .*index 1.*float32's range"):
        _splits(np.array([[0.0], [1e300], [0.0]]), x_test=np.zeros((2, 1)))


def test_from_tensors_reports_the_offending_label_and_where():
    x = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"y_train: targets must lie in \[0, 3\); found -1 at index 3"):
        _splits(x, y_train=np.array([0, 1, 2, -1, 1]))
    with pytest.raises(ValueError, match=r"y_test: targets must lie in \[0, 3\); found 3 at index 1"):
        _splits(x, y_train=np.array([0, 1, 2, 1, 1]), y_test=np.array([0, 3]), num_classes=3)
    with pytest.raises(ValueError, match=r"y_train: targets must lie in \[0, 2\); found 2 at index 2"):
        _splits(x, y_train=np.array([0, 1, 2, 1, 1]), num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        _splits(x, num_classes=2.5)


def test_from_tensors_accepts_whole_float_labels_and_refuses_fractions():
    x = np.zeros((4, 2), dtype=np.float32)
    splits = _splits(x, y_train=np.array([0.0, 1.0, 2.0, 1.0]), y_test=torch.tensor([2.0, 0.0]))
    assert splits.train.targets.dtype == torch.int64 and splits.train.targets.tolist() == [0, 1, 2, 1]
    assert splits.num_classes == 3
    with pytest.raises(ValueError, match=r"y_train: .*whole numbers.*found 1.5 at index 2"):
        _splits(x, y_train=np.array([0.0, 1.0, 1.5, 1.0]))
    with pytest.raises(ValueError, match=r"y_test: .*whole numbers.*found nan at index 0"):
        _splits(x, y_test=np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="y_train has dtype <U1; targets must be"):
        _splits(x, y_train=np.array(["a", "b", "a", "b"]))


def test_from_tensors_names_the_split_when_lengths_differ():
    with pytest.raises(ValueError, match="x_train has 4 samples but y_train has 3"):
        _splits(np.zeros((4, 2)), y_train=np.array([0, 1, 1]))


def test_npz_scale_uint8_option(tmp_path):
    path = tmp_path / "images.npz"
    images = np.full((4, 1, 2, 2), 255, dtype=np.uint8)
    np.savez(path, x_train=images, y_train=np.arange(4) % 2, x_test=images[:2], y_test=np.array([0, 1]))
    assert load_dataset("npz", path=str(path)).train.inputs.max().item() == 1.0
    raw = load_dataset("npz", path=str(path), scale_uint8=False)
    assert raw.train.inputs.dtype == torch.float32 and raw.train.inputs.max().item() == 255.0


def test_npz_float16_inputs_become_float32(tmp_path):
    path = tmp_path / "half.npz"
    x = np.ones((4, 3), dtype=np.float16)
    np.savez(path, x_train=x, y_train=np.arange(4) % 2, x_test=x[:2], y_test=np.array([0, 1]))
    assert load_dataset("npz", path=str(path)).train.inputs.dtype == torch.float32


def test_npz_big_endian_arrays_load(tmp_path):
    path = tmp_path / "be.npz"
    x = np.arange(6, dtype=">f4").reshape(3, 2)
    np.savez(path, x_train=x, y_train=np.array([0, 1, 0], dtype=">i8"), x_test=x, y_test=np.array([1, 0, 1]))
    splits = load_dataset("npz", path=str(path))
    assert splits.train.inputs[2].tolist() == [4.0, 5.0] and splits.train.targets.tolist() == [0, 1, 0]


@pytest.mark.parametrize("content", [b"hello, not an archive", b"\x80\x04\x95pickled", b""], ids=["text", "pickle", "empty"])
def test_npz_garbage_file_is_not_an_archive_and_pickle_is_never_advised(tmp_path, content):
    path = tmp_path / "garbage.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"garbage.npz: not an .npz archive \(numpy.savez output\)") as info:
        load_dataset("npz", path=str(path))
    assert "allow_pickle" not in str(info.value)


def test_npz_damaged_zip_and_plain_npy_are_named(tmp_path):
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(ValueError, match="damaged.npz: a damaged zip archive"):
        load_dataset("npz", path=str(damaged))
    single = tmp_path / "single.npz"
    with open(single, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(ValueError, match=r"single.npz: an .npy file \(one array"):
        load_dataset("npz", path=str(single))


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x_train=np.array([[1, None]] * 2, dtype=object), y_train=np.array([0, 1]),
             x_test=np.zeros((2, 2)), y_test=np.array([0, 1]))
    with pytest.raises(ValueError, match="objects.npz: array 'x_train' holds Python objects.*would run pickle") as info:
        load_dataset("npz", path=str(path))
    assert "allow_pickle=" not in str(info.value)


class FloatTargets(Dataset):
    """A user's dataset whose targets are floats, whole or not."""

    def __init__(self, targets) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return torch.zeros(2), self.targets[i]


def test_from_datasets_refuses_fractional_targets_and_checks_the_first_target():
    splits = from_datasets(FloatTargets([1.0, 0.0]), FloatTargets([0.0]), num_classes=2, input_shape=(2,))
    assert splits.train[0]["target"].dtype == torch.long and int(splits.train[0]["target"]) == 1
    wrapped = from_datasets(FloatTargets([1.0, 0.5]), FloatTargets([0.0]), num_classes=2, input_shape=(2,)).train
    with pytest.raises(ValueError, match=r"custom train: sample 1 has target 0.5; float targets must be whole"):
        wrapped[1]  # read lazily: only the first sample is checked up front
    with pytest.raises(ValueError, match=r"the test dataset's sample 0 has target 5; targets must lie in \[0, 2\)"):
        from_datasets(FloatTargets([1.0]), FloatTargets([5]), num_classes=2, input_shape=(2,))
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        from_datasets(FloatTargets([1.0]), FloatTargets([0]), num_classes=0, input_shape=(2,))
