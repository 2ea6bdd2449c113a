"""scikit-learn's handwritten digits: 1,797 8x8 grayscale images of 0-9, bundled with the package.

Small enough to train a teacher in a second on a CPU, which makes it the data set of the
demo, the tests and the quick benchmarks.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .base import DATASETS, ArrayDataset, DataSplits


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # sklearn is slow to import; only this loader needs it

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)  # (1797, 8, 8) in [0, 1], (1797,)


@DATASETS.register("digits", summary="scikit-learn digits 8x8 grayscale, 10 classes (bundled, 1,797 images)")
def digits(*, test_fraction: float = 0.25, split_seed: int = 0) -> DataSplits:
    """A stratified train/test split of the digits: inputs ``(N, 1, 8, 8)`` float32 in [0, 1].

    ``test_fraction``: share of samples held out for testing; ``split_seed``: the split's
    seed (the same seed gives the same split on every machine).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits: test_fraction must be in (0, 1); got {test_fraction}")
    from sklearn.model_selection import train_test_split

    images, targets = _raw()
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=test_fraction, random_state=split_seed, stratify=targets
    )
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(targets)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return DataSplits(
        name="digits",
        train=ArrayDataset(x[train_idx], y[train_idx]),
        test=ArrayDataset(x[test_idx], y[test_idx]),
        num_classes=10,
        input_shape=(1, 8, 8),
    )
