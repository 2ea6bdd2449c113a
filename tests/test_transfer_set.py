"""The unlabelled transfer set: a labelled subset plus the rest of the split, labels hidden."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from transfuse.data import (
    IGNORE_TARGET, ArrayDataset, TransferSet, collate_batch, complement, from_datasets, load_dataset,
    stratified_subset, with_id_offset,
)

from test_data import Pairs  # a user dataset of (x, y) pairs


def assert_same_batch(a: dict, b: dict) -> None:
    """Two dict batches with the same keys, dtypes and values."""
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def digits_transfer():
    train = load_dataset("digits").train
    labelled = stratified_subset(train, 20, seed=0)
    return train, TransferSet(labelled, complement(train, labelled))


def test_transfer_set_of_digits(digits_transfer):
    train, transfer = digits_transfer
    assert len(transfer) == len(train) and transfer.num_labelled == 20
    batch = transfer.__getitems__(list(range(len(transfer))))
    assert set(batch) == {"input", "target", "index", "sample_id", "labelled"}
    assert batch["labelled"].dtype == torch.bool and int(batch["labelled"].sum()) == 20
    assert batch["labelled"][:20].all()  # the labelled part comes first
    assert (batch["target"][~batch["labelled"]] == IGNORE_TARGET).all()
    assert torch.equal(transfer.targets, batch["target"])
    assert torch.equal(batch["index"], torch.arange(len(train)))  # what a memory bank indexes
    ids = batch["sample_id"]
    assert torch.equal(ids.sort().values, train.sample_ids) and torch.equal(transfer.sample_ids, ids)
    assert torch.equal(batch["input"], train.inputs[ids])  # each id names its original row
    labelled = batch["labelled"]
    assert torch.equal(batch["target"][labelled], train.targets[ids[labelled]])


def test_getitems_with_shuffled_indices_equals_per_item_collate(digits_transfer):
    _, transfer = digits_transfer
    order = torch.randperm(len(transfer), generator=torch.Generator().manual_seed(0))[:64].tolist()
    order += list(range(20))[::-3]  # make sure labelled rows are mixed in
    assert_same_batch(transfer.__getitems__(order), collate_batch([transfer[i] for i in order]))
    assert transfer.__getitems__([])["input"].shape == (0, 1, 8, 8)
    loader = DataLoader(transfer, batch_size=50, shuffle=True, collate_fn=collate_batch,
                        generator=torch.Generator().manual_seed(1))
    seen = torch.cat([b["index"] for b in loader])
    assert torch.equal(seen.sort().values, torch.arange(len(transfer)))


def test_unlabelled_targets_do_not_leak_through_getitem(digits_transfer):
    train, transfer = digits_transfer
    sample = transfer[len(transfer) - 1]
    assert not sample["labelled"] and int(sample["target"]) == IGNORE_TARGET
    assert int(sample["index"]) == len(transfer) - 1
    with pytest.raises(IndexError):
        transfer[len(transfer)]


def test_overlapping_ids_are_refused_and_an_offset_fixes_them():
    train = load_dataset("digits").train
    part = train.subset(torch.arange(10))
    other = train.subset(torch.arange(5, 15))
    with pytest.raises(ValueError, match="share 5 sample id.*with_id_offset"):
        TransferSet(part, other)
    extra = with_id_offset(ArrayDataset(torch.rand(7, 1, 8, 8), torch.zeros(7, dtype=torch.long)), len(train))
    transfer = TransferSet(part, extra)
    assert transfer.sample_ids[10:].tolist() == list(range(len(train), len(train) + 7))


def test_mismatched_inputs_are_refused():
    a = ArrayDataset(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    b = with_id_offset(ArrayDataset(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)), 3)
    with pytest.raises(ValueError, match=r"\(2,\).*\(4,\).*expected the same per-sample shape"):
        TransferSet(a, b)


def test_no_stratified_subset_of_a_transfer_set(digits_transfer):
    _, transfer = digits_transfer
    with pytest.raises(TypeError, match="TransferSet"):
        stratified_subset(transfer, 10, seed=0)


def test_complement_keeps_ids_and_checks_them():
    data = ArrayDataset(torch.arange(6.0).unsqueeze(1), torch.arange(6) % 2, ids=[10, 11, 12, 13, 14, 15])
    rest = complement(data, torch.tensor([14, 11]))
    assert rest.sample_ids.tolist() == [10, 12, 13, 15] and rest.inputs.flatten().tolist() == [0.0, 2.0, 3.0, 5.0]
    assert len(complement(data, data)) == 0
    with pytest.raises(ValueError, match=r"1 of the given sample ids are not in the dataset \(e.g. \[3\]\)"):
        complement(data, torch.tensor([3, 12]))


def test_transfer_set_of_user_datasets_uses_per_item_collate():
    train = from_datasets(Pairs(12), Pairs(3), num_classes=3, input_shape=(1, 4, 4)).train
    labelled = stratified_subset(train, 6, seed=0)
    transfer = TransferSet(labelled, complement(train, labelled))
    order = [11, 0, 7, 3]
    batch = transfer.__getitems__(order)
    assert_same_batch(batch, collate_batch([transfer[i] for i in order]))
    assert batch["labelled"].tolist() == [False, True, False, True]
    assert batch["target"][~batch["labelled"]].tolist() == [IGNORE_TARGET, IGNORE_TARGET]
    assert torch.equal(transfer.sample_ids.sort().values, torch.arange(12))
    for i in order:
        assert torch.equal(transfer[i]["input"], train.dataset.x[int(transfer[i]["sample_id"])])
