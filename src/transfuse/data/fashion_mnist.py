"""Fashion-MNIST (Xiao et al., 2017): 70,000 28x28 grayscale images of 10 clothing classes.

Read from the four IDX files in ``root`` (gzip-compressed or plain); nothing is downloaded.
On Debian/Ubuntu ``apt-get install dataset-fashion-mnist`` puts them in the default root.
https://github.com/zalandoresearch/fashion-mnist
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .base import DATASETS, ArrayDataset, DataSplits
from .idx import IDXFormatError, read_idx

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Mean and standard deviation of the training pixels (scaled to [0, 1]).
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {root / stem}.gz (nor {root / stem}). Install it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point data.options.root at a folder "
        f"with the four IDX files: {', '.join(f'{s}.gz' for s in FILES.values())}."
    )


def _split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = _find(root, FILES[f"{split}_images"]), _find(root, FILES[f"{split}_labels"])
    images = read_idx(images_path, ndim=3)  # (N, 28, 28) uint8
    labels = read_idx(labels_path, ndim=1)  # (N,) uint8
    if len(images) != len(labels):
        raise IDXFormatError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if images.dtype != "u1" or labels.dtype != "u1":
        raise IDXFormatError(f"{images_path}, {labels_path}: expected unsigned-byte IDX data")
    x = (torch.from_numpy(images).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)  # (N, 1, 28, 28)
    return x, torch.from_numpy(labels).long()


@functools.lru_cache(maxsize=4)
def _load(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Decoded once per process and root: benchmarks load the data set for every run, and
    # decompressing and normalising 70,000 images each time would dominate short runs.
    # Callers must not modify the cached tensors in place.
    path = Path(root)
    return (*_split(path, "train"), *_split(path, "test"))


@DATASETS.register("fashion_mnist", summary="Fashion-MNIST 28x28 grayscale, 10 classes, from local IDX files")
def fashion_mnist(*, root: str = DEFAULT_ROOT) -> DataSplits:
    """Fashion-MNIST's 60,000/10,000 train/test split from the IDX files in ``root``.

    Inputs ``(N, 1, 28, 28)`` float32 normalised with mean 0.2860 and std 0.3530; targets 0-9
    (names in :data:`CLASSES`). A missing file raises ``FileNotFoundError`` naming it.
    """
    x_train, y_train, x_test, y_test = _load(str(Path(root).expanduser().resolve()))
    return DataSplits(
        name="fashion_mnist",
        train=ArrayDataset(x_train, y_train),
        test=ArrayDataset(x_test, y_test),
        num_classes=10,
        input_shape=(1, 28, 28),
    )
